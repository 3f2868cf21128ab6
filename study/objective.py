"""The objective: Optuna trials in, each one's mean cross-validated accuracy out.

It only translates: `suggest` turns each trial into a `TrainConfig`, `model.kfold` trains
them (several at once as one stack, when a worker claims several), and the figures go
back to each trial — running mean accuracy as intermediate values (epoch as step, for
the pruner and the dashboard), per-fold figures as user attributes, the learning curves
as artifacts (data and picture) when the worker has a store.

`Objective` is an ordinary Optuna objective for one trial (`study.optimize(objective)`);
a worker instead hands it the trials it claimed (`run_trials`), and it tells each its
result as soon as that trial's networks are done, while the others train on.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from study.artifacts import attach_curves
from study.budget import backing_storage
from study.checkpoints import CHECKPOINT_EVERY_S, Checkpoints
from study.errors import StorageError, causes
from study.presets import Preset

if TYPE_CHECKING:
    from optuna.artifacts import FileSystemArtifactStore

    from model.data import DeviceData
    from model.kfold import KFoldResult, Progress
    from model.trial_state import TrialSnapshot

_log = logging.getLogger("optuna.mnist_study")
# A running trial's system attribute: how many of its folds are still training.
ACTIVE_FOLDS = "active_folds"


@dataclass(frozen=True)
class Outcome:
    """How a trial ended: with its value, or pruned for `pruned`'s reason."""

    value: float | None = None
    pruned: str | None = None


@dataclass(frozen=True)
class SpeedOptions:
    """How a worker trains its trials: `run` passes them on to every worker it starts
    (`worker_flags`), and a worker hands them to the trainer."""

    precision: str | None = None
    compile: bool = False
    graphs: bool = False
    trials_per_worker: int | None = None
    checkpoint_every: float | None = CHECKPOINT_EVERY_S
    """Seconds of training between checkpoints (`study.checkpoints`); None: none."""

    def worker_flags(self) -> list[str]:
        """These options as `mnist-study worker` flags."""
        flags = [] if self.precision is None else ["--precision", self.precision]
        flags += ["--compile"] if self.compile else []
        flags += ["--cuda-graphs"] if self.graphs else []
        if self.trials_per_worker is not None:
            flags += ["--trials-per-worker", str(self.trials_per_worker)]
        if self.checkpoint_every != CHECKPOINT_EVERY_S:
            flags += ["--checkpoint-every", repr(self.checkpoint_every or 0.0)]
        return flags


class Suspended(KeyboardInterrupt):
    """The worker's deadline came, or a signal asked it to stop (`StopSignals`): its
    trials in training were checkpointed at this epoch's end (`saved`; without
    checkpoints they start over) and stop here, to be queued again and resumed."""

    def __init__(self, saved: bool = True) -> None:
        super().__init__()
        self.saved = saved


