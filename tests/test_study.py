"""The study in one process: storage, creation and resume, budget counting, the objective."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import optuna
import pytest
import torch
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from model.data import DeviceData
from study import resilient_storage
from study.budget import count_trials
from study.database import open_storage
from study.errors import StorageError, StudyError, redact
from study.objective import Objective, SpeedOptions
from study.presets import PRESETS
from study.resilient_storage import RETRIED_CALLS, ResilientRDBStorage
from study.sampler import GaussianPriorSampler, PriorThenTPESampler
from study.studies import create_or_resume, fail_stale_trials, load_study, requeue
from study.study_file import parse_study
from tests.conftest import synthetic_data

optuna.logging.set_verbosity(optuna.logging.WARNING)


@pytest.fixture
def db(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def test_a_new_study_stores_its_settings_and_priors(db: str) -> None:
    storage = open_storage(db, create=True)
    study, created = create_or_resume(storage, "s", PRESETS["quick"], seed=7)
    assert created
    attrs = load_study(storage, "s").user_attrs
    assert (attrs["preset"], attrs["budget"], attrs["seed"], attrs["pruner"]) == (
        "quick", 12, 7, "median",
    )  # fmt: skip
    assert attrs["priors"]["n_units_l0"] == {"mu": 183.1797, "sigma": 88.5438}
    assert attrs["priors"]["n_units_l1"] == {"mu": 42.7995, "sigma": 10.0}
    assert attrs["space"]["dropout"]["low"] == 0.3
    assert study.direction == optuna.study.StudyDirection.MAXIMIZE


def test_a_wide_study_stores_its_sampler_and_loads_it_again_with_the_same_seed_and_n(
    db: str,
) -> None:
    storage = open_storage(db, create=True)
    study, _ = create_or_resume(storage, "w", PRESETS["wide"], seed=7)
    attrs = study.user_attrs
    assert (attrs["sampler"], attrs["seed"], attrs["n_prior_trials"]) == ("prior_then_tpe", 7, 20)
    assert (attrs["preset"], attrs["budget"], attrs["pruner"]) == ("wide", 60, "median")
    assert attrs["priors"] == {}  # log-uniform widths: no Gaussian prior anywhere
    assert attrs["space"]["n_layers"] == {"distribution": "IntDistribution", "log": False,
                                          "step": 1, "low": 1, "high": 4}  # fmt: skip
    assert attrs["space"]["n_units_l1"]["only_when"] == {"parent": "n_layers", "values": [2, 3, 4]}
    assert attrs["training"]["schedule"] == "cosine" and attrs["training"]["subset"] is None
    sampler = load_study(storage, "w").sampler
    assert isinstance(sampler, PriorThenTPESampler)
    assert (sampler.seed, sampler.n_prior_trials) == (7, 20)
    # What is stored, not what the preset says now, decides: a study keeps its sampler.
    study.set_user_attr("n_prior_trials", 5)
    assert load_study(storage, "w").sampler.n_prior_trials == 5


def test_a_random_search_study_stores_its_sampler_by_name(db: str) -> None:
    storage = open_storage(db, create=True)
    study, _ = create_or_resume(storage, "s", PRESETS["seed"], seed=3)
    assert study.user_attrs["sampler"] == "random"
    assert "n_prior_trials" not in study.user_attrs
    sampler = load_study(storage, "s").sampler
    assert type(sampler) is GaussianPriorSampler and sampler.seed == 3


def test_a_study_stored_before_samplers_were_named_loads_as_random_search(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "old", PRESETS["smoke"], seed=4)
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:  # as older ones were
        connection.execute("DELETE FROM study_user_attributes WHERE key = 'sampler'")
    assert "sampler" not in load_study(storage, "old").user_attrs
    sampler = load_study(storage, "old").sampler
    assert type(sampler) is GaussianPriorSampler and sampler.seed == 4
    # And it resumes as it was: no sampler attribute is invented for it.
    study, created = create_or_resume(storage, "old", PRESETS["smoke"])
    assert not created and type(study.sampler) is GaussianPriorSampler
    assert "sampler" not in study.user_attrs


def test_a_study_naming_an_unknown_sampler_is_one_clear_error(db: str) -> None:
    storage = open_storage(db, create=True)
    study, _ = create_or_resume(storage, "s", PRESETS["smoke"], seed=4)
    study.set_user_attr("sampler", "cmaes")
    with pytest.raises(StudyError, match=r"names the sampler 'cmaes'.* random, prior_then_tpe"):
        load_study(storage, "s")


def test_resuming_keeps_the_study_and_a_new_budget_replaces_the_old(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "s", PRESETS["smoke"], seed=1)
    study, created = create_or_resume(storage, "s", PRESETS["smoke"], budget=9)
    assert not created
    assert study.user_attrs["budget"] == 9
    assert study.user_attrs["seed"] == 1
    assert isinstance(study.sampler, type(load_study(storage, "s").sampler))
    assert study.sampler.seed == 1


def test_a_study_created_without_a_seed_stores_the_one_its_sampler_drew(db: str) -> None:
    storage = open_storage(db, create=True)
    study, _ = create_or_resume(storage, "s", PRESETS["smoke"])
    seed = study.user_attrs["seed"]
    assert isinstance(seed, int) and 0 <= seed < 2**31
    assert study.sampler.seed == load_study(storage, "s").sampler.seed == seed


def test_a_new_study_names_its_metric(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "s", PRESETS["smoke"], seed=1)
    assert load_study(storage, "s").metric_names == ["mean CV accuracy"]


def test_resuming_a_study_made_before_metric_names_gives_it_the_name(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "s", PRESETS["smoke"], seed=1)
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:  # as older ones were
        connection.execute("DELETE FROM study_system_attributes WHERE key LIKE '%metric_names'")
    assert load_study(storage, "s").metric_names is None
    study, created = create_or_resume(storage, "s", PRESETS["smoke"])
    assert not created
    assert study.metric_names == load_study(storage, "s").metric_names == ["mean CV accuracy"]


def test_resuming_with_another_preset_is_refused(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "s", PRESETS["smoke"])
    with pytest.raises(StudyError, match="made with preset 'smoke', not 'quick'"):
        create_or_resume(storage, "s", PRESETS["quick"])


def test_resuming_with_another_seed_is_refused(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "s", PRESETS["smoke"], seed=1)
    with pytest.raises(StudyError, match="samples with seed 1, not 2"):
        create_or_resume(storage, "s", PRESETS["smoke"], seed=2)


def test_an_unknown_study_name_lists_the_studies_that_exist(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "alpha", PRESETS["smoke"])
    create_or_resume(storage, "beta", PRESETS["smoke"])
    with pytest.raises(StudyError, match=r"no study named 'gamma' .* studies there: alpha, beta"):
        load_study(storage, "gamma")


def test_a_study_not_made_by_mnist_study_is_refused(db: str) -> None:
    storage = open_storage(db, create=True)
    optuna.create_study(study_name="foreign", storage=storage)
    with pytest.raises(StudyError, match="not made by mnist-study"):
        load_study(storage, "foreign")


def test_a_study_being_created_is_either_whole_or_not_yet_one_to_another_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`run` writes a new study's settings one attribute at a time; a worker or `status`
    loading it meanwhile must find it not yet made (a StudyError it may wait out), never
    half made. Every moment of the creation is looked at: after each attribute written."""
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, create=True)
    other = open_storage(url)
    # A study file of the user's: its name is no shipped preset's, so a reader that found
    # the name before the file could not rebuild it.
    preset = parse_study(PRESETS["smoke"].text, "my-file")
    assert preset.name not in PRESETS
    seen: list[str] = []
    write = optuna.Study.set_user_attr

    def write_then_look(study: optuna.Study, key: str, value: object) -> None:
        write(study, key, value)
        try:
            load_study(other, "s")
            seen.append("whole")
        except StudyError as exc:
            assert "or `run` is still creating it" in str(exc)
            seen.append("not yet")

    monkeypatch.setattr(optuna.Study, "set_user_attr", write_then_look)
    create_or_resume(storage, "s", preset, budget=3, seed=1)
    assert seen[-1] == "whole" and set(seen[:-1]) == {"not yet"}, seen


