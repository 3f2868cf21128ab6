"""Where a study lives: opening the storage, creating or resuming a study, and counting
its trials against the budget.

Any SQLAlchemy URL works; `sqlite:///optuna.db` in the current directory is the default
and PostgreSQL is the way to several hosts. A study's settings — preset, budget, sampler
seed, pruner, the priors — are its user attributes, so every worker, on any host, reads
the same ones, and optuna-dashboard shows them.

The budget belongs to the study, not to a process. A trial counts once it has ended
(complete, pruned, or failed), except a failed trial that was queued again — a worker
killed mid-trial (found by the heartbeat) or interrupted — since its retry takes its place.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import sqlite3
import sys
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import optuna
from optuna.exceptions import ExperimentalWarning
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from study.presets import Preset, get_preset
from study.sampler import GaussianPriorSampler

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial

DEFAULT_STORAGE = "sqlite:///optuna.db"
# Seconds between a running trial's heartbeats; a trial silent for GRACE_FACTOR times as
# long belongs to a dead worker and is queued again with the same parameters.
DEFAULT_HEARTBEAT = 5
GRACE_FACTOR = 4
# A retry that dies again is retried again, up to this many times.
MAX_RETRY = 3
# How long an SQLite writer waits for another's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 120
# How long a storage call keeps retrying through a lost connection (a database server
# restarting, a network blip) or a lock it could not wait for, before the process gives up.
RECONNECT_S = 120
RECONNECT_ENV = "MNIST_STUDY_RECONNECT_S"
# An outage shorter than this is contention, not news: retried without a word.
QUIET_RETRY_S = 2.0
# Seconds a PostgreSQL connection attempt may take before it counts as failed.
CONNECT_TIMEOUT_S = 10


class StorageError(RuntimeError):
    """The storage URL or database cannot be used; the message says why in one line."""


class StudyError(RuntimeError):
    """The study is missing or does not match what was asked for."""


def redact(url: str) -> str:
    """The URL with any password masked, for every message a user sees."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # an unparsable URL has nothing to mask that we could find
        return url.split("@")[-1] if "@" in url else url


def open_storage(
    url: str,
    *,
    create: bool = False,
    heartbeat: int | None = DEFAULT_HEARTBEAT,
    write: bool = True,
) -> RDBStorage:
    """An `RDBStorage` for `url`, with heartbeats and retry of stale trials.

    With `create=False` a missing SQLite file is an error rather than a new empty file.
    A file that is not an Optuna database, or is damaged, is refused before anything
    writes to it; so is one this process may not write to, unless `write=False` (the
    commands that only read: status, report, dashboard).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except NoSuchModuleError:
        raise StorageError(
            f"storage {redact(url)}: no database driver {parsed.drivername!r} "
            "(e.g. sqlite:///optuna.db or postgresql+psycopg://user@host/db)"
        ) from None
    except ArgumentError:
        raise StorageError(
            f"storage {url!r}: not a database URL (e.g. sqlite:///optuna.db or "
            "postgresql+psycopg://user@host/db)"
        ) from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if parsed.database and parsed.database != ":memory:":
            _check_sqlite_file(Path(parsed.database), create=create, write=write)
    else:
        # A pooled connection that died with its server is noticed and replaced at checkout.
        engine_kwargs["pool_pre_ping"] = True
        if parsed.get_driver_name() in ("psycopg", "psycopg2"):
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            kwargs: dict[str, Any] = {}
            if heartbeat:
                kwargs = {
                    "heartbeat_interval": heartbeat,
                    "grace_period": GRACE_FACTOR * heartbeat,
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                }
            storage = _create_tables_once(url, engine_kwargs, kwargs)
    except ImportError:
        raise StorageError(
            f"storage {redact(url)}: the driver {parsed.drivername!r} is not installed "
            "(for PostgreSQL: pip install 'mnist-study[postgres]')"
        ) from None
    except (SQLAlchemyError, RuntimeError, ValueError) as exc:
        raise StorageError(f"storage {redact(url)}: {_one_line(exc)}") from None
    # Only now: a wrong password or a database that is not there fails at once above,
    # whereas an outage after a good start is waited out.
    storage.reconnect_s = _reconnect_seconds()
    logging.getLogger("optuna.storages._rdb.storage").addFilter(_drop_fallback_warning)
    return storage


def _drop_fallback_warning(record: logging.LogRecord) -> bool:
    """Optuna answers any error of its trial query by warning, with the whole SQL, that it
    falls back to a slower query, taking a lost connection for too many query variables.
    Either the fallback works or the retry above speaks, in one line; the warning only
    alarms."""
    return not record.getMessage().startswith("Caught an error from sqlalchemy")


# What a process sees when another creates Optuna's tables in the same new database at
# the same moment (SQLite, then PostgreSQL wording): each checks, then both create.
_CREATION_RACE = re.compile(r"already exists|UNIQUE constraint failed|duplicate key value")
CREATION_ATTEMPTS = 4


def _create_tables_once(
    url: str, engine_kwargs: dict[str, Any], kwargs: dict[str, Any]
) -> ResilientRDBStorage:
    """The storage, whose first opening creates Optuna's tables. A `run` creating a new
    database while `status` (or another `run`) opens it may lose that race; by the retry
    the winner's tables exist and are only checked."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(1, CREATION_ATTEMPTS + 1):
        try:
            return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except SQLAlchemyError as exc:
            if attempt == CREATION_ATTEMPTS or not _CREATION_RACE.search(str(exc)):
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _reconnect_seconds() -> float:
    """$MNIST_STUDY_RECONNECT_S, for a planned outage longer than the default's."""
    text = os.environ.get(RECONNECT_ENV)
    if not text:
        return RECONNECT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StorageError(f"${RECONNECT_ENV} = {text!r}: must be a number of seconds >= 0")
    return seconds


