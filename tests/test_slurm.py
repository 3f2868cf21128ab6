"""`run --slurm` on a real SLURM: a throwaway one-node cluster (tests/slurmcluster.py) and a
throwaway PostgreSQL, small studies run as arrays of one-CPU tasks, each task's worker
cut the ways a cluster cuts one — SIGKILL, a cancel, its time limit, a preemption — and
the study finished exactly its budget with every trial accounted for.

`.ci/run` sets MNIST_STUDY_REQUIRE_SLURM, so that there these tests fail, not skip,
when the cluster cannot start. They run on one pytest-xdist worker (`xdist_group`), so
that one cluster serves them all.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
from optuna.storages import RDBStorage
from optuna.trial import FrozenTrial, TrialState

from model.data import Mnist, default_root
from study.budget import count_trials
from study.database import open_storage
from study.errors import StorageError, StudyError
from study.presets import PRESETS
from study.studies import create_or_resume, list_studies, load_study
from tests.slurmcluster import SlurmCluster
from tests.test_resume import LONG_TRIALS
from tests.test_workers import (
    HEARTBEAT,
    _no_strays,  # noqa: F401  (kills what a test started, pass or fail)
    _started,
)

pytestmark = pytest.mark.xdist_group("slurm")

WAIT_S = 240
ONE_CPU = ("--cpus-per-task=1",)
# Trials of 60 epochs exactly (no early stopping) on 4,000 images, about 4 s each on one
# core (of which the last half second is the tell): long enough to be caught mid-trial,
# short enough to finish a few.
EVEN_TRIALS = (
    LONG_TRIALS.replace("subset = 1000", "subset = 4000")
    .replace("max_epochs = 80", "max_epochs = 60")
    .replace("patience = 20", "patience = 60")
)


@pytest.fixture
def cluster(slurm_cluster: SlurmCluster, monkeypatch: pytest.MonkeyPatch) -> Iterator[SlurmCluster]:
    """The session's cluster, for the processes a test starts; no job left behind."""
    monkeypatch.setenv("SLURM_CONF", str(slurm_cluster.conf))
    yield slurm_cluster
    slurm_cluster.cancel_all()


@pytest.fixture
def space(tmp_path: Path) -> Path:
    path = tmp_path / "even.toml"
    path.write_text(EVEN_TRIALS)
    return path


def submit(
    *args: str, db: str, log: Path, sbatch: Sequence[str] = ONE_CPU, new_session: bool = False
) -> subprocess.Popen:
    """`mnist-study run --slurm ARGS -- SBATCH` in the log's folder (its slurm-logs/ go
    there); stderr to `log`, stdout beside it."""
    command = [sys.executable, "-m", "study", "run", "--slurm", "--heartbeat", HEARTBEAT,
               "--root", str(default_root().resolve()), *args, "--", *sbatch]  # fmt: skip
    proc = subprocess.Popen(
        command,
        env={**os.environ, "MNIST_STUDY_STORAGE": db},
        cwd=log.parent,
        stdout=log.with_suffix(".stdout").open("w"),
        stderr=log.open("w"),
        start_new_session=new_session,
    )
    _started.append(proc)
    return proc


def job_of(log: Path, proc: subprocess.Popen) -> str:
    """The array's job ID, once `run` has said it submitted one."""
    found = wait_for(
        lambda: re.search(r"submitted job array (\d+)", log.read_text()), proc, "a submission"
    )
    return found.group(1)


def wait_for(condition: Callable[[], object], proc: subprocess.Popen, what: str) -> object:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        try:
            found = condition()
        except (StorageError, StudyError):  # not created yet
            found = None
        if found:
            return found
        assert proc.poll() is None, f"run ended before {what}"
        time.sleep(0.1)
    raise AssertionError(f"no {what} within {WAIT_S} s")


@functools.cache
def _storage(db: str) -> RDBStorage:
    return open_storage(db, heartbeat=None)


def trials(db: str, study: str) -> list[FrozenTrial]:
    """The study's trials, through one storage per database: a poll every 0.1 s that
    opened a storage each time would see a 3-second trial a few times only."""
    return load_study(_storage(db), study).get_trials()