def test_a_file_that_is_not_a_database_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_bytes(b"these are my notes, not a database" * 10)
    before = (path.read_bytes(), path.stat().st_mtime_ns)
    with pytest.raises(StorageError, match="is not an SQLite database"):
        open_storage(f"sqlite:///{path}", create=True)
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_a_database_of_another_application_is_refused_and_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "app.db"
    with sqlite3.connect(path) as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    before = path.read_bytes()
    with pytest.raises(StorageError, match="database of another application"):
        open_storage(f"sqlite:///{path}", create=True)
    assert path.read_bytes() == before


def test_a_missing_database_is_created_only_when_asked(tmp_path: Path) -> None:
    path = tmp_path / "optuna.db"
    with pytest.raises(StorageError, match="no study storage at"):
        open_storage(f"sqlite:///{path}")
    assert not path.exists()
    open_storage(f"sqlite:///{path}", create=True)
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


@pytest.mark.parametrize(
    ("url", "says"),
    [("not a url", "not a database URL"), ("nosuchdriver://x/y", "storage nosuchdriver://x/y")],
)
def test_a_bad_storage_url_is_one_clear_error(url: str, says: str) -> None:
    with pytest.raises(StorageError, match=says) as info:
        open_storage(url)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        (
            "postgresql+psycopg://ann:s3cret@db.example/studies",
            "postgresql+psycopg://ann:***@db.example/studies",
        ),
        # A password as SQLAlchemy reads it: anything up to the '@'.
        ("postgresql://ann:a/b:c?d@db:5432/s", "postgresql://ann:***@db:5432/s"),
        # Every URL in a message; none without a password, nor a port, taken for one.
        (
            "storage postgresql://u:pw@h/db: failed; see mysql://v:x@h2 or sqlite:///a.db",
            "storage postgresql://u:***@h/db: failed; see mysql://v:***@h2 or sqlite:///a.db",
        ),
        ("postgresql://ann@db:5432/s from ann@home", "postgresql://ann@db:5432/s from ann@home"),
        ("postgresql://db:5432/s by ann@home", "postgresql://db:5432/s by ann@home"),
    ],
)
def test_passwords_are_masked_in_storage_urls(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_budget_counts_ended_trials_but_not_failures_that_were_retried(db: str) -> None:
    storage = open_storage(db, create=True)
    study, _ = create_or_resume(storage, "s", PRESETS["smoke"], budget=5)
    distribution = optuna.distributions.FloatDistribution(0, 1)
    for state, value in [(TrialState.COMPLETE, 0.9), (TrialState.PRUNED, None)]:
        study.add_trial(
            optuna.create_trial(
                state=state, value=value, params={"x": 0.5}, distributions={"x": distribution}
            )
        )
    study.add_trial(optuna.create_trial(state=TrialState.FAIL))  # trial 2, not retried
    study.add_trial(optuna.create_trial(state=TrialState.FAIL))  # trial 3, retried below
    requeue(study, 3)
    counts = count_trials(study)
    assert (counts.complete, counts.pruned, counts.failed, counts.retried) == (1, 1, 1, 1)
    assert (counts.waiting, counts.finished, counts.unclaimed, counts.done) == (1, 3, 1, False)
    assert counts.best is not None and counts.best.number == 0
    retry = study.get_trials()[-1]
    assert retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == 3


def smoke_objective(data: DeviceData) -> tuple[optuna.Study, Objective]:
    preset = PRESETS["smoke"]
    study = optuna.create_study(direction="maximize")
    return study, Objective(preset, data, worker="test-worker")


def test_objective_returns_the_mean_fold_accuracy_and_stores_per_fold_figures() -> None:
    study, objective = smoke_objective(synthetic_data(4000))
    study.optimize(objective, n_trials=1)
    trial = study.trials[0]
    assert trial.state == TrialState.COMPLETE
    attrs = trial.user_attrs
    assert len(attrs["fold_accuracies"]) == 2
    assert trial.value == pytest.approx(sum(attrs["fold_accuracies"]) / 2)
    assert attrs["epochs_run"] == [5, 5]
    assert len(attrs["best_epochs"]) == 2
    assert attrs["device"] == "cpu" and attrs["worker"] == "test-worker"
    assert attrs["seconds"] > 0
    # The running mean accuracy, one intermediate value per epoch.
    assert sorted(trial.intermediate_values) == [1, 2, 3, 4, 5]
    assert set(trial.params) == {
        "n_units_l0", "n_units_l1", "activation", "optimizer", "dropout", "lr", "weight_decay",
    }  # fmt: skip


def test_a_diverging_configuration_is_pruned_with_its_reason_and_the_worker_goes_on() -> None:
    data = synthetic_data(4000)
    poisoned = DeviceData(x=torch.full_like(data.x, float("inf")), y=data.y)
    study, objective = smoke_objective(poisoned)
    study.optimize(objective, n_trials=2)
    assert [t.state for t in study.trials] == [TrialState.PRUNED, TrialState.PRUNED]
    for trial in study.trials:
        assert trial.user_attrs["failure"].startswith("diverged: fold 1 loss became non-finite")


def test_a_running_trial_that_never_beat_is_failed_and_retried_after_the_grace_period(
    db: str,
) -> None:
    """A worker killed between claiming a trial and its heartbeat thread's first beat: Optuna
    alone would leave that trial RUNNING for ever, with no heartbeat to judge it by. The
    worker's claim writes the first beat itself, so the trial goes stale like any other."""
    storage = open_storage(db, create=True, heartbeat=1)
    study, _ = create_or_resume(storage, "s", PRESETS["smoke"], budget=3)
    with storage.beating_from_claim():  # as the worker claims its trials
        orphan = study.ask()  # and is killed now: no heartbeat thread ever starts
        orphan.suggest_float("x", 0, 1)
        fresh = study.ask()  # claimed just now: inside the grace period, left alone
    assert {row[0] for row in _heartbeats(db)} == {orphan._trial_id, fresh._trial_id}
    # Its claim's beat made four grace periods ago, by the database's clock.
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        connection.execute(
            "UPDATE trial_heartbeats SET heartbeat = datetime(heartbeat, '-16 seconds') "
            "WHERE trial_id = ?",
            (orphan._trial_id,),
        )
    fail_stale_trials(study)
    after = study.get_trials()
    assert after[orphan.number].state == TrialState.FAIL
    assert after[fresh.number].state == TrialState.RUNNING
    retry = after[-1]
    assert retry.state == TrialState.WAITING
    assert retry.system_attrs["failed_trial"] == orphan.number
    assert retry.params == {"x": after[orphan.number].params["x"]}
    # The worker takes the retry from the queue: that claim beats too.
    with storage.beating_from_claim():
        taken = study.ask()
    assert taken.number == retry.number
    assert taken._trial_id in {row[0] for row in _heartbeats(db)}


def test_a_storage_let_go_is_freed_at_once_with_its_connections(db: str) -> None:
    """Nothing of ours (the claims' listeners included) may hold a storage in a cycle: one
    kept until a garbage collection, which the end of a process need not run in time, left
    an SQLite file's -wal and -shm behind, and a command that only reads changed the folder
    (test_bad_input.py's rows saw it)."""
    import gc
    import weakref

    storage = open_storage(db, create=True, heartbeat=1)
    study, _ = create_or_resume(storage, "s", PRESETS["smoke"], budget=3)
    with storage.beating_from_claim():
        study.ask()
    freed = weakref.ref(storage)
    gc.disable()
    try:
        del storage, study
        assert freed() is None
    finally:
        gc.enable()


def test_an_asked_trial_held_past_the_grace_period_can_still_be_told(db: str) -> None:
    """Ask-and-tell as on Optuna's `RDBStorage`: a trial from `study.ask()` has no
    heartbeat, so a worker's look for stale trials leaves it alone however long it is held
    (before, it was failed and queued again, and `tell` raised "Cannot tell a FAIL trial")."""
    storage = open_storage(db, create=True, heartbeat=1)
    study, _ = create_or_resume(storage, "s", PRESETS["smoke"], budget=3)
    held = study.ask()
    held.suggest_float("x", 0, 1)
    assert _heartbeats(db) == []
    # Claimed four grace periods ago, by any clock.
    long_ago = datetime.now(UTC) - timedelta(seconds=16)
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        connection.execute(
            "UPDATE trials SET datetime_start = ? WHERE trial_id = ?",
            (long_ago.replace(tzinfo=None).isoformat(sep=" "), held._trial_id),
        )
    fail_stale_trials(study)  # what every worker does before each trial
    assert study.get_trials()[held.number].state == TrialState.RUNNING
    study.tell(held, 0.5)
    told = study.get_trials()
    assert [(t.number, t.state, t.value) for t in told] == [(held.number, TrialState.COMPLETE, 0.5)]


def _heartbeats(db: str) -> list[tuple[int, str]]:
    with sqlite3.connect(db.removeprefix("sqlite:///")) as connection:
        return connection.execute("SELECT trial_id, heartbeat FROM trial_heartbeats").fetchall()


def test_every_storage_method_the_retry_wraps_is_still_optunas() -> None:
    """The retry wraps `RDBStorage`'s methods by name, private ones too: an Optuna that
    renamed or dropped one would leave that call unretried without a word."""
    missing = [name for name in RETRIED_CALLS if not callable(getattr(RDBStorage, name, None))]
    assert not missing, (
        f"optuna {optuna.__version__}'s RDBStorage has no {', '.join(missing)}: "
        "study/resilient_storage.py retries these calls by name; find what replaced them "
        "there and update RETRIED_CALLS (and the bound on optuna in pyproject.toml)"
    )
    unwrapped = [
        n for n in RETRIED_CALLS if not hasattr(getattr(ResilientRDBStorage, n), "__wrapped__")
    ]
    assert unwrapped == []


def test_every_database_call_of_optunas_storage_is_retried() -> None:
    """A database call Optuna adds to `RDBStorage` must join the retry (get_trial_user_attrs
    and get_trial_system_attrs, which Optuna's artifacts and constraints call, once had not)."""
    not_database_calls = {
        "get_heartbeat_interval", "get_heartbeat_stale_trial_callback", "remove_session",
        # Schema migration, run by hand (`optuna storage upgrade`), never by mnist-study.
        "upgrade", "get_current_version", "get_head_version", "get_all_versions",
        "record_heartbeat",  # retried inside, where a failure may not raise
    }  # fmt: skip
    public = {name for name, value in vars(RDBStorage).items() if callable(value)}
    public = {name for name in public if not name.startswith("_")}
    assert sorted(public - set(RETRIED_CALLS) - not_database_calls) == [], (
        f"optuna {optuna.__version__}'s RDBStorage has calls ResilientRDBStorage does not "
        "retry: add them to RETRIED_CALLS in study/resilient_storage.py"
    )


def _lost_connection() -> optuna.exceptions.StorageInternalError:
    from sqlalchemy.exc import OperationalError

    try:
        raise OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    except OperationalError as cause:
        error = optuna.exceptions.StorageInternalError("during the commit")
        error.__cause__ = cause
        return error


def _lost_mid_query() -> optuna.exceptions.StorageInternalError:
    """A connection lost mid-query, as it surfaced once under test: SQLAlchemy then
    refuses the fallback query in the broken transaction, and Optuna wraps that."""
    from sqlalchemy.exc import InvalidRequestError

    try:
        try:
            raise _lost_connection().__cause__  # type: ignore[misc]
        except Exception:
            # Implicitly chained, as SQLAlchemy raises it.
            raise InvalidRequestError("Can't reconnect until invalid transaction is rolled back")  # noqa: B904
    except InvalidRequestError as refused:
        error = optuna.exceptions.StorageInternalError("during the commit")
        error.__cause__ = refused
        return error


class FakeClock:
    """Stands in for the `time` module the retry loop reads: `sleep` only moves `monotonic`
    on, so the loop's backoff and deadline are exact and cost no wall-clock time however
    loaded the machine is."""

    def __init__(self) -> None:
        # From 0, the loop's sums of its delays land exactly on its deadline.
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_a_storage_call_rides_out_a_lost_connection_and_gives_up_in_one_line(
    db: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "s", PRESETS["smoke"], budget=3)
    clock = FakeClock()
    monkeypatch.setattr(resilient_storage, "time", clock)
    real_session = storage.scoped_session
    failures: Iterator[Exception] = iter([_lost_connection(), _lost_mid_query()])
    attempts: list[float] = []  # the fake time of each attempt
    # Only a hang guard, should the loop stop reading the fake clock and so never reach
    # its deadline: the most attempts any step below is allowed.
    most_attempts = 20

    def flaky_session() -> object:
        # Where Optuna opens every storage call's transaction.
        attempts.append(clock.now)
        if len(attempts) > most_attempts:
            raise AssertionError(f"the retry loop never gave up: {len(attempts)} attempts")
        error = next(failures, None)
        if error is not None:
            raise error
        return real_session()

    monkeypatch.setattr(storage, "scoped_session", flaky_session)
    storage.reconnect_s = 120  # the default wait, whatever $MNIST_STUDY_RECONNECT_S says
    assert [s.study_name for s in storage.get_all_studies()] == ["s"]
    # Two transient failures, each waited out with the backoff's first two delays, then the
    # third attempt succeeds; under QUIET_RETRY_S of outage nothing is said.
    assert attempts == pytest.approx([0.0, 0.05, 0.15])
    assert clock.sleeps == pytest.approx([0.05, 0.1])
    assert capsys.readouterr().err == ""

    # An outage that outlasts the wait: more failures than the loop may attempt.
    failures = iter([_lost_connection()] * 1000)
    storage.reconnect_s = 10
    attempts.clear()
    clock.sleeps.clear()
    began = clock.now
    gave_up = r"failed for 10 s: .*server closed the connection"
    with pytest.raises(StorageError, match=gave_up) as info:
        storage.get_all_studies()
    assert "\n" not in str(info.value)
    # It kept retrying, with delays doubling up to 2 s and the last one cut to the deadline,
    # and gave up at the deadline, on the first attempt there: not before, not after.
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 2.0, 2.0, 2.0, 0.85])
    assert len(attempts) == len(clock.sleeps) + 1 == 11
    assert attempts[-1] - began == pytest.approx(10) and attempts[-2] - began < 10
    # Past QUIET_RETRY_S of it, one line said so, once.
    said = capsys.readouterr().err.splitlines()
    assert len(said) == 1, said
    assert "server closed the connection; retrying for up to 10 s" in said[0]

    # Not every error is worth a retry: a bad request fails at once.
    failures = iter([ValueError("no such thing")])
    attempts.clear()
    clock.sleeps.clear()
    with pytest.raises(ValueError, match="no such thing"):
        storage.get_all_studies()
    assert len(attempts) == 1 and clock.sleeps == []


