"""`ResilientRDBStorage`: Optuna's `RDBStorage`, whose calls ride out a lost connection,
and whose workers' trials are watched by the heartbeat from the moment they are claimed.

It wraps Optuna's storage methods by name, some of them private (`_create_new_trial`,
`_set_trial_param`, `_get_trials`, `_get_best_trial_id`, `_get_stale_trial_ids`), and
writes a first heartbeat with Optuna's table models: `pyproject.toml` keeps Optuna below
its next major version, and `tests/test_study.py` fails, naming the method, when one of
them is gone.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import optuna
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from model.errors import first_line
from study.errors import StorageError, causes, redact

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

# An outage shorter than this is contention, not news: retried without a word.
QUIET_RETRY_S = 2.0
# The study's user attribute that holds its budget of trials (set by `study.studies`).
BUDGET_KEY = "budget"


class BudgetSpent(Exception):
    """A worker's claim of a new trial refused: the study's budget is already covered by
    its finished, running and queued trials (see `ResilientRDBStorage.beating_from_claim`)."""


@dataclass(frozen=True)
class TrialTally:
    """A study's trials as `study.budget.count_trials` needs them: how many in each state,
    how many of the failed ones were queued again (their numbers are in another trial's
    `retry_history`), and the best complete trial's id (maximised), if any."""

    states: dict[TrialState, int]
    retried_failures: int
    best_trial_id: int | None