# SQLITE_BUSY and SQLITE_LOCKED (the primary codes; extended codes add high bits).
_SQLITE_BUSY_CODES = (5, 6)


def _transient_cause(exc: BaseException) -> BaseException | None:
    """The database error behind `exc` if retrying the same call may succeed: a dropped or
    refused connection, a server restarting, SQLite's "database is locked", a PostgreSQL
    serialization failure (all `OperationalError`s in SQLAlchemy's terms)."""
    from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError

    # Optuna wraps errors raised inside its sessions, and a connection lost mid-query can
    # surface as a later error (SQLAlchemy refusing to reconnect inside the broken
    # transaction, while Optuna tried a fallback query): the first database error down
    # the chain of causes decides.
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        sqlite_code = getattr(getattr(current, "orig", None), "sqlite_errorcode", None)
        if sqlite_code is not None:
            # SQLite's own verdicts are final, except another process holding the lock.
            return current if sqlite_code & 0xFF in _SQLITE_BUSY_CODES else None
        if isinstance(current, OperationalError | InterfaceError):
            return current
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return current
        current = current.__cause__ or current.__context__
    return None


class ResilientRDBStorage(RDBStorage):
    """Optuna's `RDBStorage`, whose calls ride out a lost connection.

    Each storage call that fails for a transient reason is repeated, with backoff, for up
    to `reconnect_s` seconds; then a `StorageError` ends the process with one line, and the
    heartbeat hands its running trial to another worker. Re-running a call is safe because
    each runs in its own transaction; the one call whose first attempt may have committed
    unseen, ending a trial, is recognised on its retry (see `set_trial_state_values`).
    """

    # None while opening, so that no error is waited out; then RECONNECT_S or the env's.
    reconnect_s: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # Per thread, since the heartbeat thread calls in while the trial runs.
        self._retry_state = threading.local()
        super().__init__(*args, **kwargs)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_retry_state", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._retry_state = threading.local()

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        try:
            return super().set_trial_state_values(trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Raised by a retry whose first attempt committed before its connection
            # dropped: the trial already holds what this call was to write.
            if getattr(self._retry_state, "retrying", False):
                stored = RDBStorage.get_trial(self, trial_id)
                if stored.state == state:
                    return True
            raise

    def record_heartbeat(self, trial_id: int) -> None:
        # Runs in Optuna's heartbeat thread, where an exception would print a traceback and
        # end the beats; a beat missed for good is the grace period's business instead.
        try:
            _retrying(RDBStorage.record_heartbeat)(self, trial_id)
        except StorageError as exc:
            print(f"mnist-study: heartbeat of trial id {trial_id} missed: {exc}", file=sys.stderr)

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials, plus running trials that never beat at all: a worker
        killed between claiming a trial and its first heartbeat leaves one, which would
        otherwise stay RUNNING and hold its share of the budget forever."""
        stale = super()._get_stale_trial_ids(study_id)
        grace = timedelta(seconds=self.grace_period or 2 * (self.heartbeat_interval or 0))
        # Optuna's own models and session helper: the query must see what its tables hold.
        from optuna.storages._rdb import models
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            never_beat = [
                (trial.trial_id, trial.datetime_start)
                for trial in session.query(models.TrialModel)
                .filter(models.TrialModel.state == TrialState.RUNNING)
                .filter(models.TrialModel.study_id == study_id)
                .filter(~models.TrialModel.heartbeats.any())
            ]
        # The start time comes from the claiming host's clock (Optuna 5 hands it back
        # time-zone aware, older versions naive and local), so this host's clock judges it.
        return stale + [
            trial_id
            for trial_id, started in never_beat
            if started is not None
            and datetime.now(started.tzinfo) - started > grace
            and trial_id not in stale
        ]


def _retrying(method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(self: ResilientRDBStorage, *args: Any, **kwargs: Any) -> Any:
        deadline: float | None = None
        start = 0.0
        delay = 0.05
        said = False
        outer = getattr(self._retry_state, "retrying", False)
        try:
            while True:
                try:
                    return method(self, *args, **kwargs)
                except Exception as exc:
                    cause = _transient_cause(exc)
                    if cause is None or self.reconnect_s is None:
                        raise
                    now = time.monotonic()
                    if deadline is None:
                        start, deadline = now, now + self.reconnect_s
                    if now >= deadline:
                        raise StorageError(
                            f"storage {redact(self.url)} failed for {self.reconnect_s:.0f} s: "
                            f"{_one_line(cause)}"
                        ) from None
                    if not said and now - start >= QUIET_RETRY_S:
                        said = True
                        print(
                            f"mnist-study: storage {redact(self.url)}: {_one_line(cause)}; "
                            f"retrying for up to {self.reconnect_s:.0f} s",
                            file=sys.stderr,
                        )
                    time.sleep(min(delay, deadline - now))
                    delay = min(2 * delay, 2.0)
                    self._retry_state.retrying = True
        finally:
            self._retry_state.retrying = outer

    return call


# Every call Optuna (directly, or through its cache in front of the storage) makes on an
# RDB storage. Nested ones (get_all_trials calling _get_trials) retry in the innermost.
_RETRIED_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
    "get_trial", "get_all_trials", "_get_trials", "get_best_trial", "_get_best_trial_id",
    "_get_stale_trial_ids",
)  # fmt: skip
for _name in _RETRIED_CALLS:
    setattr(ResilientRDBStorage, _name, _retrying(getattr(ResilientRDBStorage, _name)))


def _check_sqlite_file(path: Path, *, create: bool, write: bool) -> None:
    if not path.exists():
        if not create:
            raise StorageError(
                f"no study storage at {path}: start a study there with `mnist-study run`, "
                "or point --storage at an existing one"
            )
        if not path.parent.is_dir():
            raise StorageError(f"cannot create {path}: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise StorageError(f"cannot create {path}: folder {path.parent} is read-only")
        # WAL lets readers (the progress bar, the dashboard) read while a worker writes.
        # The mode is kept in the file, so it is set once, on a file nobody else has open.
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        return
    if path.is_dir():
        raise StorageError(f"{path} is a folder, not an SQLite database")
    # Only SQLite itself opens the file: closing any other descriptor of it would drop the
    # locks that this process's open connections hold (POSIX locks are per process), and
    # then another process may delete a WAL those connections still read from.
    companions = [path.with_name(path.name + end) for end in ("-wal", "-shm")]
    unused = not any(c.exists() for c in companions)  # in WAL mode, open means they exist
    try:
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
        size = path.stat().st_size
        wal = companions[0]
        # With no WAL, every page is in the file: one cut short (a copy interrupted, a full
        # disk) has fewer bytes than its header counts. A WAL with frames, even one another
        # process began while this one looked, holds pages the file does not yet.
        no_frames = unused and (not wal.exists() or wal.stat().st_size == 0)
        if no_frames and size < pages * page_size:
            raise StorageError(
                f"{path} is damaged (truncated: {size:,} bytes, its header counts "
                f"{pages * page_size:,}); it was left as it is"
            )
        if tables and "studies" not in tables:
            raise StorageError(
                f"{path} is a database of another application (it has no Optuna tables); "
                "refusing to add them"
            )
        # SQLite in WAL mode also writes -wal and -shm files beside the database.
        for needed in (path, path.parent) if write else ():
            if not os.access(needed, os.W_OK):
                why = "" if needed == path else f" (its folder {needed} is not writable)"
                raise StorageError(
                    f"{path} is read-only for this user{why}: `mnist-study status` and "
                    "`report` can read it; run and retrain need write access"
                )
    except (sqlite3.DatabaseError, StorageError) as exc:
        if unused:
            _remove_empty_companions(companions)
        if not isinstance(exc, sqlite3.DatabaseError):
            raise
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_NOTADB:
            raise StorageError(f"{path} is not an SQLite database ({exc})") from None
        raise StorageError(f"{path} is damaged ({exc}); it was left as it is") from None


def _remove_empty_companions(companions: list[Path]) -> None:
    """Takes away the -wal and -shm files that looking into a refused file left (so a
    refusal changes nothing), but only an empty log: one with content is someone's data."""
    wal, shm = companions
    if wal.exists() and wal.stat().st_size == 0:
        wal.unlink(missing_ok=True)
        shm.unlink(missing_ok=True)
    elif not wal.exists():
        shm.unlink(missing_ok=True)


def create_or_resume(
    storage: RDBStorage,
    name: str,
    preset: Preset,
    *,
    budget: int | None = None,
    seed: int | None = None,
) -> tuple[optuna.Study, bool]:
    """The study `name`, created with `preset`'s settings if new. Returns (study, created).

    Resuming checks the preset and seed; a new `budget` replaces the stored one.
    """
    existing = _study_names(storage)
    if name in existing:
        attrs = _study_attrs(storage, name)
        if attrs.get("preset") != preset.name:
            raise StudyError(
                f"study {name!r} was made with preset {attrs.get('preset')!r}, not "
                f"{preset.name!r}: resume it with --preset {attrs.get('preset')}, or give "
                "another --study name"
            )
        if seed is not None and seed != attrs.get("seed"):
            raise StudyError(
                f"study {name!r} samples with seed {attrs.get('seed')}, not {seed}: "
                "a study keeps its seed; leave --seed out to resume it"
            )
        study = load_study(storage, name)
        if budget is not None and budget != attrs.get("budget"):
            study.set_user_attr("budget", budget)
        return study, False

    import secrets

    seed = secrets.randbelow(2**31) if seed is None else seed
    sampler = GaussianPriorSampler(preset.space.priors(), seed=seed)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=make_pruner(preset.pruner),
        load_if_exists=True,
    )
    settings = {
        "preset": preset.name,
        "budget": preset.n_trials if budget is None else budget,
        "seed": seed,
        "pruner": preset.pruner,
        "priors": {
            key: {"mu": round(p.mu, 4), "sigma": round(p.sigma, 4)}
            for key, p in preset.space.priors().items()
        },
        "space": preset.space.describe(),
        "training": {
            k: v for k, v in preset.defaults.params().items() if not k.startswith("n_units")
        },
    }
    for key, value in settings.items():
        study.set_user_attr(key, value)
    return study, True


