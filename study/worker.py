"""A worker: joins an existing study and runs trials until the study's budget is met.

Any number of workers, on any number of hosts, may share one study. Each loads MNIST
onto its device once, then loops: fail trials whose worker died (they are queued again),
count, and claim up to `trials_per_worker` trials that the budget still needs — queued
retries first — and train them together as one stack (`Objective.run_trials`). Every
claimed trial has its own heartbeat from its claim on, so if the worker dies all of them
go stale and are queued again with their parameters. When the rest of the budget is
already being run by others, it waits rather than exits, so a trial whose worker dies late
is still picked up. The budget is counted again before each claim, and the storage
refuses a new trial that would pass it in the claim's own transaction
(`ResilientRDBStorage.beating_from_claim`), so two workers claiming at the same moment
cannot both take the last trial: a study finishes exactly its budget.

The loop itself (`run_trials_until_done`) takes any `TrialRunner`: `run_worker` hands it
the objective that trains; benchmarks/load.py an instant one, in processes that never
import torch (this module imports it only inside `run_worker`).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import optuna
from optuna.storages import RDBStorage

from model.config import parameter_count
from study.artifacts import artifact_dir, open_artifact_store
from study.budget import backing_storage, count_trials
from study.database import DEFAULT_HEARTBEAT, open_storage
from study.errors import StorageError, causes
from study.objective import Objective, SpeedOptions, Suspended
from study.presets import Preset
from study.resilient_storage import BudgetSpent
from study.studies import fail_stale_trials, load_study, requeue, study_preset

POLL_S = 1.0


@dataclass(frozen=True)
class WorkerOptions:
    storage: str
    study: str
    device: str | None = None
    data_root: Path = Path("data")
    heartbeat: int = DEFAULT_HEARTBEAT
    threads: int | None = None
    worker_id: str | None = None
    parent_pid: int | None = None
    artifacts: Path | None = None
    speed: SpeedOptions = field(default_factory=SpeedOptions)
    deadline: float | None = None
    """Unix time by which the worker's last stack should have ended (`run --timeout`):
    it claims no stack that it expects to end later (`StackClock`)."""


# What one stacked trial may hold on a GPU before the default stacks fewer: its k
# networks' weights, gradients, two Adam moments and early stopping's best copy, 20 bytes
# a parameter, at the widest network its space can draw (the stack is padded to it).
STACK_BYTES_PER_PARAMETER = 20
GPU_STACK_BYTES = 16e9


def default_trials_per_worker(device_type: str, preset: Preset) -> int:
    """How many trials a worker stacks when not told.

    On the CPU, 1: there the products dominate and stacking saves only bookkeeping
    (benchmarks/README.md: 1.1× at full batch, nothing measurable at mini-batch). On a
    GPU a lone trial leaves the chip waiting on launches, so trials are stacked: 8 at
    full batch (the seed protocol's 40 networks over 48,000 images hold about 22 GB), 16
    at mini-batch — fewer where the space's widest trial would make the stack's weights
    and optimizer state pass `GPU_STACK_BYTES` (`wide`: 4 trials of 3 networks of up to
    4 × 4,096 units, 3.2 GB each). Not yet measured on a GPU: the GPU check records the
    rate at this default.
    """
    if device_type != "cuda":
        return 1
    most = 8 if preset.defaults.full_batch else 16
    widest = parameter_count(preset.space.widest())
    per_trial = preset.defaults.k * widest * STACK_BYTES_PER_PARAMETER
    return max(1, min(most, int(GPU_STACK_BYTES // per_trial)))


class TrialRunner(Protocol):
    """What the worker's loop hands its claimed trials to: `Objective` in a real worker,
    an instant objective in benchmarks/load.py."""

    in_hand: list[int]
    """Numbers of the claimed trials not yet told, queued again if the worker is
    interrupted; the runner removes each as it tells it."""

    def run_trials(self, study: optuna.Study, trials: Sequence[optuna.Trial]) -> None:
        """Run the claimed trials and tell each how it ended."""


def run_worker(options: WorkerOptions, log: Callable[[str], None] = print) -> int:
    """Run trials until the budget is met; returns how many this worker ran."""
    # Imported here, not above, since they import torch: a worker that never trains
    # (benchmarks/load.py's) runs `run_trials_until_done` without them.
    from model.data import ensure_mnist, load_mnist, to_device
    from model.device import use_device

    storage = open_storage(options.storage, heartbeat=options.heartbeat)
    study = load_study(storage, options.study)
    preset = study_preset(study)
    device = use_device(options.device)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    ensure_mnist(options.data_root)
    mnist = load_mnist(options.data_root)
    data = to_device(mnist.train_images, mnist.train_labels, device)
    worker_id = options.worker_id or f"{socket.gethostname()}:{os.getpid()}"

    stop = StopSignals(options.parent_pid, from_parent=options.parent_pid is not None)
    store = open_artifact_store(artifact_dir(options.storage, options.artifacts))
    per_claim = options.speed.trials_per_worker or default_trials_per_worker(device.type, preset)
    deadline = options.deadline
    objective = Objective(
        preset,
        data,
        worker=f"{worker_id} ({device})",
        should_stop=stop.parent_gone,
        artifacts=store,
        speed=options.speed,
        should_suspend=lambda: (
            stop.stop_requested or (deadline is not None and time.time() >= deadline)
        ),
        log=log,
    )
    clock = StackClock(options.deadline, recent_stack_seconds(study, device.type, per_claim))
    return run_trials_until_done(study, storage, objective, per_claim, stop, clock, log)


def run_trials_until_done(
    study: optuna.Study,
    storage: RDBStorage,
    runner: TrialRunner,
    per_claim: int,
    stop: StopSignals,
    clock: StackClock,
    log: Callable[[str], None] = print,
) -> int:
    """The worker's loop: fail stale trials, count, claim up to `per_claim` trials with
    their heartbeats, hand them to `runner`, until the budget is met, the parent is gone
    or a stop is asked for. Returns how many trials this worker ran."""
    # Filters on the handlers, which see the records of every optuna.* logger.
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(stop.keep_log_record)
    ran = 0
    try:
        while not stop.parent_gone() and not stop.finish_requested and not stop.stop_requested:
            fail_stale_trials(study)
            counts = count_trials(study, with_best=False)
            if counts.done:
                break
            if counts.unclaimed <= 0 and counts.waiting == 0:
                time.sleep(POLL_S)  # the rest is running elsewhere; stay in case it dies
                continue
            if not clock.room_for_a_stack(time.time()):
                log(clock.why_stopping(time.time()))
                break
            runner.in_hand = []
            try:
                trials = _claim(study, storage, per_claim)
                if not trials:
                    # Another worker took the last of the budget between the count and
                    # the claim (the storage refused the claim: `BudgetSpent`).
                    continue
                runner.in_hand = [t.number for t in trials]
                if stop.stop_requested:
                    raise Suspended(saved=False)  # asked during the claim: nothing trained
                started = time.monotonic()
                with _Heartbeats(storage, trials):
                    # A training error (a GPU out of memory, say) fails these trials alone.
                    runner.run_trials(study, trials)
                clock.record(time.monotonic() - started)
            except Exception as exc:
                # A storage out of reach for good can surface from Optuna's own clean-up
                # as another error; the user is owed the storage's one line.
                lost = _storage_error_behind(exc)
                if lost is None:
                    raise
                raise lost from None
            ran += len(trials)
    except Suspended as suspended:
        why = "at the deadline" if stop.stop_signal is None else f"on {stop.stop_signal}"
        done = "checkpointed" if suspended.saved else "stopped"
        for number in runner.in_hand:
            requeue(study, number)
            log(f"trial {number} was {done} {why} and is queued again")
    except KeyboardInterrupt:
        for number in runner.in_hand:
            requeue(study, number)
            log(f"trial {number} was interrupted and is queued again")
        raise
    if stop.stop_requested:
        raise KeyboardInterrupt  # the worker was stopped: it exits as interrupted (130)
    return ran


# How much longer than the longest stack seen the next one is allowed to take before the
# deadline: stacks vary with the trials drawn (one trial at the epoch cap sets the length).
STACK_TIME_SAFETY = 1.25


@dataclass
class StackClock:
    """Whether a worker has time for another stack before its deadline.

    A stack cut by the deadline is checkpointed and its trials queued again (they resume
    where they stopped), but it then takes its stack-mates' places in another run, and
    without checkpoints it starts over; so near the deadline a worker claims only what it
    expects to finish, and claims nothing once it has passed: a stack is expected
    to take as long as the longest this worker ran, or, before its first, the longest
    the study's recent trials on this kind of device took (`recent_stack_seconds`),
    times `STACK_TIME_SAFETY`. With nothing to go by, it claims.
    """

    deadline: float | None
    longest: float | None = None

    def record(self, seconds: float) -> None:
        self.longest = seconds if self.longest is None else max(self.longest, seconds)

    def expected(self) -> float | None:
        return None if self.longest is None else self.longest * STACK_TIME_SAFETY

    def room_for_a_stack(self, now: float) -> bool:
        if self.deadline is None:
            return True
        expected = self.expected()
        return now < self.deadline and (expected is None or now + expected <= self.deadline)

    def why_stopping(self, now: float) -> str:
        assert self.deadline is not None
        if now >= self.deadline or self.expected() is None:
            return "starting no more trials: the deadline has passed"
        return (
            f"starting no more trials: a stack is expected to take {self.expected():.0f} s "
            f"and {max(0.0, self.deadline - now):.0f} s are left before the deadline"
        )


def recent_stack_seconds(study: optuna.Study, device_type: str, per_claim: int) -> float | None:
    """The longest any of the study's last `2 × per_claim` finished trials on a
    `device_type` device took, from its stack's start to its end (the trial's `seconds`):
    the time a stack takes here, before this worker has run one."""
    from optuna.trial import TrialState

    storage = backing_storage(study)
    if hasattr(storage, "recent_finished_trial_ids"):
        # Only the recent trials are read (a study of 100,000 took 129 s read whole); a
        # few more than needed, since some may have run on another kind of device.
        ids = storage.recent_finished_trial_ids(study._study_id, 8 * per_claim)
        ended = [storage.get_trial(trial_id) for trial_id in reversed(ids)]
    else:
        ended = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    seconds = [
        float(t.user_attrs["seconds"])
        for t in ended
        if "seconds" in t.user_attrs
        and str(t.user_attrs.get("device", "")).split(":")[0] == device_type
    ]
    recent = seconds[-2 * per_claim :]
    return max(recent) if recent else None


def _claim(study: optuna.Study, storage: RDBStorage, most: int) -> list[optuna.Trial]:
    """Up to `most` trials the budget still needs, queued retries first, each claimed with
    its first heartbeat in the claim's transaction (so a worker killed before its heartbeat
    thread beats still leaves trials that go stale). The budget is counted before each."""
    trials: list[optuna.Trial] = []
    with storage.beating_from_claim(), warnings.catch_warnings():
        # Optuna warns that heartbeats are meant for `optimize`; this worker beats for
        # its trials itself (`_Heartbeats`), as `optimize` would.
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
        while len(trials) < most:
            counts = count_trials(study, with_best=False)
            if trials and counts.unclaimed <= 0 and counts.waiting == 0:
                break
            try:
                trials.append(study.ask())
            except BudgetSpent:
                break
    return trials


class _Heartbeats:
    """Beats for every trial in hand, from one thread, every heartbeat interval, as
    Optuna's own heartbeat thread does for the one trial `optimize` runs."""

    def __init__(self, storage: RDBStorage, trials: list[optuna.Trial]) -> None:
        self.storage = storage
        self.trials = trials
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None

    def __enter__(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        if interval is None:
            return
        self.thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
        self.thread.start()

    def _beat(self, interval: int) -> None:
        while not self.stop.wait(timeout=interval):
            for trial in self.trials:
                # Beats for a trial already told are harmless: only RUNNING ones are judged.
                self.storage.record_heartbeat(trial._trial_id)

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join()


def _storage_error_behind(exc: BaseException) -> StorageError | None:
    return next((cause for cause in causes(exc) if isinstance(cause, StorageError)), None)


class StopSignals:
    """How a worker is asked to stop.

    The first SIGINT or SIGTERM asks it to stop as at the `--timeout` deadline: the
    trials in training are checkpointed at the end of their epoch and queued again, to
    resume from there, and the worker exits. SLURM sends SIGTERM at a task's time limit
    and on preemption, then SIGKILL `KillWait` seconds later (30 by default): an epoch and
    its checkpoint must fit in that. A second signal stops at once (the trials in hand are
    queued again and resume from their last periodic checkpoint), as SIGKILL does.
    SIGUSR1 asks it to finish the trials in hand and start no other; and a worker whose
    parent (`parent_pid`, `run`) is gone stops as if interrupted twice.

    `from_parent`: the worker's parent (`run`, or a task's `--each-gpu` worker) passes
    stops on as SIGINT, and SIGTERM is ignored, since SLURM sends it to every process of
    a task at once, the parent included: it would count twice.
    """

    def __init__(self, parent_pid: int | None = None, *, from_parent: bool = False) -> None:
        self.parent_pid = parent_pid
        self.interrupted = False
        self.finish_requested = False
        self.stop_signal: str | None = None
        """The signal that asked the worker to stop at the end of the epoch, once one has."""
        signal.signal(signal.SIGINT, self._interrupt)
        signal.signal(signal.SIGTERM, signal.SIG_IGN if from_parent else self._interrupt)
        signal.signal(signal.SIGUSR1, self._finish)

    def _interrupt(self, signum: int, frame: object) -> None:
        if self.stop_signal is None:
            self.stop_signal = signal.Signals(signum).name
            return
        self.interrupted = True
        raise KeyboardInterrupt

    def _finish(self, signum: int, frame: object) -> None:
        self.finish_requested = True

    @property
    def stop_requested(self) -> bool:
        return self.stop_signal is not None

    def parent_gone(self) -> bool:
        gone = self.parent_pid is not None and os.getppid() != self.parent_pid
        self.interrupted = self.interrupted or gone
        return gone

    def keep_log_record(self, record: logging.LogRecord) -> bool:
        """Optuna logs an interrupted trial as failed (with a traceback); the worker says
        itself that it queued the trial again, so those records only alarm. Likewise a
        trial failed by a storage that stayed out of reach: the worker then ends with
        that error in one line, and the heartbeat hands the trial to another worker."""
        if record.exc_info and issubclass(record.exc_info[0], (KeyboardInterrupt, StorageError)):
            return False
        stopping = self.interrupted or self.stop_requested
        return not (stopping and "failed" in record.getMessage())
