"""Fault injection: real `mnist-study` processes sharing a study on SQLite and on a real,
throwaway PostgreSQL server, with real signals — SIGKILL, Ctrl-C, the server stopped.

Real MNIST with the `smoke` preset (about a second a trial) or `tiny` (a fraction of one)
and a 1-second heartbeat, so a dead worker's trial is found stale in 4 seconds. Every test
is bounded by WAIT_S per process and kills what it started.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import FrozenTrial, TrialState

from model.data import Mnist, default_root
from study.budget import count_trials
from study.database import open_storage
from study.errors import StorageError, StudyError
from study.presets import PRESETS
from study.resilient_storage import BudgetSpent
from study.sampler import draw_params
from study.studies import create_or_resume, load_study, requeue
from study.worker import _claim
from tests.pgserver import PASSWORD, PgServer

optuna.logging.set_verbosity(optuna.logging.WARNING)

HEARTBEAT = "1"
WAIT_S = 180


@pytest.fixture
def sqlite_db(tmp_path: Path, mnist: Mnist) -> str:
    return f"sqlite:///{tmp_path / 'optuna.db'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path, mnist: Mnist) -> str:
    """The same test on each backend; PostgreSQL is skipped, visibly, without its server."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'optuna.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture(autouse=True)
def _no_strays() -> Iterator[list[subprocess.Popen]]:
    """Kills whatever a test's processes left behind, pass or fail."""
    yield _started
    for proc in _started:
        for pid in [*children(proc.pid), proc.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=10)
    _started.clear()


_started: list[subprocess.Popen] = []