class ResilientRDBStorage(RDBStorage):
    """Optuna's `RDBStorage`, whose calls ride out a lost connection.

    Each storage call that fails for a transient reason is repeated, with backoff, for up
    to `reconnect_s` seconds; then a `StorageError` ends the process with one line, and the
    heartbeat hands its running trial to another worker. Re-running a call is safe because
    each runs in its own transaction; the one call whose first attempt may have committed
    unseen, ending a trial, is recognised on its retry (see `set_trial_state_values`).

    Trials claimed inside `beating_from_claim()` (the workers') hold a heartbeat from the
    claim on; any other trial is judged by the heartbeat exactly as `RDBStorage` judges it.
    """

    # None while opening, so that no error is waited out; then RECONNECT_S or the env's.
    reconnect_s: float | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        _listen_for_sqlite_begins()
        # Per thread, since the heartbeat thread calls in while the trial runs.
        self._retry_state = threading.local()
        self._claim_state = threading.local()
        super().__init__(*args, **kwargs)
        _beat_on_claims(self)

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_retry_state", None)
        state.pop("_claim_state", None)
        return state

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        self._retry_state = threading.local()
        self._claim_state = threading.local()
        _beat_on_claims(self)

    @contextmanager
    def beating_from_claim(self) -> Iterator[None]:
        """Trials that this thread claims inside the block (a new trial, or one taken from
        the queue) get their first heartbeat in the claim's own transaction.

        Optuna's heartbeat thread beats only once `optimize` has claimed the trial, so a
        worker killed in between would leave a RUNNING trial that no heartbeat ever judges.
        Only the workers claim this way: a trial from `study.ask()` outside the block has
        no heartbeat until someone records one, and is never failed as stale, as on
        `RDBStorage` (an ask-and-tell user may hold it as long as they like).

        Inside the block a new trial is also held to the study's budget (its `budget`
        user attribute, where it has one): its transaction counts the study's trials as
        `study.budget.count_trials` counts them against the budget (finished, running and
        queued), and if the new trial would pass the budget, rolls it back and raises
        `BudgetSpent`. Optuna creates a trial under a lock on the study's row, so these
        counts are taken one claim at a time, and the budget is exact however many workers
        claim at once. A queued trial taken from the queue is inside the budget already."""
        outer = getattr(self._claim_state, "beating", False)
        self._claim_state.beating = True
        try:
            yield
        finally:
            self._claim_state.beating = outer

    def set_trial_state_values(self, trial_id: int, state: TrialState, values: Any = None) -> bool:
        """Optuna's, whose read of the trial's state and write of the new one are one
        transaction on SQLite too (`_sqlite_write_lock_from_the_start`): otherwise two
        workers failing one stale trial at once both fail it, and both queue it again, one
        trial past the budget; two taking one queued trial both take it."""
        try:
            with _sqlite_write_lock_from_the_start():
                return super().set_trial_state_values(trial_id, state, values)
        except optuna.exceptions.UpdateFinishedTrialError:
            # Raised by a retry whose first attempt committed before its connection
            # dropped: the trial already holds what this call was to write.
            if getattr(self._retry_state, "retrying", False):
                stored = RDBStorage.get_trial(self, trial_id)
                if stored.state == state:
                    return True
            raise

    def trial_tally(self, study_id: int, with_best: bool = True) -> TrialTally:
        """The study's trials counted in the database (see `TrialTally`): a few grouped
        and limited queries, where reading every trial costs 1.6 ms a trial. Without
        `with_best`, no best trial is looked for (`best_trial_id` is None)."""
        from optuna.storages._rdb.models import TrialModel
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import func

        with _create_scoped_session(self.scoped_session) as session:
            in_study = TrialModel.study_id == study_id
            states = dict(
                session.query(TrialModel.state, func.count(TrialModel.trial_id))
                .filter(in_study)
                .group_by(TrialModel.state)
                .all()
            )
            retried_failures = _retried_failures(session, study_id)
            best = _best_trial_id(session, study_id) if with_best else None
        return TrialTally(states, retried_failures, best)

    def best_trial_id(self, study_id: int) -> int | None:
        """The id of the study's best complete trial (see `_best_trial_id`), or None: one
        ordered and limited query, where reading every trial to find it costs 1.4 ms a
        trial."""
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            return _best_trial_id(session, study_id)

    def recent_finished_trial_ids(self, study_id: int, limit: int) -> list[int]:
        """The ids of the study's `limit` last-numbered complete or pruned trials, newest
        first: a look at the recent past that costs the same at any study size."""
        from optuna.storages._rdb.models import TrialModel
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            rows = (
                session.query(TrialModel.trial_id)
                .filter(
                    TrialModel.study_id == study_id,
                    TrialModel.state.in_((TrialState.COMPLETE, TrialState.PRUNED)),
                )
                .order_by(TrialModel.number.desc())
                .limit(limit)
                .all()
            )
        return [trial_id for (trial_id,) in rows]

    def complete_trial_values(self, study_id: int) -> list[tuple[int, int, float]]:
        """(trial id, number, value) of each of the study's complete trials, in number
        order: three numbers a trial, where reading the trials whole costs 1.4 ms each."""
        from optuna.storages._rdb.models import TrialModel, TrialValueModel
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            rows = (
                session.query(
                    TrialModel.trial_id,
                    TrialModel.number,
                    TrialValueModel.value,
                    TrialValueModel.value_type,
                )
                .join(TrialValueModel)
                .filter(
                    TrialModel.study_id == study_id,
                    TrialModel.state == TrialState.COMPLETE,
                    TrialValueModel.objective == 0,
                )
                .order_by(TrialModel.number)
                .all()
            )
        to_value = TrialValueModel.stored_repr_to_value
        return [(trial_id, number, to_value(v, kind)) for trial_id, number, v, kind in rows]

    def param_value_counts(self, study_id: int, name: str) -> dict[float, int]:
        """How many of the study's trials (in any state) hold each value of the parameter
        `name`, in Optuna's internal representation: grouped in the database."""
        from optuna.storages._rdb.models import TrialModel, TrialParamModel
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import func

        with _create_scoped_session(self.scoped_session) as session:
            rows = (
                session.query(TrialParamModel.param_value, func.count(TrialParamModel.param_id))
                .join(TrialModel)
                .filter(TrialModel.study_id == study_id, TrialParamModel.param_name == name)
                .group_by(TrialParamModel.param_value)
                .all()
            )
        return dict(rows)

    def user_attr_values(self, study_id: int, key: str) -> list[Any]:
        """The user attribute `key` of every trial of the study that has one, decoded:
        one short column, not every trial whole."""
        from optuna.storages._rdb.models import TrialModel, TrialUserAttributeModel
        from optuna.storages._rdb.storage import _create_scoped_session

        with _create_scoped_session(self.scoped_session) as session:
            rows = (
                session.query(TrialUserAttributeModel.value_json)
                .join(TrialModel)
                .filter(TrialModel.study_id == study_id, TrialUserAttributeModel.key == key)
                .all()
            )
        return [json.loads(text) for (text,) in rows]

    def trials_by_id(self, study_id: int, trial_ids: set[int]) -> list[FrozenTrial]:
        """The study's trials of these ids, whole, in id order: what they cost, not what
        the study's other trials would."""
        from optuna.storages._rdb.models import TrialModel
        from optuna.storages._rdb.storage import _create_scoped_session
        from sqlalchemy import func

        if not trial_ids:
            return []
        with _create_scoped_session(self.scoped_session) as session:
            last = (
                session.query(func.max(TrialModel.trial_id))
                .filter(TrialModel.study_id == study_id)
                .scalar()
            )
        # Optuna's reader takes the ids it is given and every id above its bound: bounded
        # by the study's last id, it reads the given ones only.
        return self._get_trials(study_id, None, trial_ids, last if last is not None else -1)

    def record_heartbeat(self, trial_id: int) -> None:
        # Runs in Optuna's heartbeat thread, where an exception would print a traceback and
        # end the beats; a beat missed for good is the grace period's business instead.
        try:
            _retrying(RDBStorage.record_heartbeat)(self, trial_id)
        except StorageError as exc:
            print(f"mnist-study: heartbeat of trial id {trial_id} missed: {exc}", file=sys.stderr)