class Objective:
    """Cross-validates trials' configurations on this worker's device and data."""

    def __init__(
        self,
        preset: Preset,
        data: DeviceData,
        worker: str,
        should_stop: Callable[[], bool] = lambda: False,
        artifacts: FileSystemArtifactStore | None = None,
        speed: SpeedOptions = SpeedOptions(),
        should_suspend: Callable[[], bool] = lambda: False,
        log: Callable[[str], None] = _log.warning,
    ) -> None:
        self.speed = speed
        self.preset = preset
        self.data = data
        self.worker = worker
        self.should_stop = should_stop
        self.should_suspend = should_suspend
        self.log = log
        self.artifacts = artifacts
        self.checkpoints = (
            None
            if artifacts is None or not speed.checkpoint_every
            else Checkpoints(artifacts, speed.checkpoint_every, log)
        )
        # Numbers of the trials in hand and not yet told: the worker queues these again
        # when it is interrupted.
        self.in_hand: list[int] = []

    def __call__(self, trial: optuna.Trial) -> float:
        self.in_hand = [trial.number]
        outcome = self._train([trial])[0]
        if outcome.pruned is not None:
            raise optuna.TrialPruned(outcome.pruned)
        assert outcome.value is not None
        return outcome.value

    def run_trials(self, study: optuna.Study, trials: Sequence[optuna.Trial]) -> None:
        """Train the claimed `trials` together and tell each how it ended, as it ends.

        An error in training fails the trials not yet told (as `optimize` with
        `catch=(Exception,)` does) and the worker goes on; an interruption fails them too
        and propagates, and the worker queues them again (`in_hand`).
        """
        self.in_hand = [t.number for t in trials]

        def tell(trial: optuna.Trial, outcome: Outcome) -> None:
            if outcome.pruned is not None:
                study.tell(trial, state=TrialState.PRUNED)
                _log.info(f"Trial {trial.number} pruned. {outcome.pruned}")
            else:
                study.tell(trial, outcome.value)
                _log.info(
                    f"Trial {trial.number} finished with value: {outcome.value} and "
                    f"parameters: {trial.params}."
                )
            self.in_hand.remove(trial.number)

        try:
            self._train(trials, tell)
        except UpdateFinishedTrialError:
            self._taken_as_stale(study, trials)
        except Exception as exc:
            if any(isinstance(cause, StorageError) for cause in causes(exc)):
                # Nothing can be told to a storage out of reach: the trials stay RUNNING,
                # go stale once this worker stops beating, and are queued again.
                raise
            for trial in self._unfinished(trials):
                if self.checkpoints is not None:
                    self.checkpoints.discard(trial)  # not retried: nothing will resume it
                study.tell(trial, state=TrialState.FAIL)
                _log.warning(f"Trial {trial.number} failed because of the following error: {exc!r}")
            self.in_hand = []
        except KeyboardInterrupt:
            for trial in self._unfinished(trials):
                study.tell(trial, state=TrialState.FAIL)
            raise

    def _taken_as_stale(self, study: optuna.Study, trials: Sequence[optuna.Trial]) -> None:
        """One of `trials` was failed by another worker while this one trained it: its
        heartbeat went unheard for the grace period (a machine so loaded that the beating
        thread starved), and that worker queued it again. Writing to it now is refused,
        which stops the stack; its stack-mates are queued again too, to resume from
        their checkpoints, and the worker goes on."""
        from study.studies import requeue

        storage = backing_storage(study)
        for trial in self._unfinished(trials):
            if storage.get_trial(trial._trial_id).state != TrialState.RUNNING:
                self.log(
                    f"trial {trial.number} was failed as stale by another worker while this "
                    "one trained it (its heartbeat went unheard for the grace period) and "
                    "was queued again there"
                )
                continue
            study.tell(trial, state=TrialState.FAIL)
            requeue(study, trial.number)
            self.log(f"trial {trial.number}, in the same stack, is queued again")
        self.in_hand = []

    def _unfinished(self, trials: Sequence[optuna.Trial]) -> list[optuna.Trial]:
        return [t for t in trials if t.number in self.in_hand]

    def _train(
        self,
        trials: Sequence[optuna.Trial],
        on_outcome: Callable[[optuna.Trial, Outcome], None] | None = None,
    ) -> list[Outcome]:
        """Train the trials, one stack per group that can share one; their outcomes."""
        # Imported here, not above: `study.worker` imports this module, and a worker that
        # never trains (benchmarks/load.py's) should not import torch.
        from model.kfold import stack_key, train_trials

        configs = [self.preset.space.suggest(trial, self.preset.defaults) for trial in trials]
        checkpoints = self.checkpoints
        resumed = [
            None if checkpoints is None else checkpoints.resume_point(t, c, self.data.device)
            for t, c in zip(trials, configs, strict=True)
        ]
        outcomes: list[Outcome | None] = [None] * len(trials)
        # A stack shares one epoch count: trials resumed at one epoch train together, and
        # apart from those starting afresh or resumed at another.
        groups: dict[tuple[object, ...], list[int]] = {}
        for i, (config, snapshot) in enumerate(zip(configs, resumed, strict=True)):
            start = 0 if snapshot is None else snapshot.epoch
            groups.setdefault((*stack_key(config), start), []).append(i)

        folds_seen: dict[int, int] = {}
        for members in groups.values():

            def on_progress(
                position: int, progress: Progress, members: list[int] = members
            ) -> bool:
                if self.should_stop():
                    # The worker fails and queues again the trials in hand before it exits.
                    raise KeyboardInterrupt
                if checkpoints is None and self.should_suspend():
                    raise Suspended(saved=False)  # nothing to save: they start over
                trial = trials[members[position]]
                trial.report(progress.mean_accuracy, progress.epoch)
                if folds_seen.get(trial.number) != progress.active_folds:
                    # For the progress display: written only when it changes (k times at
                    # most), while the epoch and accuracy come with each report.
                    folds_seen[trial.number] = progress.active_folds
                    trial.storage.set_trial_system_attr(
                        trial._trial_id, ACTIVE_FOLDS, progress.active_folds
                    )
                return trial.should_prune()

            def on_result(position: int, result: KFoldResult, members: list[int] = members) -> None:
                i = members[position]
                outcomes[i] = outcome = self._record(trials[i], result)
                if checkpoints is not None:
                    # Before the tell, which leaves the trial's attributes as they are.
                    checkpoints.discard(trials[i])
                if on_outcome is not None:
                    on_outcome(trials[i], outcome)

            def on_checkpoint(
                snapshots: dict[int, TrialSnapshot], members: list[int] = members
            ) -> None:
                assert checkpoints is not None
                for position, snapshot in snapshots.items():
                    checkpoints.save(trials[members[position]], snapshot)
                if self.should_suspend():
                    raise Suspended

            def checkpoint_due(seconds: float) -> bool:
                assert checkpoints is not None
                return seconds >= checkpoints.every or self.should_suspend()

            train_trials(
                [configs[i] for i in members],
                self.data,
                on_progress=on_progress,
                on_result=on_result,
                precision=self.speed.precision,
                compile=self.speed.compile,
                graphs=self.speed.graphs,
                resume=[resumed[i] for i in members],
                checkpoint_due=None if checkpoints is None else checkpoint_due,
                on_checkpoint=on_checkpoint,
            )
        return [o for o in outcomes if o is not None]

    def _record(self, trial: optuna.Trial, result: KFoldResult) -> Outcome:
        """Store the trial's figures and curves; how it ended."""
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
            return Outcome(pruned=f"diverged: {result.diverged}")
        if result.halted:
            return Outcome(pruned=f"pruned after epoch {max(result.epochs_run)}")
        return Outcome(value=result.mean_accuracy)