def children(pid: int) -> list[int]:
    """The live child processes of `pid` (the workers a `run` spawned)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(stat.parent.name))
    return found


def mnist_study(*args: str, db: str, log: Path, new_session: bool = False) -> subprocess.Popen:
    env = {**os.environ, "MNIST_STUDY_STORAGE": db}
    proc = subprocess.Popen(
        [sys.executable, "-m", "study", *args, "--root", str(default_root().resolve())],
        env=env,
        # In the test's folder: a PostgreSQL study's artifact store is ./artifacts, which
        # would otherwise be the checkout's own, shared by every test.
        cwd=log.parent,
        stdout=subprocess.DEVNULL,
        stderr=log.open("w"),
        start_new_session=new_session,
    )
    _started.append(proc)
    return proc


def worker(db: str, study: str, log: Path, heartbeat: str = HEARTBEAT) -> subprocess.Popen:
    return mnist_study(
        "worker", "--study", study, "--heartbeat", heartbeat, "--threads", "1", db=db, log=log
    )


def new_study(db: str, name: str, budget: int, seed: int = 5, preset: str = "smoke") -> None:
    create_or_resume(open_storage(db, create=True), name, PRESETS[preset], budget=budget, seed=seed)


def assert_clean_logs(*logs: Path, allowed: str | None = None) -> None:
    """Nothing a user should not see: no traceback, no lock or serialization error. Lines
    holding `allowed` (a notice the test provokes on purpose) are exempt."""
    for log in logs:
        text = log.read_text()
        kept = "\n".join(
            line for line in text.splitlines() if allowed is None or allowed not in line
        )
        for bad in ("Traceback", "database is locked", "could not serialize", "Error"):
            assert bad not in kept, f"{log.name}: {text}"


def assert_shared_without_repeats(db: str, study: str, budget: int, workers: int) -> None:
    done = trials(db, study)
    counts = count_trials(load_study(open_storage(db, heartbeat=None), study))
    # Exactly the budget: the storage refuses a claim past it (`BudgetSpent`).
    assert counts.finished == budget, counts
    assert counts.failed == 0 and counts.retried == 0 and counts.running == 0, counts
    param_sets = [tuple(sorted(t.params.items())) for t in done]
    assert len(set(param_sets)) == len(param_sets)


def trials(db: str, study: str) -> list[FrozenTrial]:
    return load_study(open_storage(db, heartbeat=None), study).get_trials()


def wait_for_a_trial_in_progress(db: str, study: str, proc: subprocess.Popen) -> FrozenTrial:
    """A running trial past its parameters and first heartbeat (so, training)."""
    return wait_for_trials_in_progress(db, study, proc, count=1)[0]


def wait_for_trials_in_progress(
    db: str,
    study: str,
    proc: subprocess.Popen,
    count: int,
    after: list[FrozenTrial] = (),  # type: ignore[assignment]
) -> list[FrozenTrial]:
    """`count` trials running at once, each past its parameters (so, training), none of
    them among `after`."""
    seen = {t.number for t in after}
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the process exited before trials were caught running"
        try:
            found = trials(db, study)
        except (StorageError, StudyError):  # `run` has not created it yet
            found = []
        running = [
            t
            for t in found
            if t.state == TrialState.RUNNING
            and t.number not in seen
            and len(t.params) == 7
            and t.datetime_start is not None
            and (datetime.now(t.datetime_start.tzinfo) - t.datetime_start).total_seconds() > 0.02
        ]
        if len(running) >= count:
            return running[:count]
        time.sleep(0.05)
    raise AssertionError(f"{count} trials were not seen running at once")


def finished_snapshot(db: str, study: str) -> dict[int, tuple]:
    return {
        t.number: (t.state, t.value, t.params, t.user_attrs)
        for t in trials(db, study)
        if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    }


def run_workers_to_the_end(db: str, study: str, n: int, tmp_path: Path) -> list[Path]:
    """`n` workers started at once, each asserted to exit 0; their logs."""
    logs = [tmp_path / f"w{i}.log" for i in range(n)]
    procs = [worker(db, study, log) for log in logs]
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()
    return logs


def test_three_workers_share_one_budget_without_repeats_or_lock_errors(
    db: str, tmp_path: Path
) -> None:
    """Fault test 1, on SQLite and on PostgreSQL."""
    new_study(db, "shared", budget=12, preset="tiny")
    logs = run_workers_to_the_end(db, "shared", 3, tmp_path)
    assert_shared_without_repeats(db, "shared", budget=12, workers=3)
    assert len({t.user_attrs["worker"] for t in trials(db, "shared")}) >= 2
    assert_clean_logs(*logs)


def test_two_workers_on_a_wide_study_draw_the_prior_first_then_tpe_and_never_the_same_trial(
    sqlite_db: str, tmp_path: Path
) -> None:
    """Prior then TPE across processes: which sampler a trial gets depends on its number
    alone, so two workers still give the first N trials exactly the prior's draws, and
    after them TPE's, none repeated."""
    preset = PRESETS["wide-smoke"]
    n_prior, budget = preset.n_prior_trials, preset.n_trials
    new_study(sqlite_db, "wide", budget=budget, seed=6, preset="wide-smoke")
    logs = run_workers_to_the_end(sqlite_db, "wide", 2, tmp_path)
    assert_shared_without_repeats(sqlite_db, "wide", budget=budget, workers=2)
    assert_clean_logs(*logs)
    done = sorted(trials(sqlite_db, "wide"), key=lambda t: t.number)
    assert {t.state for t in done} <= {TrialState.COMPLETE, TrialState.PRUNED}
    assert len({t.user_attrs["worker"] for t in done}) == 2
    prior = draw_params(preset.space, preset.defaults, len(done), 6)
    # Exactly: the workers drew on this machine's numpy kernels, as this process does.
    assert [t.params for t in done[:n_prior]] == prior[:n_prior]
    for trial in done[n_prior:]:  # TPE's: not what the prior would have drawn for it
        assert trial.params != prior[trial.number]
        assert trial.params["dropout"] != prior[trial.number]["dropout"]


def test_eight_workers_on_sqlite_with_tiny_trials_never_see_a_lock_or_a_false_stale(
    sqlite_db: str, tmp_path: Path
) -> None:
    """Fault test 4: eight workers on two cores, trials of a fraction of a second and a
    1-second heartbeat, so the database, not training, is what they queue for."""
    new_study(sqlite_db, "crowd", budget=24, preset="tiny")
    logs = run_workers_to_the_end(sqlite_db, "crowd", 8, tmp_path)
    # No trial failed, so the heartbeat never declared a live one dead.
    assert_shared_without_repeats(sqlite_db, "crowd", budget=24, workers=8)
    assert_clean_logs(*logs)


