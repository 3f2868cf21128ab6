"""The study in one process: storage, creation and resume, budget counting, the objective."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from model.data import DeviceData
from study.objective import Objective
from study.presets import PRESETS
from study.storage import (
    StorageError,
    StudyError,
    count_trials,
    create_or_resume,
    load_study,
    open_storage,
    redact,
    requeue,
)
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


def test_resuming_keeps_the_study_and_a_new_budget_replaces_the_old(db: str) -> None:
    storage = open_storage(db, create=True)
    create_or_resume(storage, "s", PRESETS["smoke"], seed=1)
    study, created = create_or_resume(storage, "s", PRESETS["smoke"], budget=9)
    assert not created
    assert study.user_attrs["budget"] == 9
    assert study.user_attrs["seed"] == 1
    assert isinstance(study.sampler, type(load_study(storage, "s").sampler))
    assert study.sampler.seed == 1


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


def test_passwords_are_masked_in_storage_urls() -> None:
    assert redact("postgresql+psycopg://ann:s3cret@db.example/studies") == (
        "postgresql+psycopg://ann:***@db.example/studies"
    )


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