def load_study(storage: RDBStorage, name: str) -> optuna.Study:
    """An existing mnist-study study, with the sampler and pruner its attributes name."""
    names = _study_names(storage)
    if name not in names:
        there = f"studies there: {', '.join(sorted(names))}" if names else "it holds no studies"
        raise StudyError(f"no study named {name!r} in {redact(storage.url)}; {there}")
    attrs = _study_attrs(storage, name)
    if "preset" not in attrs or "seed" not in attrs:
        raise StudyError(
            f"study {name!r} was not made by mnist-study (no preset in its attributes)"
        )
    preset = get_preset(attrs["preset"])
    sampler = GaussianPriorSampler(preset.space.priors(), seed=attrs["seed"])
    return optuna.load_study(
        study_name=name,
        storage=storage,
        sampler=sampler,
        pruner=make_pruner(attrs.get("pruner", "none")),
    )


def study_preset(study: optuna.Study) -> Preset:
    return get_preset(study.user_attrs["preset"])


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        # Judge a trial only after a few whole trials and a few epochs of its own.
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=4)
    return optuna.pruners.NopPruner()


def list_studies(storage: RDBStorage) -> list[str]:
    return sorted(_study_names(storage))


def _study_names(storage: RDBStorage) -> set[str]:
    return {s.study_name for s in storage.get_all_studies()}


