"""The objective: an Optuna trial in, the mean cross-validated accuracy out.

It only translates: `suggest` turns the trial into a `TrainConfig`, `model.kfold` trains,
and the figures go back to the trial — running mean accuracy as intermediate values
(epoch as step, for the pruner and the dashboard), per-fold figures as user attributes,
the learning curves as artifacts (data and picture) when the worker has a store.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import optuna

from model.data import DeviceData
from model.kfold import Progress, train_kfold
from study.artifacts import attach_curves
from study.presets import Preset

if TYPE_CHECKING:
    from optuna.artifacts import FileSystemArtifactStore


class Objective:
    """Cross-validates each trial's configuration on this worker's device and data."""

    def __init__(
        self,
        preset: Preset,
        data: DeviceData,
        worker: str,
        should_stop: Callable[[], bool] = lambda: False,
        artifacts: FileSystemArtifactStore | None = None,
        precision: str | None = None,
        compile: bool = False,
    ) -> None:
        self.precision = precision
        self.compile = compile
        self.preset = preset
        self.data = data
        self.worker = worker
        self.should_stop = should_stop
        self.artifacts = artifacts
        self.current_trial: int | None = None

    def __call__(self, trial: optuna.Trial) -> float:
        self.current_trial = trial.number
        config = self.preset.space.suggest(trial, self.preset.defaults)

        def on_progress(progress: Progress) -> bool:
            if self.should_stop():
                # Leaves the trial failed; the worker queues it again before it exits.
                raise KeyboardInterrupt
            trial.report(progress.mean_accuracy, progress.epoch)
            return trial.should_prune()

        result = train_kfold(
            config,
            self.data,
            on_progress=on_progress,
            precision=self.precision,
            compile=self.compile,
        )
        for key, value in {
            "fold_accuracies": result.fold_accuracies,
            "accuracy_sd": result.std_accuracy,
            "best_epochs": result.best_epochs,
            "epochs_run": result.epochs_run,
            "seconds": round(result.seconds, 3),
            "device": result.device,
            "worker": self.worker,
        }.items():
            trial.set_user_attr(key, value)
        if self.artifacts is not None:
            attach_curves(self.artifacts, trial, result.curves, result.best_epochs)
        if result.diverged:
            # Pruned, not failed: the configuration was evaluated and found unstable, which
            # counts against the budget and must not be retried.
            trial.set_user_attr("failure", f"diverged: {result.diverged}")
            raise optuna.TrialPruned(f"diverged: {result.diverged}")
        if result.halted:
            raise optuna.TrialPruned(f"pruned after epoch {max(result.epochs_run)}")
        return result.mean_accuracy
