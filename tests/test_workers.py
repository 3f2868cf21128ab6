"""Several processes on one SQLite file: sharing a budget, surviving SIGKILL and Ctrl-C.

Real `mnist-study` processes on real MNIST with the `smoke` preset (about a second a
trial) and a 1-second heartbeat, so a dead worker's trial is found stale in 4 seconds.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from model.data import Mnist, default_root
from study.presets import PRESETS
from study.storage import (
    StorageError,
    StudyError,
    count_trials,
    create_or_resume,
    load_study,
    open_storage,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

HEARTBEAT = "1"
WAIT_S = 180


@pytest.fixture
def db(tmp_path: Path, mnist: Mnist) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


def new_study(db: str, name: str, budget: int, seed: int = 5) -> None:
    create_or_resume(
        open_storage(db, create=True), name, PRESETS["smoke"], budget=budget, seed=seed
    )


def mnist_study(*args: str, db: str, log: Path, new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "MNIST_STUDY_STORAGE": db}
    return subprocess.Popen(
        [sys.executable, "-m", "study", *args, "--root", str(default_root().resolve())],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=new_session,
    )


def worker(db: str, study: str, log: Path) -> subprocess.Popen:
    return mnist_study(
        "worker", "--study", study, "--heartbeat", HEARTBEAT, "--threads", "1", db=db, log=log
    )


def trials(db: str, study: str) -> list[FrozenTrial]:
    return load_study(open_storage(db, heartbeat=None), study).get_trials()


def wait_for_a_trial_in_progress(db: str, study: str, proc: subprocess.Popen) -> FrozenTrial:
    """A running trial past its parameters and first heartbeat (so, training)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process exited before a trial was caught running"
        try:
            found = trials(db, study)
        except (StorageError, StudyError):  # `run` has not created it yet
            found = []
        for t in found:
            age = (datetime.now() - t.datetime_start).total_seconds() if t.datetime_start else 0
            if t.state == TrialState.RUNNING and age > 0.02 and len(t.params) == 7:
                return t
        time.sleep(0.05)
    raise AssertionError("no trial was seen running")


def finished_snapshot(db: str, study: str) -> dict[int, tuple]:
    return {
        t.number: (t.state, t.value, t.params, t.user_attrs)
        for t in trials(db, study)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }


def test_two_workers_share_one_budget_without_repeats_or_lock_errors(
    db: str, tmp_path: Path
) -> None:
    new_study(db, "shared", budget=10)
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [worker(db, "shared", log) for log in logs]
    for proc in procs:
        assert proc.wait(timeout=WAIT_S) == 0
    done = trials(db, "shared")
    counts = count_trials(load_study(open_storage(db, heartbeat=None), "shared"))
    # Documented overshoot: at most workers - 1 = 1 trial past the budget.
    assert 10 <= counts.finished <= 11
    assert counts.failed == 0 and counts.running == 0
    param_sets = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(param_sets)) == len(param_sets)
    assert len({t.user_attrs["worker"] for t in done}) == 2
    for log in logs:
        text = log.read_text()
        assert "database is locked" not in text, text
        assert "Traceback" not in text, text


def test_a_worker_killed_mid_trial_has_its_trial_retried_with_the_same_parameters(
    db: str, tmp_path: Path
) -> None:
    new_study(db, "killed", budget=5)
    proc = worker(db, "killed", tmp_path / "w.log")
    victim = wait_for_a_trial_in_progress(db, "killed", proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    before = finished_snapshot(db, "killed")
    assert trials(db, "killed")[victim.number].state == TrialState.RUNNING  # left stale

    rerun = mnist_study(
        "run", "--preset", "smoke", "--study", "killed", "--heartbeat", HEARTBEAT, "--no-retrain",
        db=db, log=tmp_path / "run.log",
    )  # fmt: skip
    assert rerun.wait(timeout=WAIT_S) == 0, (tmp_path / "run.log").read_text()

    after = trials(db, "killed")
    assert after[victim.number].state == TrialState.FAIL
    retries = [t for t in after if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert retries[0].params == victim.params
    now = finished_snapshot(db, "killed")
    assert {n: now[n] for n in before} == before  # nothing finished was lost or changed
    counts = count_trials(load_study(open_storage(db, heartbeat=None), "killed"))
    assert counts.finished == 5 and counts.retried == 1


def test_ctrl_c_on_run_stops_it_and_the_same_command_resumes(db: str, tmp_path: Path) -> None:
    args = ("run", "--preset", "smoke", "--study", "stopped", "--n-trials", "6", "--seed", "3",
            "--no-retrain")  # fmt: skip
    run = mnist_study(*args, "--heartbeat", HEARTBEAT, db=db, log=tmp_path / "run1.log",
                      new_session=True)  # fmt: skip
    wait_for_a_trial_in_progress(db, "stopped", run)
    started = time.monotonic()
    run.send_signal(signal.SIGINT)
    assert run.wait(timeout=30) == 130
    assert time.monotonic() - started < 15
    log = (tmp_path / "run1.log").read_text()
    assert "interrupted" in log and "Traceback" not in log
    interrupted = trials(db, "stopped")
    assert not [t for t in interrupted if t.state == TrialState.RUNNING]
    queued = [t for t in interrupted if t.state == TrialState.WAITING]
    assert len(queued) == 1  # the trial in hand, queued again with its parameters
    original = interrupted[queued[0].system_attrs["failed_trial"]]
    assert original.state == TrialState.FAIL and original.params == queued[0].params
    before = finished_snapshot(db, "stopped")

    again = mnist_study(*args, db=db, log=tmp_path / "run2.log")
    assert again.wait(timeout=WAIT_S) == 0, (tmp_path / "run2.log").read_text()
    assert "resuming study 'stopped'" in (tmp_path / "run2.log").read_text()
    now = finished_snapshot(db, "stopped")
    assert {n: now[n] for n in before} == before
    assert count_trials(load_study(open_storage(db, heartbeat=None), "stopped")).finished == 6