def test_a_worker_and_then_the_whole_run_killed_lose_nothing_and_rerun_finishes(
    db: str, tmp_path: Path
) -> None:
    """Fault test 2: SIGKILL one worker mid-trial, later `run` and all its workers."""
    args = ("run", "--preset", "smoke", "--study", "killed", "--n-trials", "8", "--seed", "4",
            "--workers", "2", "--heartbeat", HEARTBEAT, "--no-retrain")  # fmt: skip
    run = mnist_study(*args, db=db, log=tmp_path / "run1.log", new_session=True)
    first = wait_for_trials_in_progress(db, "killed", run, count=2)
    workers = children(run.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)  # two trials run, so this worker's is one of them

    # The surviving worker goes on; then everything dies at once, mid-trial again.
    second = wait_for_trials_in_progress(db, "killed", run, count=1, after=first)
    before = finished_snapshot(db, "killed")
    for pid in [run.pid, *children(run.pid)]:
        os.kill(pid, signal.SIGKILL)
    run.wait(timeout=10)
    killed = {t.number: t.params for t in first + second}

    rerun = mnist_study(*args, db=db, log=tmp_path / "run2.log")
    assert rerun.wait(timeout=WAIT_S) == 0, (tmp_path / "run2.log").read_text()
    assert_clean_logs(tmp_path / "run2.log")

    after = trials(db, "killed")
    finished_params = [
        t.params for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
    ]
    for number, params in killed.items():
        if after[number].state == TrialState.FAIL:  # killed mid-trial (not finished in time)
            assert params in finished_params, f"trial {number} was not retried"
    now = finished_snapshot(db, "killed")
    assert {n: now[n] for n in before} == before  # nothing finished was lost or changed
    counts = count_trials(load_study(open_storage(db, heartbeat=None), "killed"))
    assert 8 <= counts.finished <= 9 and counts.running == 0, counts
    assert counts.retried >= 1, counts


def test_a_worker_killed_holding_a_stack_of_three_trials_has_all_three_retried(
    sqlite_db: str, tmp_path: Path
) -> None:
    """One worker stacks three trials at a time; it is SIGKILLed while it trains its second
    stack. All three go stale and are queued again with their own parameters; the first
    stack's results stay as they were; a second worker finishes the budget exactly."""
    new_study(sqlite_db, "stacked", budget=9)
    args = ("worker", "--study", "stacked", "--heartbeat", HEARTBEAT, "--threads", "1",
            "--trials-per-worker", "3")  # fmt: skip
    first = mnist_study(*args, db=sqlite_db, log=tmp_path / "w1.log")
    first_stack = wait_for_trials_in_progress(sqlite_db, "stacked", first, count=3)
    held = wait_for_trials_in_progress(sqlite_db, "stacked", first, count=3, after=first_stack)
    before = finished_snapshot(sqlite_db, "stacked")
    os.kill(first.pid, signal.SIGKILL)
    first.wait(timeout=10)
    assert sorted(before) == sorted(t.number for t in first_stack)  # finished first

    second = mnist_study(*args, db=sqlite_db, log=tmp_path / "w2.log")
    assert second.wait(timeout=WAIT_S) == 0, (tmp_path / "w2.log").read_text()
    assert_clean_logs(tmp_path / "w2.log")
    after = trials(sqlite_db, "stacked")
    for trial in held:
        assert after[trial.number].state == TrialState.FAIL
        retries = [t for t in after if t.system_attrs.get("failed_trial") == trial.number]
        assert len(retries) == 1
        assert retries[0].state == TrialState.COMPLETE
        assert retries[0].params == trial.params
    now = finished_snapshot(sqlite_db, "stacked")
    assert {n: now[n] for n in before} == before  # nothing finished was lost or changed
    counts = count_trials(load_study(open_storage(sqlite_db, heartbeat=None), "stacked"))
    assert (counts.finished, counts.complete, counts.retried, counts.running) == (9, 9, 3, 0)


