"""`mnist-study run --slurm`: a study's workers as one SLURM job array.

`run` creates or resumes the study as it does for local workers, then submits one job
array instead of starting processes: each array task runs `mnist-study worker --each-gpu`,
one worker per GPU the task is given (`study.launcher.task_devices`). The user's own
`sbatch` options (after `--` on the command line) become `#SBATCH` lines of the script,
which `--dry-run` prints. The storage URL reaches the tasks in the environment that
`sbatch` exports from this process, never in the script or a command line.

While the array runs, `run` shows the study's progress from the storage; once the budget
is met it cancels the tasks still pending (those running see the budget met and exit).
Ctrl-C cancels the array: SLURM sends SIGTERM to every process of its tasks, and each
worker checkpoints its trials at the end of the epoch and queues them again, within
SLURM's `KillWait`; the same command submits a new array that resumes them. A time limit
or a preemption sends the same SIGTERM.

SQLite is refused: compute nodes would share its file over a network filesystem, whose
locks SQLite cannot trust. The exception is an array pinned to this host (`--nodelist`
naming it), where the file is local to every task.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from study.artifacts import artifact_dir
from study.budget import StudyCounts, count_trials
from study.database import STORAGE_ENV, sqlite_file
from study.errors import SlurmError, UsageError
from study.launcher import (
    RunOptions,
    RunOutcome,
    open_study,
    watch,
    worker_argv,
)
from study.progress import StudyProgress
from study.worker import WorkerOptions

# How long the tasks get, after Ctrl-C, to checkpoint and exit before `run` stops
# waiting: SLURM's default KillWait (30 s, after which it kills them), and some.
CANCEL_WAIT_S = 45.0
# Between two looks at the array's state: each is one `squeue`, a call to the controller.
SQUEUE_EVERY_S = 2.0
SBATCH_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class SlurmOptions:
    sbatch: tuple[str, ...] = ()
    """The user's `sbatch` options, one argument each, as given after `--`."""
    tasks: int = 1


def check_options(options: RunOptions, slurm: SlurmOptions) -> None:
    """Refuse, in one line, what an array cannot do, before anything is written."""
    given = [option.split("=", 1)[0] for option in slurm.sbatch]
    if "--export" in given:
        raise UsageError(
            "--slurm passes the storage URL to the tasks in the environment sbatch exports; "
            "an --export option would drop it"
        )
    if "--array" in given or "-a" in given:
        raise UsageError("give the number of array tasks as --tasks N, not sbatch's --array")
    if sqlite_file(options.storage) is not None and pinned_host(slurm.sbatch) != _this_host():
        raise UsageError(
            "--slurm needs a storage every node reaches, and SQLite's file would be shared "
            "over a network filesystem, whose locks SQLite cannot trust: use PostgreSQL "
            "(--storage postgresql+psycopg://…; docs/clusters.md), or keep every task on "
            f"this host: -- --nodelist={_this_host()}"
        )


def pinned_host(sbatch: Sequence[str]) -> str | None:
    """The one host `--nodelist`/`-w` pins the tasks to, if the options name exactly one."""
    for i, option in enumerate(sbatch):
        value = None
        if option.startswith("--nodelist="):
            value = option.split("=", 1)[1]
        elif option in ("--nodelist", "-w") and i + 1 < len(sbatch):
            value = sbatch[i + 1]
        elif option.startswith("-w") and len(option) > 2:
            value = option[2:]
        if value is not None:
            return value.split(".")[0] if "," not in value and "[" not in value else None
    return None


def _this_host() -> str:
    return socket.gethostname().split(".")[0]


def job_script(options: RunOptions, slurm: SlurmOptions, logs: Path) -> str:
    """The `sbatch` script of the study's array: its `#SBATCH` lines, then one command."""
    worker = WorkerOptions(
        storage=options.storage,
        study=options.study,
        data_root=options.data_root.resolve(),
        heartbeat=options.heartbeat,
        artifacts=artifact_dir(options.storage, options.artifacts).resolve(),
        speed=options.speed,
    )
    command = [*worker_argv(worker, quiet=False), "--each-gpu"]
    ours = {
        "--job-name": f"mnist-study-{options.study}",
        "--array": f"0-{slurm.tasks - 1}",
        "--output": str(logs / f"{options.study}-%A_%a.out"),
        # A task SLURM starts again (--requeue) adds to its log rather than replace it.
        "--open-mode": "append",
    }
    theirs = _option_lines(slurm.sbatch)
    given = {_SHORT.get(line[0], line[0].split("=", 1)[0]) for line in theirs}
    directives = [[f"{name}={value}"] for name, value in ours.items() if name not in given]
    directives += theirs
    return "\n".join([
        "#!/bin/bash",
        f"# mnist-study: the workers of study {options.study!r}, one per GPU each task is",
        "# given (one on the CPU without). The storage URL is not here: the tasks find it",
        f"# in ${STORAGE_ENV}, which sbatch exports from the submitting shell.",
        *(f"#SBATCH {shlex.join(line)}" for line in directives),
        f"exec {shlex.join(command)}",
        "",
    ])  # fmt: skip


