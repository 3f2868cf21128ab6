"""Progress on stderr for the commands' long work: a bar on a terminal, and on a log (a
file, CI) plain lines now and then, so that a log is not flooded with redraws."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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