def training(db: str, study: str, count: int = 1, before: int = 30) -> list[FrozenTrial]:
    """The running trials past their 2nd epoch and not past `before` (of 60: with some
    way to go), if `count` are."""
    running = [
        t for t in trials(db, study)
        if t.state == TrialState.RUNNING and 2 < len(t.intermediate_values) <= before
    ]  # fmt: skip
    return running if len(running) >= count else []


def task_pids(job: str, task: int) -> list[int]:
    """The processes of an array task: those whose environment SLURM gave its IDs."""
    wanted = {f"SLURM_ARRAY_JOB_ID={job}".encode(), f"SLURM_ARRAY_TASK_ID={task}".encode()}
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if wanted <= set(environ.read_bytes().split(b"\0")):
                pids.append(int(environ.parent.name))
    assert pids, f"no process of task {job}_{task}"
    return pids


def task_logs(folder: Path) -> str:
    return "\n".join(p.read_text() for p in sorted((folder / "slurm-logs").glob("*.out")))


def assert_every_cut_trial_finished_by_its_retry(db: str, study: str, budget: int) -> None:
    """Exactly the budget finished; each failed trial's retry, with its parameters, did."""
    done = trials(db, study)
    counts = count_trials(load_study(open_storage(db, heartbeat=None), study))
    assert counts.finished == budget and counts.running == 0 and counts.waiting == 0, counts
    for cut in (t for t in done if t.state == TrialState.FAIL):
        (retry,) = [t for t in done if t.system_attrs.get("failed_trial") == cut.number]
        assert retry.params == cut.params
        assert retry.state in (TrialState.COMPLETE, TrialState.FAIL), retry.state


def test_a_task_at_its_time_limit_checkpoints_its_trial_and_the_same_command_resumes_it(
    cluster: SlurmCluster, postgres_url: str, tmp_path: Path, space: Path, mnist: Mnist
) -> None:
    """(First, as the longest: a minute and up to the 30 s SLURM takes to notice.) SLURM's
    shortest time limit, one minute: at it the task's worker gets SIGTERM,
    checkpoints the trial in training at its epoch's end and queues it again; `run` says
    the array ended before the budget; the same command, with the budget now one past
    what finished, resumes the trial from that epoch."""
    args = ("--space", str(space), "--study", "even", "--seed", "4", "--no-retrain")
    log = tmp_path / "run1.log"
    run = submit(*args, "--n-trials", "100", db=postgres_url, log=log,
                 sbatch=(*ONE_CPU, "--time=1"))  # fmt: skip
    job = job_of(log, run)
    submitted = time.monotonic()
    # Paused while the minute runs (SIGSTOP), rather than train through it on a core the
    # other tests need; woken 50 s after the submission, before the limit can fall (a
    # minute after the task's start, which is later), to be training when it does.
    wait_for(lambda: training(postgres_url, "even"), run, "a trial training")
    pids = task_pids(job, 0)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    time.sleep(max(0.0, submitted + 50 - time.monotonic()))
    for pid in pids:
        os.kill(pid, signal.SIGCONT)
    assert run.wait(timeout=WAIT_S) == 1, log.read_text()
    assert "the array's tasks ended before the budget was met" in log.read_text()
    text = task_logs(tmp_path)
    assert "DUE TO TIME LIMIT" in text, text
    (number,) = re.findall(r"trial (\d+) was checkpointed on SIGTERM and is queued again", text)
    (cut,) = [t for t in trials(postgres_url, "even") if t.state == TrialState.FAIL]
    assert cut.number == int(number)
    finished = count_trials(load_study(open_storage(postgres_url, heartbeat=None), "even")).finished

    rerun_log = tmp_path / "run2.log"
    rerun = submit(*args, "--n-trials", str(finished + 1), db=postgres_url, log=rerun_log)
    assert rerun.wait(timeout=WAIT_S) == 0, rerun_log.read_text()
    (retry,) = [t for t in trials(postgres_url, "even") if t.system_attrs.get("failed_trial")
                == cut.number]  # fmt: skip
    assert retry.state == TrialState.COMPLETE
    assert retry.user_attrs["resumed_from"]["trial"] == cut.number
    assert retry.user_attrs["resumed_from"]["epoch"] >= 1
    assert_every_cut_trial_finished_by_its_retry(postgres_url, "even", finished + 1)