def test_stacked_trials_are_pruned_each_on_its_own_and_the_budget_is_exact(
    sqlite_db: str, tmp_path: Path
) -> None:
    """A smoke study told to prune with the median pruner (after 4 complete trials, from
    epoch 4 of its 5), run by one worker stacking three trials: 3 + 3 + 3 + 2 claims for
    a budget of 11. Each trial is pruned exactly when its own value falls below the
    median of the trials complete before its stack began."""
    new_study(sqlite_db, "pruned", budget=11, seed=2)
    stored = load_study(open_storage(sqlite_db, heartbeat=None), "pruned")
    stored.set_user_attr("pruner", "median")
    args = ("run", "--preset", "smoke", "--study", "pruned", "--heartbeat", HEARTBEAT,
            "--trials-per-worker", "3", "--no-retrain")  # fmt: skip
    run = mnist_study(*args, db=sqlite_db, log=tmp_path / "run.log")
    assert run.wait(timeout=WAIT_S) == 0, (tmp_path / "run.log").read_text()
    done = trials(sqlite_db, "pruned")
    assert len(done) == 11  # exact: the last claim took only the 2 the budget had left
    # A claim's trials start within moments of each other; stacks, seconds apart.
    by_start = sorted(done, key=lambda t: t.datetime_start)
    sizes = [1]
    for a, b in itertools.pairwise(by_start):
        gap = (b.datetime_start - a.datetime_start).total_seconds()
        if gap > 0.5:
            sizes.append(1)
        else:
            sizes[-1] += 1
    assert sizes == [3, 3, 3, 2]
    pruned = 0
    for trial in done:
        if trial.user_attrs.get("failure", "").startswith("diverged"):
            assert trial.state == TrialState.PRUNED  # ended by its own NaN, not the pruner
            continue
        # The median pruner's rule, replayed: from step 4 on, once 4 trials are complete,
        # prune when the trial's best value so far is below their median at that step.
        earlier = [
            t
            for t in done
            if t.state == TrialState.COMPLETE and t.datetime_complete < trial.datetime_start
        ]
        values = trial.intermediate_values
        last, below = 5, False
        for step in (4, 5):
            median = float(np.median([t.intermediate_values[step] for t in earlier] or [0.0]))
            best = max(values[s] for s in range(1, step + 1))
            if len(earlier) >= 4 and best < median:
                last, below = step, True
                break
        assert sorted(values) == list(range(1, last + 1)), trial.number
        assert trial.state == (TrialState.PRUNED if below else TrialState.COMPLETE), trial.number
        pruned += below
    assert 1 <= pruned < 7  # the pruner acted, on some trials of a stack and not others


def test_three_trials_per_worker_give_the_values_of_one_per_worker(
    sqlite_db: str, tmp_path: Path
) -> None:
    """Stacking changes how trials are trained, not what they learn: the same seed gives
    the same parameters and the same values trial by trial."""
    values = {}
    for per_worker in ("1", "3"):
        db = f"sqlite:///{tmp_path / f'b{per_worker}.db'}"
        args = ("run", "--preset", "smoke", "--seed", "4", "--n-trials", "6",
                "--trials-per-worker", per_worker, "--no-retrain")  # fmt: skip
        log = tmp_path / f"b{per_worker}.log"
        assert mnist_study(*args, db=db, log=log).wait(timeout=WAIT_S) == 0, log.read_text()
        values[per_worker] = [
            (t.number, t.state, t.params, t.value, t.user_attrs["best_epochs"])
            for t in trials(db, "mnist-smoke")
        ]
    assert len(values["3"]) == 6
    for alone, stacked in zip(values["1"], values["3"], strict=True):
        assert stacked[:3] == alone[:3]
        assert stacked[3] == pytest.approx(alone[3], abs=1e-6)
        assert stacked[4] == alone[4]