def _best_trial_id(session: Session, study_id: int) -> int | None:
    """The id of the study's complete trial with the highest value (maximised), the
    first-numbered of equal values, as `max()` over the trials in number order is."""
    from optuna.storages._rdb.models import TrialModel, TrialValueModel
    from sqlalchemy import case

    kind = TrialValueModel.TrialValueType
    best = (
        session.query(TrialModel.trial_id)
        .filter(TrialModel.study_id == study_id, TrialModel.state == TrialState.COMPLETE)
        .join(TrialValueModel)
        .filter(TrialValueModel.objective == 0)
        .order_by(
            case(
                (TrialValueModel.value_type == kind.INF_NEG, -1),
                (TrialValueModel.value_type == kind.FINITE, 0),
                (TrialValueModel.value_type == kind.INF_POS, 1),
            ).desc(),
            TrialValueModel.value.desc(),
            TrialModel.number.asc(),
        )
        .limit(1)
        .one_or_none()
    )
    return None if best is None else best[0]


# The trials a transaction set RUNNING, kept in the session's info until it ends.
def _retried_failures(session: Any, study_id: int) -> int:
    """How many of the study's failed trials were queued again: their numbers are in
    another trial's `retry_history`."""
    from optuna.storages._rdb.models import TrialModel, TrialSystemAttributeModel

    in_study = TrialModel.study_id == study_id
    histories = (
        session.query(TrialSystemAttributeModel.value_json)
        .join(TrialModel)
        .filter(in_study, TrialSystemAttributeModel.key == "retry_history")
        .all()
    )
    failed = (
        session.query(TrialModel.number).filter(in_study, TrialModel.state == TrialState.FAIL).all()
    )
    retried = {n for (text,) in histories for n in json.loads(text)}
    return sum(1 for (number,) in failed if number in retried)


def _check_budget(session: Any, study_id: int) -> None:
    """Raise `BudgetSpent` if the study's trials, counted as against its budget and with
    the new trial this transaction has written, are more than its budget."""
    from optuna.storages._rdb.models import StudyUserAttributeModel, TrialModel
    from sqlalchemy import func

    stored = (
        session.query(StudyUserAttributeModel.value_json)
        .filter(
            StudyUserAttributeModel.study_id == study_id,
            StudyUserAttributeModel.key == BUDGET_KEY,
        )
        .one_or_none()
    )
    if stored is None:
        return
    budget = int(json.loads(stored[0]))
    trials = (
        session.query(func.count(TrialModel.trial_id))
        .filter(TrialModel.study_id == study_id)
        .scalar()
    )
    # Every trial counts but a failure queued again, whose retry counts in its place.
    taken = trials - _retried_failures(session, study_id)
    if taken > budget:
        raise BudgetSpent(f"the study's {budget} trials are all finished, running or queued")


# Whether this thread's next SQLite transactions begin with the write lock.
_write_lock_first = threading.local()


@contextmanager
def _sqlite_write_lock_from_the_start() -> Iterator[None]:
    """Inside the block, an SQLite transaction this thread begins takes the write lock
    before its first statement (`BEGIN IMMEDIATE`, waiting out another writer as any
    write does). Python's sqlite3 begins a transaction only at the first write, so without
    this a read that decides the write runs outside it, and another process may commit in
    between. PostgreSQL needs nothing: Optuna reads the row `FOR UPDATE`. Only for calls
    of one transaction: a second connection opened inside the block would wait on the
    first's lock."""
    outer = getattr(_write_lock_first, "on", False)
    _write_lock_first.on = True
    try:
        yield
    finally:
        _write_lock_first.on = outer


@functools.cache
def _listen_for_sqlite_begins() -> None:
    """Once a process, for `_sqlite_write_lock_from_the_start`."""
    from sqlalchemy import event
    from sqlalchemy.engine import Connection, Engine

    def begin(connection: Connection) -> None:
        if getattr(_write_lock_first, "on", False) and connection.dialect.name == "sqlite":
            # sqlite3 then sees the transaction open and adds no BEGIN of its own.
            connection.exec_driver_sql("BEGIN IMMEDIATE")

    event.listen(Engine, "begin", begin)


# The trials a transaction set RUNNING, kept in the session's info until it ends, each
# with whether it is new (a claim that must fit the budget) or taken from the queue.
_CLAIMED = "mnist_study_claimed_trials"