def test_an_array_of_two_tasks_runs_exactly_the_budget_then_retrains_here(
    cluster: SlurmCluster, postgres_url: str, tmp_path: Path, mnist: Mnist
) -> None:
    log = tmp_path / "run.log"
    run = submit("--preset", "tiny", "--n-trials", "6", "--tasks", "2", db=postgres_url, log=log,
                 sbatch=(*ONE_CPU, "--comment=two words"))  # fmt: skip
    job = job_of(log, run)
    # An option with a blank in it reaches sbatch whole, through the script's quoting.
    assert "Comment=two words" in cluster.run("scontrol", "show", "job", job).stdout
    # The storage URL is in the tasks' environment, never the script SLURM keeps.
    script = cluster.run("scontrol", "write", "batch_script", job, "-").stdout
    assert "exec " in script and "--each-gpu" in script
    assert "postgresql" not in script and "pw-" not in script
    assert run.wait(timeout=WAIT_S) == 0, log.read_text()
    assert_every_cut_trial_finished_by_its_retry(postgres_url, "mnist-tiny", 6)
    done = trials(postgres_url, "mnist-tiny")
    assert all(t.state == TrialState.COMPLETE for t in done) and len(done) == 6
    # Not asserted: that both tasks trained. Under load one task's worker was seen to
    # finish all six tiny trials before the other's had loaded MNIST (that the tasks
    # share a study is the next test's, which catches both training at once).
    logs = sorted((tmp_path / "slurm-logs").glob("*.out"))
    assert [p.name for p in logs] == [f"mnist-tiny-{job}_0.out", f"mnist-tiny-{job}_1.out"]
    for path in logs:
        text = path.read_text()
        assert "the study's budget is met" in text and "Traceback" not in text, text
    out = log.with_suffix(".stdout").read_text()
    assert "test accuracy" in out and "report: " in out, out
    assert "Traceback" not in log.read_text()
    assert not cluster.tasks(job)


def test_a_killed_task_s_trial_is_finished_by_another_and_ctrl_c_then_the_same_command_resumes(
    cluster: SlurmCluster, postgres_url: str, tmp_path: Path, space: Path, mnist: Mnist
) -> None:
    """One task SIGKILLed: its trial goes stale, is queued again and the other task
    trains it. Then Ctrl-C on `run`: it cancels the array, whose worker
    checkpoints its trial on SIGTERM, and the same command submits an array that resumes
    it and finishes the budget."""
    args = ("--space", str(space), "--study", "even", "--n-trials", "4", "--tasks", "2",
            "--seed", "4", "--no-retrain")  # fmt: skip
    log = tmp_path / "run1.log"
    run = submit(*args, db=postgres_url, log=log, new_session=True)
    job = job_of(log, run)
    held = wait_for(
        lambda: training(postgres_url, "even", count=2, before=50), run, "two trials training"
    )
    # The task's processes SIGKILLed, as the kernel's OOM killer or a lost node would.
    # `scancel --signal=KILL` (with --full too) was seen to end a running task as a
    # cancel does here, SIGTERM first: its worker checkpointed its trial.
    for pid in task_pids(job, 1):
        os.kill(pid, signal.SIGKILL)

    def killed_trial_retried() -> bool:
        done = trials(postgres_url, "even")
        failed = [t.number for t in done if t.state == TrialState.FAIL]
        return bool(failed) and any(
            t.system_attrs.get("failed_trial") in failed and t.state == TrialState.COMPLETE
            for t in done
        )

    wait_for(killed_trial_retried, run, "the killed task's trial finished by the other")
    (killed,) = [t for t in trials(postgres_url, "even") if t.state == TrialState.FAIL]
    assert killed.number in {t.number for t in held}
    assert "checkpointed" not in (tmp_path / "slurm-logs" / f"even-{job}_1.out").read_text()
    wait_for(lambda: training(postgres_url, "even"), run, "a trial training after the retry")
    os.kill(run.pid, signal.SIGINT)
    assert run.wait(timeout=WAIT_S) == 130, log.read_text()
    assert f"cancelling job array {job}" in log.read_text()
    assert re.search(r"trial (\d+) was checkpointed on SIGTERM", task_logs(tmp_path))
    assert not cluster.tasks(job)

    rerun_log = tmp_path / "run2.log"
    rerun = submit(*args, db=postgres_url, log=rerun_log)
    assert rerun.wait(timeout=WAIT_S) == 0, rerun_log.read_text()
    assert re.search(r"resumes trial \d+ from its checkpoint at epoch", task_logs(tmp_path))
    assert_every_cut_trial_finished_by_its_retry(postgres_url, "even", 4)
    failed = [t for t in trials(postgres_url, "even") if t.state == TrialState.FAIL]
    assert len(failed) == 2, [t.number for t in failed]  # the killed one, the cancelled one
    assert "Traceback" not in task_logs(tmp_path) + rerun_log.read_text()


