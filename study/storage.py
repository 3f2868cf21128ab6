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

import sqlite3
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
    url: str, *, create: bool = False, heartbeat: int | None = DEFAULT_HEARTBEAT
) -> RDBStorage:
    """An `RDBStorage` for `url`, with heartbeats and retry of stale trials.

    With `create=False` a missing SQLite file is an error rather than a new empty file.
    A file that is not an Optuna database is refused before anything writes to it.
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, SQLAlchemyError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise StorageError(
            f"storage {url!r}: not a database URL (e.g. sqlite:///optuna.db or "
            "postgresql+psycopg://user@host/db)"
        ) from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if parsed.database and parsed.database != ":memory:":
            _check_sqlite_file(Path(parsed.database), create=create)
    else:
        engine_kwargs["pool_pre_ping"] = True
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
            return RDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
    except (SQLAlchemyError, ImportError, RuntimeError, ValueError) as exc:
        raise StorageError(f"storage {redact(url)}: {_one_line(exc)}") from None


def _check_sqlite_file(path: Path, *, create: bool) -> None:
    if not path.exists():
        if not create:
            raise StorageError(
                f"no study storage at {path}: start a study there with `mnist-study run`, "
                "or point --storage at an existing one"
            )
        if not path.parent.is_dir():
            raise StorageError(f"cannot create {path}: folder {path.parent} does not exist")
        # WAL lets readers (the progress bar, the dashboard) read while a worker writes.
        # The mode is kept in the file, so it is set once, on a file nobody else has open.
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        return
    if path.is_dir():
        raise StorageError(f"{path} is a folder, not an SQLite database")
    try:
        with sqlite3.connect(f"file:{path}?mode=ro", uri=True) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
    except sqlite3.DatabaseError as exc:
        raise StorageError(f"{path} is not an SQLite database ({exc})") from None
    if tables and "studies" not in tables:
        raise StorageError(
            f"{path} is a database of another application (it has no Optuna tables); "
            "refusing to add them"
        )


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
    # SQLAlchemy appends "(Background on this error at: https://sqlalche.me/...)".
    return text.split(" (Background on this error")[0]