def _study_attrs(storage: RDBStorage, name: str) -> dict[str, Any]:
    return storage.get_study_user_attrs(storage.get_study_id_from_name(name))


@dataclass(frozen=True)
class StudyCounts:
    """A study's trials against its budget."""

    budget: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: int = 0
    running: int = 0
    waiting: int = 0
    best: FrozenTrial | None = field(default=None, compare=False)

    @property
    def finished(self) -> int:
        """Trials that count against the budget."""
        return self.complete + self.pruned + self.failed

    @property
    def done(self) -> bool:
        return self.finished >= self.budget

    @property
    def unclaimed(self) -> int:
        """Budget that no finished, running or queued trial covers yet."""
        return self.budget - self.finished - self.running - self.waiting

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "budget": self.budget,
            "finished": self.finished,
            "complete": self.complete,
            "pruned": self.pruned,
            "failed": self.failed,
            "retried": self.retried,
            "running": self.running,
            "waiting": self.waiting,
            "best": None,
        }
        if self.best is not None:
            out["best"] = {
                "number": self.best.number,
                "value": self.best.value,
                "params": self.best.params,
                "user_attrs": self.best.user_attrs,
            }
        return out


def count_trials(study: optuna.Study) -> StudyCounts:
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    by_state: dict[TrialState, int] = {}
    retried_failures = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.number in retried:
            retried_failures += 1
            continue
        by_state[t.state] = by_state.get(t.state, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return StudyCounts(
        budget=int(study.user_attrs.get("budget", 0)),
        complete=by_state.get(TrialState.COMPLETE, 0),
        pruned=by_state.get(TrialState.PRUNED, 0),
        failed=by_state.get(TrialState.FAIL, 0),
        retried=retried_failures,
        running=by_state.get(TrialState.RUNNING, 0),
        waiting=by_state.get(TrialState.WAITING, 0),
        best=best,
    )


def requeue(study: optuna.Study, number: int) -> None:
    """Queue a failed trial again with its parameters, as the heartbeat retry does."""
    trial = study.get_trials(deepcopy=False)[number]
    if trial.state == TrialState.FAIL:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ExperimentalWarning)
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and so requeue) running trials whose worker stopped beating."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = lines[0] if lines else type(exc).__name__
    # SQLAlchemy appends "(Background on this error at: https://sqlalche.me/...)" and
    # prefixes the driver's class, "(psycopg.OperationalError) ", which tell a user nothing.
    text = text.split(" (Background on this error")[0]
    return re.sub(r"^\([\w.]+\) ", "", text)
