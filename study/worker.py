"""A worker: joins an existing study and runs trials until the study's budget is met.

Any number of workers, on any number of hosts, may share one study. Each loads MNIST
onto its device once, then loops: fail trials whose worker died (they are queued again),
count, and run one trial if the budget still needs one. When the rest of the budget is
already being run by others, it waits rather than exits, so a trial whose worker dies late
is still picked up. Two workers deciding at the same moment can each start a trial, so a
study may finish up to (workers − 1) trials past its budget.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from model.data import ensure_mnist, load_mnist, to_device
from model.device import resolve_device
from study.artifacts import artifact_dir, open_artifact_store
from study.budget import count_trials
from study.database import DEFAULT_HEARTBEAT, open_storage
from study.errors import StorageError, causes
from study.objective import Objective
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
    precision: str | None = None
    compile: bool = False


def run_worker(options: WorkerOptions, log: Callable[[str], None] = print) -> int:
    """Run trials until the budget is met; returns how many this worker ran."""
    storage = open_storage(options.storage, heartbeat=options.heartbeat)
    study = load_study(storage, options.study)
    preset = study_preset(study)
    device = resolve_device(options.device)
    if options.threads:
        import torch

        torch.set_num_threads(options.threads)
    ensure_mnist(options.data_root)
    mnist = load_mnist(options.data_root)
    data = to_device(mnist.train_images, mnist.train_labels, device)
    worker_id = options.worker_id or f"{socket.gethostname()}:{os.getpid()}"

    stop = _StopSignals()

    def parent_gone() -> bool:
        gone = options.parent_pid is not None and os.getppid() != options.parent_pid
        stop.interrupted = stop.interrupted or gone
        return gone

    store = open_artifact_store(artifact_dir(options.storage, options.artifacts))
    objective = Objective(
        preset,
        data,
        worker=f"{worker_id} ({device})",
        should_stop=parent_gone,
        artifacts=store,
        precision=options.precision,
        compile=options.compile,
    )
    # Filters on the handlers, which see the records of every optuna.* logger.
    for handler in logging.getLogger("optuna").handlers:
        handler.addFilter(stop.keep_log_record)
    ran = 0
    try:
        while not parent_gone() and not stop.finish_requested:
            fail_stale_trials(study)
            counts = count_trials(study)
            if counts.done:
                break
            if counts.unclaimed <= 0 and counts.waiting == 0:
                time.sleep(POLL_S)  # the rest is running elsewhere; stay in case it dies
                continue
            objective.current_trial = None
            # A trial that raises (a GPU out of memory, say) fails alone; Optuna logs why.
            try:
                # The claim itself writes the trial's first heartbeat, so a worker killed
                # before Optuna's heartbeat thread beats still leaves a trial that goes stale.
                with storage.beating_from_claim():
                    study.optimize(objective, n_trials=1, catch=(Exception,), gc_after_trial=False)
            except Exception as exc:
                # A storage out of reach for good can surface from Optuna's own clean-up
                # as another error (an UnboundLocalError in Optuna 5's _run_trial); the
                # user is owed the storage's one line.
                lost = _storage_error_behind(exc)
                if lost is None:
                    raise
                raise lost from None
            ran += 1
    except KeyboardInterrupt:
        if objective.current_trial is not None:
            requeue(study, objective.current_trial)
            log(f"trial {objective.current_trial} was interrupted and is queued again")
        raise
    return ran


def _storage_error_behind(exc: BaseException) -> StorageError | None:
    return next((cause for cause in causes(exc) if isinstance(cause, StorageError)), None)


class _StopSignals:
    """How a worker is asked to stop. SIGINT and SIGTERM interrupt the trial in hand (the
    worker queues it again); SIGUSR1 asks it to finish that trial and start no other."""

    def __init__(self) -> None:
        self.interrupted = False
        self.finish_requested = False
        signal.signal(signal.SIGINT, self._interrupt)
        signal.signal(signal.SIGTERM, self._interrupt)
        signal.signal(signal.SIGUSR1, self._finish)

    def _interrupt(self, signum: int, frame: object) -> None:
        self.interrupted = True
        raise KeyboardInterrupt

    def _finish(self, signum: int, frame: object) -> None:
        self.finish_requested = True

    def keep_log_record(self, record: logging.LogRecord) -> bool:
        """Optuna logs an interrupted trial as failed (with a traceback); the worker says
        itself that it queued the trial again, so those records only alarm. Likewise a
        trial failed by a storage that stayed out of reach: the worker then ends with
        that error in one line, and the heartbeat hands the trial to another worker."""
        if record.exc_info and record.exc_info[0] in (KeyboardInterrupt, StorageError):
            return False
        return not (self.interrupted and "failed" in record.getMessage())