def test_a_preempted_task_with_requeue_resumes_its_trial_when_slurm_starts_it_again(
    cluster: SlurmCluster, postgres_url: str, tmp_path: Path, space: Path, mnist: Mnist
) -> None:
    """A preemption that requeues (`scontrol requeue`, as `PreemptMode=REQUEUE` does):
    SIGTERM, the trial checkpointed and queued again; SLURM starts the task again
    (`--requeue`, passed through), and its new worker resumes the trial; `run` waits
    through it and ends with the budget met."""
    args = ("--space", str(space), "--study", "even", "--n-trials", "2", "--seed", "4",
            "--no-retrain")  # fmt: skip
    log = tmp_path / "run.log"
    run = submit(*args, db=postgres_url, log=log, sbatch=(*ONE_CPU, "--requeue"))
    job = job_of(log, run)
    wait_for(lambda: training(postgres_url, "even"), run, "a trial training")
    cluster.run("scontrol", "requeue", f"{job}_0")
    assert run.wait(timeout=WAIT_S) == 0, log.read_text()
    text = task_logs(tmp_path)  # --open-mode=append: both runs of the task
    (number,) = re.findall(r"trial (\d+) was checkpointed on SIGTERM and is queued again", text)
    assert f"resumes trial {number} from its checkpoint at epoch" in text, text
    assert_every_cut_trial_finished_by_its_retry(postgres_url, "even", 2)


@pytest.mark.parametrize(
    ("option", "says"),
    [
        ("--bogus", "sbatch refused the job: sbatch: unrecognized option '--bogus'"),
        ("--partition=nowhere", "sbatch refused the job: sbatch: error: invalid partition"),
    ],
    ids=["unrecognized", "no-such-partition"],
)
def test_an_option_sbatch_refuses_is_one_line_and_submits_and_changes_nothing(
    cluster: SlurmCluster, postgres_url: str, tmp_path: Path, option: str, says: str
) -> None:
    storage = open_storage(postgres_url, create=True, heartbeat=None)
    create_or_resume(storage, "mine", PRESETS["smoke"], budget=3, seed=1)
    for study in ("mine", "new"):
        log = tmp_path / f"{study}.log"
        run = submit("--preset", "smoke", "--study", study, "--n-trials", "9",
                     db=postgres_url, log=log, sbatch=(option,))  # fmt: skip
        assert run.wait(timeout=WAIT_S) == 1, log.read_text()
        (line,) = log.read_text().splitlines()
        assert line.startswith(f"mnist-study run: error: {says}"), line
    assert not cluster.tasks()
    storage = open_storage(postgres_url, heartbeat=None)
    assert list_studies(storage) == ["mine"]
    mine = load_study(storage, "mine")
    assert count_trials(mine).budget == 3 and not mine.trials
    assert not (tmp_path / "slurm-logs").exists()