def test_ending_a_trial_whose_first_commit_went_unacknowledged_is_not_an_error(
    db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection drops after the server committed the trial's end but before the
    worker heard so; the retry finds the trial already ended as asked."""
    storage = open_storage(db, create=True)
    study, _ = create_or_resume(storage, "s", PRESETS["smoke"], budget=3)
    trial = study.ask()
    real = RDBStorage.set_trial_state_values
    calls = []

    def commit_then_drop(self: RDBStorage, trial_id: int, state: TrialState, values=None):
        calls.append(state)
        result = real(self, trial_id, state, values)
        if len(calls) == 1:
            raise _lost_connection()
        return result

    monkeypatch.setattr(RDBStorage, "set_trial_state_values", commit_then_drop)
    assert storage.set_trial_state_values(trial._trial_id, TrialState.COMPLETE, [0.5]) is True
    assert len(calls) == 2
    ended = study.get_trials()[trial.number]
    assert ended.state == TrialState.COMPLETE and ended.value == 0.5


@pytest.mark.parametrize(("value", "wait"), [(None, 120.0), ("0", 0.0), ("7.5", 7.5)])
def test_the_reconnect_wait_comes_from_the_environment(
    value: str | None, wait: float, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if value is None:
        monkeypatch.delenv("MNIST_STUDY_RECONNECT_S", raising=False)
    else:
        monkeypatch.setenv("MNIST_STUDY_RECONNECT_S", value)
    assert open_storage(db, create=True).reconnect_s == wait


@pytest.mark.parametrize("value", ["soon", "-1", "inf", "nan"])
def test_a_bad_reconnect_wait_is_one_line(
    value: str, db: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MNIST_STUDY_RECONNECT_S", value)
    with pytest.raises(StorageError, match=r"MNIST_STUDY_RECONNECT_S = .*: must be a number"):
        open_storage(db, create=True)


def test_processes_opening_a_new_database_at_once_all_get_it(tmp_path: Path) -> None:
    """`run` creating a database while `status` or another `run` opens it: both create
    Optuna's tables, and one finds them 'already exists'. (Threads race just the same.)"""
    import threading

    # Every exception of every thread, of any kind: one left to escape a thread would only
    # be printed by threading's excepthook, and the test would pass.
    raised: list[tuple[str, BaseException]] = []
    # What each thread's storage found: a usable storage of a database with no study.
    opened: list[tuple[str, list[str]]] = []
    lock = threading.Lock()
    for n in range(3):
        path = tmp_path / f"new{n}.db"
        open_storage(f"sqlite:///{path}", create=True, heartbeat=None).engine.dispose()
        path.unlink()  # the same fresh start `run` makes: an empty WAL-mode file
        path.with_name(path.name + "-wal").unlink(missing_ok=True)
        path.with_name(path.name + "-shm").unlink(missing_ok=True)
        with sqlite3.connect(path) as connection:
            connection.execute("PRAGMA journal_mode=WAL")

        def open_it(url: str = f"sqlite:///{path}") -> None:
            try:
                storage = open_storage(url, heartbeat=None)
                names = [s.study_name for s in storage.get_all_studies()]
                storage.engine.dispose()
                with lock:
                    opened.append((url, names))
            except BaseException as exc:
                with lock:
                    raised.append((url, exc))

        threads = [threading.Thread(target=open_it) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            # Only a hang guard: a thread waits for SQLite's lock for at most 120 s.
            thread.join(timeout=300)
        assert not any(thread.is_alive() for thread in threads), "a thread never returned"
    assert [(url, repr(exc)) for url, exc in raised] == []
    assert sorted(opened) == sorted(
        (f"sqlite:///{tmp_path / f'new{n}.db'}", []) for n in range(3) for _ in range(6)
    )
    for n in range(3):
        with sqlite3.connect(tmp_path / f"new{n}.db") as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
        assert {"studies", "trials", "version_info"} <= tables


def test_optunas_fallback_warning_about_a_lost_connection_is_not_shown(db: str) -> None:
    import logging

    open_storage(db, create=True)
    logger = logging.getLogger("optuna.storages._rdb.storage")
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logger.addHandler(handler)
    try:
        logger.warning("Caught an error from sqlalchemy: server closed the connection. Falling")
        logger.warning("something else")
    finally:
        logger.removeHandler(handler)
    assert seen == ["something else"]


def test_a_gpu_worker_stacks_as_many_trials_as_the_widest_network_of_its_space_allows() -> None:
    from study.worker import default_trials_per_worker

    assert {name: default_trials_per_worker("cpu", p) for name, p in PRESETS.items()} == {
        name: 1 for name in PRESETS
    }
    gpu = {name: default_trials_per_worker("cuda", p) for name, p in PRESETS.items()}
    # The report's space at full batch, then at mini-batches; wide's widest trial is 3
    # networks of 784-4096-4096-4096-4096-10 (53.6 M parameters, 20 bytes each): 3.2 GB,
    # so 16 GB hold 4 of them.
    assert gpu == {
        "quick": 16, "seed": 8, "smoke": 16, "tiny": 8, "wide": 4, "wide-smoke": 16,
    }  # fmt: skip


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_counts_from_the_database_equal_those_from_every_trial_in_every_state(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """The budget's counts come from grouped queries (`ResilientRDBStorage.trial_tally`);
    they must equal what reading every trial gives (`count_every_trial`), for trials in
    every state, failures queued again and not, trials added through Optuna's own API
    (add_trial, enqueue_trial, ask and tell), ties for the best value and infinities."""
    from study.budget import count_every_trial
    from study.retrain import best_finished_trial

    url = (
        f"sqlite:///{tmp_path / 'optuna.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    storage = open_storage(url, create=True)
    study, _ = create_or_resume(storage, "s", PRESETS["tiny"], budget=30, seed=3)

    def assert_counts_agree() -> None:
        fast, slow = count_trials(study), count_every_trial(study)
        assert fast == slow
        assert (fast.best is None) == (slow.best is None)
        if fast.best is not None:
            assert (fast.best.number, fast.best.value) == (slow.best.number, slow.best.value)
            # retrain's look-up asks the database the same question.
            best = best_finished_trial(study)
            assert (best.number, best.value) == (slow.best.number, slow.best.value)
        else:
            with pytest.raises(StudyError, match="no finished trial to retrain yet"):
                best_finished_trial(study)

    assert_counts_agree()  # empty: no best
    for value in (0.5, 0.7, 0.7, 0.2):  # a tie for the best: the first of them wins
        trial = study.ask()
        study.tell(trial, value)
    assert_counts_agree()
    assert count_trials(study).best.number == 1
    study.tell(study.ask(), state=TrialState.PRUNED)
    study.tell(study.ask(), state=TrialState.FAIL)  # failed, not queued again
    interrupted = study.ask()
    study.tell(interrupted, state=TrialState.FAIL)
    requeue(study, interrupted.number)  # failed, and queued again: counted as retried
    study.ask()  # left running
    study.enqueue_trial({"n_units_l0": 10})  # waiting
    study.add_trial(
        optuna.trial.create_trial(
            params={}, distributions={}, value=float("inf"), state=TrialState.COMPLETE
        )
    )
    study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL))
    assert_counts_agree()
    counts = count_trials(study)
    assert (counts.complete, counts.pruned, counts.failed, counts.retried) == (5, 1, 2, 1)
    assert counts.best.value == float("inf")


def test_a_worker_on_a_history_free_study_claims_without_reading_every_trial(
    tmp_path: Path,
) -> None:
    """Optuna's cache in front of an RDBStorage reads every trial on a process's first
    `ask`: 189 s at 100,000 trials. A study whose sampler and pruner read no history (the
    seed preset's prior sampler, no pruner) is loaded without it, so a joining worker's
    claim reads only what it asks for; one with TPE or the median pruner keeps it."""
    from benchmarks.scale import fill
    from study.worker import _claim

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage = open_storage(url, create=True)
    create_or_resume(storage, "seed", PRESETS["seed"], budget=1000, seed=1)
    create_or_resume(storage, "quick", PRESETS["quick"], budget=1000, seed=1)
    fill(storage, load_study(storage, "seed"), 300)

    joining = open_storage(url)
    study = load_study(joining, "seed")
    assert study._storage is joining
    assert load_study(joining, "quick")._storage is not joining  # cached: the median pruner
    asked: list[object] = []
    everything = joining.get_all_trials

    def recorded(study_id: int, deepcopy: bool = True, states: object = None) -> list:  # type: ignore[type-arg]
        asked.append(states)
        return everything(study_id, deepcopy=deepcopy, states=states)

    joining.get_all_trials = recorded  # type: ignore[method-assign]
    fail_stale_trials(study)
    (trial,) = _claim(study, joining, 1)
    assert trial.number == 300
    assert asked and all(states is not None for states in asked), asked  # filtered reads only
    requeue(study, 0)  # a finished trial: nothing to queue, and one trial read
    assert all(states is not None for states in asked), asked


def test_a_trial_failed_as_stale_by_another_worker_mid_training_stops_its_stack_not_its_worker(
    tmp_path: Path,
) -> None:
    """On a starved machine a live worker's heartbeat can go unheard for the grace period;
    another worker then fails its trial and queues it again. The worker training it is
    refused its next write: it queues the trial's stack-mates again, says so, and goes
    on (it used to end with UpdateFinishedTrialError)."""
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", create=True)
    create_or_resume(storage, "s", PRESETS["smoke"], budget=10, seed=1)
    study = load_study(storage, "s")
    lines: list[str] = []
    taken: list[int] = []

    def another_worker_fails_the_first_as_stale() -> bool:
        if not taken:
            taken.append(trials[0].number)
            storage.set_trial_state_values(trials[0]._trial_id, TrialState.FAIL)
            requeue(study, trials[0].number)  # as the other worker's stale check does
        return False

    objective = Objective(
        PRESETS["smoke"],
        synthetic_data(4000),
        worker="test-worker",
        should_stop=another_worker_fails_the_first_as_stale,
        log=lines.append,
        speed=SpeedOptions(trials_per_worker=2, checkpoint_every=None),
    )
    trials = [study.ask(), study.ask()]
    objective.run_trials(study, trials)  # returns: the worker goes on
    after = study.get_trials()
    assert [t.state for t in after[:2]] == [TrialState.FAIL, TrialState.FAIL]
    retries = {t.system_attrs["failed_trial"] for t in after[2:]}
    assert retries == {0, 1}  # each queued again once: by the other worker, and here
    assert all(t.state == TrialState.WAITING for t in after[2:]) and len(after) == 4
    assert lines == [
        "trial 0 was failed as stale by another worker while this one trained it (its "
        "heartbeat went unheard for the grace period) and was queued again there",
        "trial 1, in the same stack, is queued again",
    ]
    assert objective.in_hand == []
