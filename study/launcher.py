"""`mnist-study run`: create or resume a study, start its workers, watch it to the end.

The workers are ordinary `mnist-study worker` processes — the same program a user starts
by hand on another host — each pinned to one device; on the CPU they share the cores out.
They run in their own process sessions, so Ctrl-C reaches only this process, which passes
one SIGINT to each worker: a worker stops mid-trial and queues that trial again, leaving
the study ready to resume (from the trial's last checkpoint, `study.checkpoints`).
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
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import optuna

from model.data import ensure_mnist
from model.device import resolve_device
from study.budget import StudyCounts, count_trials
from study.database import DEFAULT_HEARTBEAT, STORAGE_ENV, open_storage
from study.errors import redact
from study.objective import SpeedOptions
from study.presets import Preset
from study.progress import StudyProgress, remaining_seconds, running_trials
from study.studies import create_or_resume

POLL_S = 1.0
# How long workers get to queue their trials again after Ctrl-C before they are killed.
STOP_GRACE_S = 20.0


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


def run_study(options: RunOptions, log: Callable[[str], None]) -> RunOutcome:
    # A bad device fails here, before anything is written.
    plan = plan_workers(options.devices, options.workers, options.workers_per_device)
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
        counts = _watch(study, workers, started, options.timeout, progress)
        if options.timeout is not None and not counts.done and _any_alive(workers):
            # The workers stop by themselves at the deadline (within an epoch): a signal
            # here could reach one still starting, before its handlers are set.
            timed_out = True
            counts = _watch(study, workers, started, None, progress)
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
    command = [
        sys.executable, "-m", "study", "worker",
        "--study", options.study,
        "--device", device,
        "--threads", str(threads),
        "--heartbeat", str(options.heartbeat),
        "--root", str(options.data_root),
        "--worker-id", f"{socket.gethostname()}:w{index}",
        "--parent-pid", str(os.getpid()),
        "--quiet",
    ]  # fmt: skip
    if options.artifacts is not None:
        command += ["--artifacts", str(options.artifacts)]
    if deadline is not None:
        command += ["--deadline", f"{deadline:.3f}"]
    command += options.speed.worker_flags()
    env = {**os.environ, STORAGE_ENV: options.storage}
    return subprocess.Popen(command, env=env, start_new_session=True)


def _watch(
    study: optuna.Study,
    workers: list[subprocess.Popen],
    started: float,
    timeout: float | None,
    progress: StudyProgress,
) -> StudyCounts:
    """Show progress until every worker has exited (or `timeout` seconds have passed):
    the trials finished against the budget, and each running trial's epoch and accuracy
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
            if not _any_alive(workers):
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
    """SIGINT every worker once, wait for them to queue their trials, kill stragglers."""
    _signal_all(workers, signal.SIGINT)
    deadline = time.monotonic() + STOP_GRACE_S
    try:
        for w in workers:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.wait(timeout=max(0.1, deadline - time.monotonic()))
    except KeyboardInterrupt:
        pass  # a second Ctrl-C: stop waiting
    for w in workers:
        if w.poll() is None:
            w.kill()
            w.wait()
