"""`mnist-study run`: create or resume a study, start its workers, watch it to the end.

The workers are ordinary `mnist-study worker` processes — the same program a user starts
by hand on another host — each pinned to one device; on the CPU they share the cores out.
They run in their own process sessions, so Ctrl-C reaches only this process, which passes
one SIGINT to each worker: a worker checkpoints its trials at the end of their epoch and
queues them again, leaving the study ready to resume from there (`study.checkpoints`); a
second Ctrl-C is passed on too, and stops them at once. SIGTERM (`kill`, a SLURM time
limit) stops `run` as Ctrl-C does; the workers ignore SIGTERM and wait for their parent's
SIGINT, so that a signal sent to the whole job reaches each of them once.
`--timeout` is a deadline the workers know from the start: they claim no stack of trials
that they expect to end past it, and at the deadline a worker checkpoints the trials it is
still training at the end of their epoch, queues them again and exits. The storage
URL reaches the workers through the environment, never their command lines, where `ps`
would show a password.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import optuna

from model.data import ensure_mnist
from model.device import resolve_device
from study.budget import StudyCounts, count_trials
from study.database import DEFAULT_HEARTBEAT, STORAGE_ENV, open_storage
from study.errors import EXIT_FAILURE, EXIT_INTERRUPTED, redact
from study.objective import SpeedOptions
from study.presets import Preset
from study.progress import StudyProgress, remaining_seconds, running_trials
from study.studies import create_or_resume
from study.worker import WorkerOptions

POLL_S = 1.0
# How long workers get to checkpoint their trials at the epoch's end and queue them again
# after Ctrl-C before they are killed; after a second Ctrl-C, to queue them at once.
STOP_GRACE_S = 20.0
AT_ONCE_GRACE_S = 5.0


@dataclass(frozen=True)
class RunOptions:
    storage: str
    study: str
    preset: Preset
    n_trials: int | None = None
    workers: int | None = None
    devices: tuple[str, ...] | None = None
    seed: int | None = None
    timeout: float | None = None
    data_root: Path = Path("data")
    heartbeat: int = DEFAULT_HEARTBEAT
    artifacts: Path | None = None
    workers_per_device: int | None = None
    speed: SpeedOptions = field(default_factory=SpeedOptions)


@dataclass(frozen=True)
class RunOutcome:
    study: optuna.Study
    counts: StudyCounts
    created: bool
    interrupted: bool = False
    timed_out: bool = False
    seconds: float = 0.0
    failed_workers: tuple[int, ...] = ()


def plan_workers(
    devices: tuple[str, ...] | None, workers: int | None, per_device: int | None = None
) -> list[tuple[str, int]]:
    """(device, CPU threads) per worker: devices round-robin, the cores shared out evenly.
    `per_device` puts that many workers on each device (small models share a GPU well)."""
    import torch

    if devices:
        chosen = [str(resolve_device(d)) for d in devices]
    elif torch.cuda.is_available():
        chosen = [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    else:
        chosen = ["cpu"]
    n = workers if workers is not None else len(chosen) * (per_device or 1)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads = max(1, (cores or 1) // n)
    return [(chosen[i % len(chosen)], threads) for i in range(n)]


def open_study(options: RunOptions, log: Callable[[str], None]) -> tuple[optuna.Study, bool]:
    """Create the study or resume it, saying which; whether it was created."""
    # Fetch MNIST here, once, rather than have every worker race to fetch it; and before
    # the storage, so that missing data leaves no new study behind.
    ensure_mnist(options.data_root)
    storage = open_storage(options.storage, create=True, heartbeat=options.heartbeat)
    study, created = create_or_resume(
        storage, options.study, options.preset, budget=options.n_trials, seed=options.seed
    )
    counts = count_trials(study)
    where = redact(options.storage)
    if created:
        log(
            f"created study {options.study!r} in {where}: preset {options.preset.name}, "
            f"budget {counts.budget}, seed {study.user_attrs['seed']}"
        )
    else:
        log(
            f"resuming study {options.study!r} in {where}: {counts.finished}/{counts.budget} "
            f"finished, {counts.running} running, {counts.waiting} queued"
        )
    if counts.done:
        log(f"its budget is met; give --n-trials above {counts.budget} to run more")
    return study, created


def run_study(options: RunOptions, log: Callable[[str], None]) -> RunOutcome:
    # A bad device fails here, before anything is written.
    plan = plan_workers(options.devices, options.workers, options.workers_per_device)
    study, created = open_study(options, log)
    counts = count_trials(study)
    if counts.done:
        return RunOutcome(study, counts, created)
    log(f"{len(plan)} worker(s): " + ", ".join(f"{d} ({t} threads)" for d, t in plan))

    started = time.monotonic()
    deadline = None if options.timeout is None else time.time() + options.timeout
    workers = [
        _spawn(options, device, threads, i, deadline) for i, (device, threads) in enumerate(plan)
    ]
    interrupted = timed_out = False
    try:
        defaults = options.preset.defaults
        progress = StudyProgress(defaults.max_epochs, defaults.k, len(plan), plan[0][0])
        alive = lambda counts: _any_alive(workers)  # noqa: E731
        counts = watch(study, alive, started, options.timeout, progress)
        if options.timeout is not None and not counts.done and _any_alive(workers):
            # The workers stop by themselves at the deadline (within an epoch): a signal
            # here could reach one still starting, before its handlers are set.
            timed_out = True
            counts = watch(study, alive, started, None, progress)
        elif options.timeout is not None and not counts.done:
            # Every worker left before the deadline, each because its next stack would
            # have ended past it (exit 0); a worker that failed is reported as such.
            timed_out = all(w.returncode == 0 for w in workers)
    except KeyboardInterrupt:
        interrupted = True
        log("stopping workers; their running trials are queued again")
        _stop(workers)
    counts = count_trials(study)
    failed = tuple(i for i, w in enumerate(workers) if w.returncode not in (0, 130, -signal.SIGINT))
    return RunOutcome(
        study, counts, created, interrupted, timed_out, time.monotonic() - started, failed
    )


def _spawn(
    options: RunOptions, device: str, threads: int, index: int, deadline: float | None
) -> subprocess.Popen:
    worker = WorkerOptions(
        storage=options.storage,
        study=options.study,
        device=device,
        data_root=options.data_root,
        heartbeat=options.heartbeat,
        threads=threads,
        worker_id=f"{socket.gethostname()}:w{index}",
        parent_pid=os.getpid(),
        artifacts=options.artifacts,
        speed=options.speed,
        deadline=deadline,
    )
    return spawn_worker(worker)


def worker_argv(options: WorkerOptions, *, quiet: bool = True) -> list[str]:
    """`options` as a `mnist-study worker` command line, run by this Python. Never the
    storage URL: it goes in the environment (`STORAGE_ENV`), where `ps` cannot show it."""
    command = [sys.executable, "-m", "study", "worker", "--study", options.study]
    if options.device is not None:
        command += ["--device", options.device]
    if options.threads is not None:
        command += ["--threads", str(options.threads)]
    command += ["--heartbeat", str(options.heartbeat), "--root", str(options.data_root)]
    if options.worker_id is not None:
        command += ["--worker-id", options.worker_id]
    if options.parent_pid is not None:
        command += ["--parent-pid", str(options.parent_pid)]
    if options.artifacts is not None:
        command += ["--artifacts", str(options.artifacts)]
    if options.deadline is not None:
        command += ["--deadline", f"{options.deadline:.3f}"]
    return command + (["--quiet"] if quiet else []) + options.speed.worker_flags()


def spawn_worker(options: WorkerOptions, *, quiet: bool = True) -> subprocess.Popen:
    """A worker process in its own session (so a terminal's Ctrl-C reaches only its
    parent, which passes it on), the storage URL in its environment."""
    env = {**os.environ, STORAGE_ENV: options.storage}
    return subprocess.Popen(worker_argv(options, quiet=quiet), env=env, start_new_session=True)


def task_devices(env: Mapping[str, str]) -> list[str]:
    """The devices a job's task was given, one worker each (`worker --each-gpu`): the GPUs
    CUDA_VISIBLE_DEVICES shows (SLURM sets it for `--gres=gpu:N` and `--gpus`; torch
    numbers them from 0 whatever their IDs), else those SLURM_JOB_GPUS names (the node's
    own indices, nothing hiding the rest), else the CPU."""
    visible = env.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        ids = [i for i in visible.split(",") if i.strip()]
        # An empty list, or "NoDevFiles" (older SLURM, no GPU given): none.
        if ids and ids != ["NoDevFiles"]:
            return [f"cuda:{i}" for i in range(len(ids))]
        return ["cpu"]
    job_gpus = [i.strip() for i in env.get("SLURM_JOB_GPUS", "").split(",") if i.strip()]
    if job_gpus and all(i.isdigit() for i in job_gpus):
        return [f"cuda:{i}" for i in job_gpus]
    return ["cpu"]


def task_threads(env: Mapping[str, str], workers: int) -> int:
    """CPU threads per worker: the task's CPUs (SLURM_CPUS_PER_TASK, else this process's
    CPU affinity) shared out evenly."""
    given = env.get("SLURM_CPUS_PER_TASK", "")
    if given.isdigit() and int(given) > 0:
        cores = int(given)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    return max(1, cores // workers)


def run_worker_per_device(
    options: WorkerOptions, devices: list[str], log: Callable[[str], None]
) -> int:
    """One worker process per device, until each has ended; the exit code.

    The first SIGINT or SIGTERM is passed on to every worker as SIGINT (they checkpoint
    at the end of the epoch), a second likewise (they stop at once). The workers ignore
    SIGTERM themselves (`StopSignals.from_parent`): SLURM sends it to every process of
    a task, this one included, and each worker must count it once."""
    threads = options.threads or task_threads(os.environ, len(devices))
    workers = [
        spawn_worker(
            replace(options, device=device, threads=threads, parent_pid=os.getpid(),
                    worker_id=f"{socket.gethostname()}:{os.getpid()}:{device}"),
            quiet=False,
        )
        for device in devices
    ]  # fmt: skip
    log(f"{len(workers)} worker(s): " + ", ".join(f"{d} ({threads} threads)" for d in devices))
    stops = 0

    def pass_on(signum: int, frame: object) -> None:
        nonlocal stops
        stops += 1
        _signal_all(workers, signal.SIGINT)

    signal.signal(signal.SIGINT, pass_on)
    signal.signal(signal.SIGTERM, pass_on)
    codes = [w.wait() for w in workers]
    if stops:
        return EXIT_INTERRUPTED
    failed = [d for d, code in zip(devices, codes, strict=True) if code != 0]
    if failed:
        log(f"error: the workers on {', '.join(failed)} failed; see their messages above")
        return EXIT_FAILURE
    return 0


def watch(
    study: optuna.Study,
    alive: Callable[[StudyCounts], bool],
    started: float,
    timeout: float | None,
    progress: StudyProgress,
) -> StudyCounts:
    """Show progress while `alive(counts)` (or until `timeout` seconds have passed): the
    trials finished against the budget, and each running trial's epoch and accuracy
    (`study.progress`)."""
    from tqdm import tqdm

    counts = count_trials(study)
    bar = tqdm(total=counts.budget, initial=counts.finished, unit="trial", disable=None)
    plain = bar.disable  # no terminal: one line per change instead of a bar
    last = None
    try:
        while True:
            counts = count_trials(study)
            running = running_trials(study)
            bar.total = counts.budget
            bar.update(counts.finished - bar.n)
            best = f"{counts.best.value:.4f}" if counts.best is not None else "-"
            left = counts.budget - counts.finished
            eta = remaining_seconds(running, left, progress.max_epochs)
            bar.set_postfix_str(
                f"best {best}, {counts.running} running: {progress.postfix(running, eta)}",
                refresh=True,
            )
            said = progress.estimate(running, counts.budget, counts.finished)
            if said is not None:
                bar.write(said, file=sys.stderr)
            line = (counts.finished, counts.budget, best)
            if plain and line != last:
                print(f"[{counts.finished}/{counts.budget}] best {best}", file=sys.stderr)
                last = line
            if plain:
                for text in progress.log_lines(running):
                    print(text, file=sys.stderr)
            if not alive(counts):
                return counts
            if timeout is not None and time.monotonic() - started >= timeout:
                return counts
            time.sleep(POLL_S)
    finally:
        bar.close()


def _any_alive(workers: list[subprocess.Popen]) -> bool:
    return any(w.poll() is None for w in workers)


def _signal_all(workers: list[subprocess.Popen], signum: int) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signum)


def _stop(workers: list[subprocess.Popen]) -> None:
    """SIGINT every worker once and wait while they checkpoint their trials at the end
    of the epoch and queue them again; a second Ctrl-C passes a second SIGINT on, which
    stops them at once. Stragglers are killed."""
    _signal_all(workers, signal.SIGINT)
    try:
        _wait_all(workers, STOP_GRACE_S)
    except KeyboardInterrupt:
        _signal_all(workers, signal.SIGINT)
        with contextlib.suppress(KeyboardInterrupt):
            _wait_all(workers, AT_ONCE_GRACE_S)
    for w in workers:
        if w.poll() is None:
            w.kill()
            w.wait()


def _wait_all(workers: list[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for w in workers:
        with contextlib.suppress(subprocess.TimeoutExpired):
            w.wait(timeout=max(0.1, deadline - time.monotonic()))