def _option_lines(sbatch: Sequence[str]) -> list[list[str]]:
    """The options one per line, each with the value that follows it (`-J name`)."""
    lines: list[list[str]] = []
    for arg in sbatch:
        if arg.startswith("-") or not lines:
            lines.append([arg])
        else:
            lines[-1].append(arg)
    return lines


# sbatch's short forms of the options the script sets itself, which the user's replace.
_SHORT = {"-J": "--job-name", "-o": "--output", "-a": "--array"}


def _sbatch(script: str, *flags: str, storage: str) -> str:
    """`sbatch` with `script` on its standard input; what it printed on standard output."""
    if shutil.which("sbatch") is None:
        raise SlurmError(
            "--slurm needs SLURM's sbatch, squeue and scancel, and sbatch is not on PATH: "
            "run this on the cluster's login node (or --dry-run prints the script)"
        )
    env = {**os.environ, STORAGE_ENV: storage}
    try:
        done = subprocess.run(
            ["sbatch", *flags], input=script, env=env, capture_output=True, text=True,
            timeout=SBATCH_TIMEOUT_S,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        raise SlurmError(f"sbatch did not answer in {SBATCH_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        raise SlurmError(f"sbatch refused the job: {_first_error(done.stderr)}")
    return done.stdout


def _first_error(stderr: str) -> str:
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "unrecognized" in line]
    return (errors or lines or ["(it printed nothing)"])[0]


def check_script(script: str, storage: str) -> None:
    """Have SLURM check the script's options without submitting it (`--test-only`)."""
    _sbatch(script, "--test-only", storage=storage)


def submit(script: str, storage: str) -> str:
    """Submit the array; its job ID."""
    out = _sbatch(script, "--parsable", storage=storage)
    return out.strip().split(";")[0]


@dataclass
class Array:
    """A submitted array, as `squeue` sees it."""

    job: str
    last_look: float = 0.0
    last_seen: bool = True
    pending_cancelled: bool = False

    def alive(self, counts: StudyCounts) -> bool:
        """Whether any task is pending or running (at most one `squeue` a
        `SQUEUE_EVERY_S`). Once the budget is met, the tasks still pending are cancelled:
        they would only start to find nothing left."""
        if counts.done and not self.pending_cancelled:
            self.pending_cancelled = True
            _scancel("--state=PENDING", self.job)
        now = time.monotonic()
        if now - self.last_look >= SQUEUE_EVERY_S:
            self.last_look = now
            self.last_seen = self.in_queue()
        return self.last_seen

    def in_queue(self) -> bool:
        try:
            done = subprocess.run(
                ["squeue", "--noheader", "--jobs", self.job, "--format=%i"],
                capture_output=True, text=True, timeout=SBATCH_TIMEOUT_S,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            return True  # the controller is busy: the tasks are presumably still there
        if done.returncode != 0:
            # Once the job has left the controller's memory (MinJobAge) squeue says
            # "Invalid job id"; any other failure is taken as the tasks still running.
            return "invalid job id" not in done.stderr.lower()
        return bool(done.stdout.strip())

    def cancel(self, *flags: str) -> None:
        _scancel(*flags, self.job)


def _scancel(*args: str) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired, OSError):
        subprocess.run(["scancel", *args], capture_output=True, timeout=SBATCH_TIMEOUT_S)


def run_array(
    options: RunOptions, slurm: SlurmOptions, logs: Path, log: Callable[[str], None]
) -> RunOutcome:
    """Submit the study's array and show its progress until its tasks have ended."""
    script = job_script(options, slurm, logs)
    # Before the study is created or touched: options SLURM refuses leave nothing behind.
    check_script(script, options.storage)
    study, created = open_study(options, log)
    counts = count_trials(study)
    if counts.done:
        return RunOutcome(study, counts, created)
    logs.mkdir(parents=True, exist_ok=True)
    array = Array(submit(script, options.storage))
    log(
        f"submitted job array {array.job} ({slurm.tasks} task(s)) to SLURM, logs in {logs}; "
        "Ctrl-C cancels it"
    )
    started = time.monotonic()
    defaults = options.preset.defaults
    # The estimate counts a worker per task: how many GPUs each task gets is SLURM's.
    progress = StudyProgress(defaults.max_epochs, defaults.k, slurm.tasks, "the array's devices")
    interrupted = False
    try:
        counts = watch(study, array.alive, started, None, progress)
    except KeyboardInterrupt:
        interrupted = True
        log(
            f"cancelling job array {array.job}: its workers checkpoint their trials and "
            "queue them again (Ctrl-C again stops them at once)"
        )
        array.cancel()
        try:
            _wait_gone(array, CANCEL_WAIT_S)
        except KeyboardInterrupt:
            array.cancel("--signal=INT", "--full")  # the second stop: at once
            with contextlib.suppress(KeyboardInterrupt):
                _wait_gone(array, CANCEL_WAIT_S)
    counts = count_trials(study)
    return RunOutcome(study, counts, created, interrupted, seconds=time.monotonic() - started)


def _wait_gone(array: Array, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while array.in_queue() and time.monotonic() < deadline:
        time.sleep(0.5)