def _beat_on_claims(storage: ResilientRDBStorage) -> None:
    """Listens to the storage's sessions: a transaction that sets a trial RUNNING inside
    `beating_from_claim` also inserts its heartbeat row, stamped by the database's clock
    (as every later beat is), so no host's clock judges another's."""
    from optuna.storages._rdb import models
    from sqlalchemy import event, inspect
    from sqlalchemy.orm import SessionTransaction

    sessions = storage.scoped_session.session_factory
    # Not the storage itself: the listeners live as long as its sessions' class, and a cycle
    # back to the storage would keep its connections open until a garbage collection (an
    # SQLite file would then keep its -wal and -shm beside it after the process ends).
    claim_state = storage._claim_state

    def note_claims(session: Session, *flushing: object) -> None:
        if not getattr(claim_state, "beating", False):
            return
        claimed = session.info.setdefault(_CLAIMED, [])
        for trial in (*session.new, *session.dirty):
            if not isinstance(trial, models.TrialModel) or trial.state != TrialState.RUNNING:
                continue
            # A new RUNNING trial, or a waiting one just taken (Optuna creates a queued or a
            # finished trial RUNNING first, then sets its state: checked at the commit).
            if trial in session.new:
                claimed.append((trial, True))
            elif inspect(trial).attrs.state.history.has_changes():
                claimed.append((trial, False))

    def beat_claims(session: Session) -> None:
        note_claims(session)  # what the commit's own flush is about to write
        with session.no_autoflush:
            for trial, new in session.info.pop(_CLAIMED, []):
                if trial.state != TrialState.RUNNING or trial.heartbeats:
                    continue
                if new:
                    # Under Optuna's lock on the study's row, taken to number the trial.
                    _check_budget(session, trial.study_id)
                session.add(models.TrialHeartbeatModel(trial=trial))

    def forget_claims(session: Session, transaction: SessionTransaction) -> None:
        # The outermost transaction only: a flush inside it ends a transaction of its own.
        if transaction.parent is None:
            session.info.pop(_CLAIMED, None)

    event.listen(sessions, "before_flush", note_claims)
    event.listen(sessions, "before_commit", beat_claims)
    event.listen(sessions, "after_transaction_end", forget_claims)


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
                            f"{database_error_line(cause)}"
                        ) from None
                    if not said and now - start >= QUIET_RETRY_S:
                        said = True
                        print(
                            f"mnist-study: storage {redact(self.url)}: "
                            f"{database_error_line(cause)}; "
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
RETRIED_CALLS = (
    "create_new_study", "delete_study", "set_study_user_attr", "set_study_system_attr",
    "get_study_id_from_name", "get_study_name_from_id", "get_study_directions",
    "get_study_user_attrs", "get_study_system_attrs", "get_all_studies",
    "create_new_trial", "_create_new_trial", "set_trial_param", "_set_trial_param",
    "get_trial_param", "set_trial_state_values", "set_trial_intermediate_value",
    "set_trial_user_attr", "set_trial_system_attr", "get_trial_id_from_study_id_trial_number",
    "get_trial_user_attrs", "get_trial_system_attrs",
    "get_trial", "get_all_trials", "_get_trials", "get_best_trial", "_get_best_trial_id",
    "_get_stale_trial_ids",
)  # fmt: skip
# This project's own reads, retried the same way.
OWN_RETRIED_CALLS = (
    "trial_tally", "best_trial_id", "recent_finished_trial_ids", "complete_trial_values",
    "param_value_counts", "user_attr_values", "trials_by_id",
)  # fmt: skip
# A name this Optuna lacks is left out here, and named by the test that checks the list.
for _name in RETRIED_CALLS:
    if callable(getattr(RDBStorage, _name, None)):
        setattr(ResilientRDBStorage, _name, _retrying(getattr(ResilientRDBStorage, _name)))
for _name in OWN_RETRIED_CALLS:
    setattr(ResilientRDBStorage, _name, _retrying(getattr(ResilientRDBStorage, _name)))


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
    for current in causes(exc):
        sqlite_code = getattr(getattr(current, "orig", None), "sqlite_errorcode", None)
        if sqlite_code is not None:
            # SQLite's own verdicts are final, except another process holding the lock.
            return current if sqlite_code & 0xFF in _SQLITE_BUSY_CODES else None
        if isinstance(current, OperationalError | InterfaceError):
            return current
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return current
    return None


def database_error_line(exc: BaseException) -> str:
    """A database error's first line, without what SQLAlchemy adds around it."""
    # SQLAlchemy appends "(Background on this error at: https://sqlalche.me/...)" and
    # prefixes the driver's class, "(psycopg.OperationalError) ", which tell a user nothing.
    text = first_line(exc).split(" (Background on this error")[0]
    return re.sub(r"^\([\w.]+\) ", "", text)


def drop_fallback_warning(record: logging.LogRecord) -> bool:
    """Optuna answers any error of its trial query by warning, with the whole SQL, that it
    falls back to a slower query, taking a lost connection for too many query variables.
    Either the fallback works or the retry above speaks, in one line; the warning only
    alarms."""
    return not record.getMessage().startswith("Caught an error from sqlalchemy")