def test_postgresql_stopped_mid_study_and_started_again_the_workers_carry_on(
    postgres_server: PgServer, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fault test 3: the server goes away for a few seconds; the workers wait and resume."""
    db = postgres_url
    monkeypatch.delenv("MNIST_STUDY_RECONNECT_S", raising=False)  # the default wait, 120 s
    new_study(db, "outage", budget=10)
    # A heartbeat whose grace period (12 s) outlasts the outage: no live trial is failed.
    logs = [tmp_path / f"w{i}.log" for i in range(2)]
    procs = [worker(db, "outage", log, heartbeat="3") for log in logs]
    wait_for_trials_in_progress(db, "outage", procs[0], count=1)
    before = finished_snapshot(db, "outage")
    # Only what the workers print from here on can tell of the outage.
    offsets = [log.stat().st_size for log in logs]
    postgres_server.stop("immediate")
    try:
        # The server stays down until the outage is felt: a worker says it is waiting for
        # the server, which it does after QUIET_RETRY_S of failed attempts.
        felt = wait_for_a_line("retrying for up to", logs, offsets, procs)
    finally:
        postgres_server.start()
    for proc, log in zip(procs, logs, strict=True):
        assert proc.wait(timeout=WAIT_S) == 0, log.read_text()
    now = finished_snapshot(db, "outage")
    assert {n: now[n] for n in before} == before
    assert_shared_without_repeats(db, "outage", budget=10, workers=2)
    assert_clean_logs(*logs, allowed="retrying for up to")
    # That line named the lost server and the wait, and the worker lived through it.
    assert "storage postgresql+psycopg://mnist:***@" in felt and PASSWORD not in felt, felt
    assert "retrying for up to 120 s" in felt, felt


def wait_for_a_line(
    text: str, logs: list[Path], offsets: list[int], procs: list[subprocess.Popen]
) -> str:
    """The first line holding `text` that any of `logs` gets past its offset, once one
    has it; it fails if every process exits first (none can print it then), and after
    WAIT_S (a hang)."""
    deadline = time.monotonic() + WAIT_S
    while True:
        for log, offset in zip(logs, offsets, strict=True):
            with log.open("rb") as file:
                file.seek(offset)
                fresh = file.read().decode(errors="replace")
            for line in fresh.splitlines():
                if text in line:
                    return line
        assert any(proc.poll() is None for proc in procs), "every worker exited first: " + (
            " | ".join(log.read_text() for log in logs)
        )
        assert time.monotonic() < deadline, f"no {text!r} within {WAIT_S} s"
        time.sleep(0.1)


def test_an_outage_longer_than_the_wait_ends_the_worker_in_one_line_and_loses_one_trial_at_most(
    postgres_server: PgServer, postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past $MNIST_STUDY_RECONNECT_S of outage a worker gives up, in one line; once the
    server is back, the next worker retries its trial with the same parameters."""
    db = postgres_url
    new_study(db, "gone", budget=4)
    monkeypatch.setenv("MNIST_STUDY_RECONNECT_S", "3")
    log = tmp_path / "w1.log"
    first = worker(db, "gone", log)
    victim = wait_for_a_trial_in_progress(db, "gone", first)
    before = finished_snapshot(db, "gone")
    postgres_server.stop("immediate")
    try:
        assert first.wait(timeout=60) == 1
    finally:
        postgres_server.start()
    lines = [line for line in log.read_text().splitlines() if line.strip()]
    assert "Traceback" not in log.read_text(), log.read_text()
    assert lines[-1].startswith("mnist-study worker: error: storage postgresql+psycopg://"), lines
    assert "failed for 3 s" in lines[-1] and PASSWORD not in log.read_text()

    second = worker(db, "gone", tmp_path / "w2.log")
    assert second.wait(timeout=WAIT_S) == 0, (tmp_path / "w2.log").read_text()
    after = trials(db, "gone")
    assert after[victim.number].state == TrialState.FAIL
    retries = [t for t in after if t.system_attrs.get("failed_trial") == victim.number]
    assert len(retries) == 1 and retries[0].params == victim.params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    now = finished_snapshot(db, "gone")
    assert {n: now[n] for n in before} == before
    counts = count_trials(load_study(open_storage(db, heartbeat=None), "gone"))
    assert counts.finished == 4 and counts.retried == 1 and counts.running == 0, counts


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["kill-int", "sigterm"])
def test_run_started_with_sigint_ignored_still_stops_on_sigint(
    sqlite_db: str, tmp_path: Path, signum: int
) -> None:
    """A shell starts background jobs with SIGINT ignored, and Python keeps an inherited
    ignore; `run` installs its own handler, so `kill -INT` still stops it cleanly. SIGTERM
    (`kill`, the time limit of a SLURM job that runs `run`) stops it the same way."""
    log = tmp_path / "run.log"
    env = {**os.environ, "MNIST_STUDY_STORAGE": sqlite_db}
    run = subprocess.Popen(
        [sys.executable, "-m", "study", "run", "--preset", "tiny", "--n-trials", "500",
         "--no-retrain", "--root", str(default_root().resolve())],
        env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"), start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )  # fmt: skip
    _started.append(run)
    deadline = time.monotonic() + WAIT_S
    while "worker(s)" not in log.read_text():
        assert run.poll() is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    run.send_signal(signum)
    assert run.wait(timeout=WAIT_S) == 130, log.read_text()
    assert "interrupted" in log.read_text()


def test_ctrl_c_on_run_stops_it_and_the_same_command_resumes(
    sqlite_db: str, tmp_path: Path
) -> None:
    """Fault test 5. The signal lands some moment after a trial was seen training: that
    trial may still be in hand (then it is queued again), or may have ended first (then
    the next trial, if one had begun, is the one queued). Either way nothing is lost."""
    db = sqlite_db
    args = ("run", "--preset", "smoke", "--study", "stopped", "--n-trials", "6", "--seed", "3",
            "--no-retrain")  # fmt: skip
    run = mnist_study(*args, "--heartbeat", HEARTBEAT, db=db, log=tmp_path / "run1.log",
                      new_session=True)  # fmt: skip
    seen = wait_for_a_trial_in_progress(db, "stopped", run)
    run.send_signal(signal.SIGINT)
    # Only a hang guard: a worker that ignored the signal would be killed by `run` after
    # its grace period and leave its trial RUNNING, which the assertions below catch.
    assert run.wait(timeout=WAIT_S) == 130
    log = (tmp_path / "run1.log").read_text()
    assert "interrupted" in log and "Traceback" not in log
    interrupted = trials(db, "stopped")
    by_number = {t.number: t for t in interrupted}
    assert not [t.number for t in interrupted if t.state == TrialState.RUNNING]
    queued = [t for t in interrupted if t.state == TrialState.WAITING]
    failed = [t for t in interrupted if t.state == TrialState.FAIL]
    # One worker (one CPU device), so at most the one trial in its hand was interrupted.
    assert len(queued) <= 1, queued
    # Every interrupted trial failed and was queued again with its parameters, once.
    assert sorted(t.system_attrs["failed_trial"] for t in queued) == [t.number for t in failed]
    for retry in queued:
        assert by_number[retry.system_attrs["failed_trial"]].params == retry.params
    # The trial seen training either ended before the signal or is one of those.
    ended = (TrialState.COMPLETE, TrialState.PRUNED)
    assert by_number[seen.number].state in (*ended, TrialState.FAIL), by_number[seen.number]
    before = finished_snapshot(db, "stopped")

    again = mnist_study(*args, db=db, log=tmp_path / "run2.log")
    assert again.wait(timeout=WAIT_S) == 0, (tmp_path / "run2.log").read_text()
    assert "resuming study 'stopped'" in (tmp_path / "run2.log").read_text()
    now = finished_snapshot(db, "stopped")
    assert {n: now[n] for n in before} == before
    # The queued trials were run, with the parameters they were queued with.
    for retry in queued:
        assert now[retry.number][2] == retry.params, retry.number
    counts = count_trials(load_study(open_storage(db, heartbeat=None), "stopped"))
    assert (counts.finished, counts.failed, counts.retried) == (6, 0, len(queued)), counts
    assert (counts.running, counts.waiting) == (0, 0), counts


def test_the_stack_clock_claims_only_what_it_expects_to_finish_by_the_deadline() -> None:
    from study.worker import STACK_TIME_SAFETY, StackClock

    assert StackClock(None, 50.0).room_for_a_stack(1e9)  # no deadline: always
    assert StackClock(100.0, None).room_for_a_stack(99.0)  # nothing to go by: claims
    assert not StackClock(100.0, None).room_for_a_stack(100.0)  # the deadline has passed
    assert "deadline has passed" in StackClock(100.0, 1.0).why_stopping(100.0)
    clock = StackClock(100.0, 10.0)
    assert clock.room_for_a_stack(100.0 - 10.0 * STACK_TIME_SAFETY)
    assert not clock.room_for_a_stack(100.0 - 10.0 * STACK_TIME_SAFETY + 0.01)
    clock.record(4.0)  # a shorter stack does not lower the expectation
    assert clock.expected() == 10.0 * STACK_TIME_SAFETY
    clock.record(20.0)
    assert clock.expected() == 20.0 * STACK_TIME_SAFETY
    assert "25 s" in clock.why_stopping(90.0) and "10 s are left" in clock.why_stopping(90.0)


@pytest.mark.parametrize("where", ["memory", "sqlite"])
def test_a_fresh_worker_expects_the_longest_of_the_study_s_recent_trials_on_its_device(
    where: str, tmp_path: Path
) -> None:
    """In a database only the recent trials are read (benchmarks/scale.py: reading a
    study of 100,000 whole took 129 s), with the same answer."""
    from study.worker import recent_stack_seconds

    storage = None if where == "memory" else open_storage(f"sqlite:///{tmp_path / 'o.db'}",
                                                          create=True)  # fmt: skip
    study = optuna.create_study(direction="maximize", storage=storage)
    for seconds, device, state in [
        (90.0, "cuda:0", TrialState.COMPLETE),  # too old: 2 × 2 = 4 recent trials count
        (12.0, "cuda:1", TrialState.COMPLETE),
        (30.0, "cpu", TrialState.COMPLETE),  # another kind of device
        (15.0, "cuda:0", TrialState.PRUNED),
        (8.0, "cuda:0", TrialState.COMPLETE),
        (500.0, "cuda:0", TrialState.FAIL),  # interrupted: its time says nothing
        (9.0, "cuda:0", TrialState.COMPLETE),
    ]:
        trial = study.ask()
        trial.set_user_attr("seconds", seconds)
        trial.set_user_attr("device", device)
        study.tell(trial, 0.5 if state == TrialState.COMPLETE else None, state=state)
    assert recent_stack_seconds(study, "cuda", per_claim=2) == 15.0
    assert recent_stack_seconds(study, "cpu", per_claim=2) == 30.0
    assert recent_stack_seconds(optuna.create_study(), "cuda", per_claim=2) is None


def test_run_with_a_timeout_ends_by_it_without_interrupting_a_trial(
    sqlite_db: str, tmp_path: Path
) -> None:
    """`--timeout` is a deadline the workers plan by: each stops claiming stacks once the
    next would end past it, so nothing is interrupted, failed or queued again, and the
    study is left ready to resume."""
    log = tmp_path / "run.log"
    args = ("run", "--preset", "tiny", "--seed", "3", "--n-trials", "1000", "--workers", "2",
            "--trials-per-worker", "2", "--heartbeat", HEARTBEAT, "--timeout", "10",
            "--no-retrain")  # fmt: skip
    assert mnist_study(*args, db=sqlite_db, log=log).wait(timeout=WAIT_S) == 0, log.read_text()
    text = log.read_text()
    assert "stopped by --timeout 10 s" in text
    assert "starting no more trials: a stack is expected to take" in text
    assert_clean_logs(log)
    done = trials(sqlite_db, "mnist-tiny")
    states = {t.state for t in done}
    assert states <= {TrialState.COMPLETE, TrialState.PRUNED}, states
    assert 2 <= len(done) < 1000


def test_a_seed_study_on_the_cpu_shows_its_estimate_and_trial_progress_before_any_finishes(
    sqlite_db: str, tmp_path: Path
) -> None:
    """The report's study on this CPU takes weeks: `run` says so once, from the first
    epochs, and a log shows the running trial's epoch, folds and accuracy long before a
    trial finishes. Ctrl-C then stops it, the study kept."""
    log = tmp_path / "run.log"
    run = mnist_study("run", "--preset", "seed", "--workers", "1", "--no-retrain",
                      db=sqlite_db, log=log, new_session=True)  # fmt: skip
    # The worker stores the epoch, then the folds training: a line read between the two
    # writes lacks the folds (seen once in a make test), and a later one has them.
    progress = r"^trial 0: epoch \d+/2000, 5 of 5 folds training, mean val acc 0\.\d{4}$"
    deadline = time.monotonic() + WAIT_S
    text = ""
    while time.monotonic() < deadline and run.poll() is None:
        text = log.read_text()
        if "estimate: " in text and re.search(progress, text, re.M):
            break
        time.sleep(0.5)
    os.kill(run.pid, signal.SIGINT)
    assert run.wait(timeout=60) == 130, log.read_text()
    estimate = re.search(
        r"^estimate: at [\d.e-]+ epochs/s a trial of up to 2000 epochs takes up to "
        r"[\d.]+ (s|min|h|days) on cpu, so 200 trials with 1 worker\(s\) up to "
        r"[\d.]+ (h|days); going on",
        text,
        re.M,
    )
    assert estimate, text
    assert re.search(progress, text, re.M), text
    assert "[0/200]" in text and "[1/200]" not in text  # no trial had finished


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_claim_past_the_budget_is_refused_but_a_queued_retry_and_ask_and_tell_are_not(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'optuna.db'}"
        if backend == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    storage = open_storage(url, create=True, heartbeat=1)
    study, _ = create_or_resume(storage, "exact", PRESETS["tiny"], budget=3, seed=1)
    claimed = _claim(study, storage, 5)
    assert [t.number for t in claimed] == [0, 1, 2]
    assert _claim(study, storage, 1) == []
    with storage.beating_from_claim(), pytest.raises(BudgetSpent):
        study.ask()
    assert len(study.get_trials(deepcopy=False)) == 3  # the refused trial was rolled back

    study.tell(claimed[0], state=TrialState.FAIL)
    requeue(study, 0)
    retry = _claim(study, storage, 5)
    assert [t.number for t in retry] == [3]
    assert study.get_trials(deepcopy=False)[3].system_attrs["failed_trial"] == 0
    # Outside the workers' claims a new trial is the user's own (ask-and-tell), as before.
    assert study.ask().number == 4


def _two_at_once(url: str, trial_id: int, state: TrialState) -> list[bool | type[Exception]]:
    """Two workers (two storages, two connections) set one trial's state at the same moment:
    each waits inside Optuna's read-check-write, after reading the trial, for the other to
    have read it too (at most a second). What each call gave: True, False or the error."""
    storages = [open_storage(url, heartbeat=None) for _ in range(2)]
    read = [threading.Event(), threading.Event()]
    for me, storage in enumerate(storages):
        original = storage.check_trial_is_updatable

        def check(trial_id: int, trial_state: TrialState, me: int = me, original=original) -> None:
            read[me].set()
            read[1 - me].wait(timeout=1.0)
            original(trial_id, trial_state)

        storage.check_trial_is_updatable = check  # type: ignore[method-assign]

    def call(storage: optuna.storages.RDBStorage) -> bool | type[Exception]:
        try:
            return storage.set_trial_state_values(trial_id, state=state)
        except optuna.exceptions.UpdateFinishedTrialError as exc:
            return type(exc)

    with ThreadPoolExecutor(2) as pool:
        return sorted(pool.map(call, storages), key=str)


def test_two_workers_failing_one_stale_trial_at_once_fail_it_once(db: str) -> None:
    # Both finding the trial RUNNING and both failing it would queue it again twice: a
    # trial past the budget (benchmarks/load.py once counted 41 of 40 on SQLite).
    storage = open_storage(db, create=True, heartbeat=None)
    study, _ = create_or_resume(storage, "race", PRESETS["tiny"], budget=3, seed=1)
    trial = study.ask()
    outcomes = _two_at_once(db, trial._trial_id, TrialState.FAIL)
    assert outcomes == [optuna.exceptions.UpdateFinishedTrialError, True]


def test_two_workers_taking_one_queued_trial_at_once_take_it_once(db: str) -> None:
    # Both taking the retry would train it twice, and tell it twice.
    storage = open_storage(db, create=True, heartbeat=None)
    study, _ = create_or_resume(storage, "race", PRESETS["tiny"], budget=3, seed=1)
    study.enqueue_trial({})
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))[0]
    outcomes = _two_at_once(db, waiting._trial_id, TrialState.RUNNING)
    assert outcomes == [False, True]


def test_workers_claiming_at_once_on_postgresql_take_exactly_the_budget(
    postgres_url: str,
) -> None:
    budget, claimers = 40, 8
    storage = open_storage(postgres_url, create=True, heartbeat=1)
    create_or_resume(storage, "exact", PRESETS["tiny"], budget=budget, seed=1)
    start = threading.Barrier(claimers)

    def claim_until_refused() -> list[int]:
        own = open_storage(postgres_url, heartbeat=1)
        study = load_study(own, "exact")
        numbers: list[int] = []
        start.wait()
        # Bounded, so that a claim that is never refused fails the test rather than hangs.
        while len(numbers) < budget and (trials := _claim(study, own, 1)):
            numbers += [t.number for t in trials]
        return numbers

    with ThreadPoolExecutor(claimers) as pool:
        taken = [n for numbers in pool.map(lambda _: claim_until_refused(), range(claimers))
                 for n in numbers]  # fmt: skip
    assert sorted(taken) == list(range(budget))
    counts = count_trials(load_study(storage, "exact"))
    assert (counts.running, counts.unclaimed) == (budget, 0)
