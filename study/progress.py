"""Progress on stderr for the commands' long work: a bar on a terminal, and on a log (a
file, CI) plain lines now and then, so that a log is not flooded with redraws."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna

    from model.kfold import Progress


def epoch_bar(max_epochs: int) -> Callable[[Progress], bool]:
    """A progress bar over epochs, on stderr when it is a terminal."""
    from tqdm import tqdm

    bar = tqdm(total=max_epochs, unit="epoch", desc="k-fold", disable=None, leave=False)

    def on_progress(progress: Progress) -> bool:
        bar.update(progress.epoch - bar.n)
        bar.set_postfix(mean_acc=f"{progress.mean_accuracy:.4f}", folds=progress.active_folds)
        if progress.active_folds == 0 or progress.epoch >= max_epochs:
            bar.close()
        return False

    return on_progress


def count_bar(total: int, desc: str) -> Callable[[int], None]:
    """A progress bar over `total` epochs on stderr when it is a terminal; otherwise (a
    log file) a line at every tenth of the way."""
    from tqdm import tqdm

    if not sys.stderr.isatty():
        every = max(1, total // 10)

        def log_epoch(done: int) -> None:
            if done % every == 0 or done == total:
                print(f"{desc}: epoch {done}/{total}", file=sys.stderr, flush=True)

        return log_epoch
    bar = tqdm(total=total, unit="epoch", desc=desc, leave=False)

    def on_epoch(done: int) -> None:
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return on_epoch


@dataclass(frozen=True)
class RunningTrial:
    """A trial in training, as the storage tells it: its latest report (epoch, mean
    validation accuracy), its folds still training, and for how long it has run."""

    number: int
    epoch: int
    accuracy: float | None
    active_folds: int | None
    seconds: float

    @property
    def epochs_per_second(self) -> float | None:
        return self.epoch / self.seconds if self.epoch and self.seconds > 0 else None

    def text(self, max_epochs: int, k: int) -> str:
        folds = "" if self.active_folds is None else f", {self.active_folds} of {k} folds training"
        accuracy = "" if self.accuracy is None else f", mean val acc {self.accuracy:.4f}"
        return f"trial {self.number}: epoch {self.epoch}/{max_epochs}{folds}{accuracy}"


def running_trials(study: optuna.Study, now: datetime | None = None) -> list[RunningTrial]:
    """The study's running trials (read alone: a few, whatever the study's size)."""
    from optuna.trial import TrialState

    from study.objective import ACTIVE_FOLDS

    now = now or datetime.now()
    out = []
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        steps = trial.intermediate_values
        epoch = max(steps) if steps else 0
        started = trial.datetime_start or now
        out.append(
            RunningTrial(
                number=trial.number,
                epoch=epoch,
                accuracy=steps.get(epoch),
                active_folds=trial.system_attrs.get(ACTIVE_FOLDS),
                seconds=max(0.0, (now - started).total_seconds()),
            )
        )
    return out


def duration(seconds: float) -> str:
    """Seconds as a person reads a long time: 45 s, 12 min, 3.5 h, 9.8 days."""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def remaining_seconds(running: list[RunningTrial], left: int, max_epochs: int) -> float | None:
    """At most how long the budget's `left` unfinished trials take, from the running
    trials' epoch rates: each trial up to `max_epochs` (early stopping ends most sooner),
    as many at once as are running now. None before any epoch has been reported."""
    rates = [r for t in running if (r := t.epochs_per_second)]
    if not rates:
        return None
    rate = min(rates)
    in_hand = sum(max(0, max_epochs - t.epoch) for t in running) / rate
    to_start = max(0, left - len(running)) * max_epochs / rate
    return (in_hand + to_start) / len(running)


# On a log, a running trial's line at most this often.
LOG_EVERY_S = 30.0
# A study expected to take longer than this is said so, once.
LONG_STUDY_S = 3600.0


class StudyProgress:
    """What `run` shows beside its bar while trials train: each running trial's epoch,
    folds and accuracy, a time left from the epoch rate, and once, when the first epochs
    say the budget will take over an hour, that estimate in one line."""

    def __init__(self, max_epochs: int, k: int, workers: int, device: str) -> None:
        self.max_epochs = max_epochs
        self.k = k
        self.workers = workers
        self.device = device
        self.logged: dict[int, float] = {}
        self.estimated = False

    def postfix(self, running: list[RunningTrial], eta: float | None) -> str:
        shown = ", ".join(
            f"#{t.number} e{t.epoch}/{self.max_epochs}"
            + ("" if t.accuracy is None else f" {t.accuracy:.4f}")
            for t in running[:4]
        )
        more = f" +{len(running) - 4}" if len(running) > 4 else ""
        left = "" if eta is None else f", ≤ {duration(eta)} left"
        return f"{shown}{more}{left}"

    def log_lines(self, running: list[RunningTrial], now: float | None = None) -> list[str]:
        """Lines for a log: each running trial's, at most every `LOG_EVERY_S`."""
        now = time.monotonic() if now is None else now
        lines = []
        for trial in running:
            if trial.epoch and now - self.logged.get(trial.number, -LOG_EVERY_S) >= LOG_EVERY_S:
                self.logged[trial.number] = now
                lines.append(trial.text(self.max_epochs, self.k))
        return lines

    def estimate(self, running: list[RunningTrial], budget: int, finished: int) -> str | None:
        """The one line saying a study will be long, from its first epochs; None when it
        will not be, when it is too early to tell, or once said."""
        rates = [r for t in running if (r := t.epochs_per_second)]
        if self.estimated or finished or not rates:
            return None
        self.estimated = True
        per_trial = self.max_epochs / min(rates)
        total = (budget - finished) * per_trial / max(1, self.workers)
        if total <= LONG_STUDY_S:
            return None
        return (
            f"estimate: at {min(rates):.3g} epochs/s a trial of up to {self.max_epochs} epochs "
            f"takes up to {duration(per_trial)} on {self.device}, so {budget - finished} "
            f"trials with {self.workers} worker(s) up to {duration(total)}; going on "
            "(Ctrl-C stops and keeps the study; a GPU takes far less, docs/training.md: Speed)"
        )
