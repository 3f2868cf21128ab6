"""Checkpoints of trials in training, so that a trial cut short — Ctrl-C, SIGTERM, a
worker killed or lost, the end of `run --timeout` — resumes where it stopped, not from
epoch 0, and ends as it would have without the interruption.

When: every `CHECKPOINT_EVERY_S` seconds of a stack's training (`--checkpoint-every`), at
the first epoch's end after. Seconds rather than epochs, since an epoch of the seed
preset takes about 5 ms on a GPU and 2.5 s on the project's CPU: a fixed number of
epochs would either write constantly on one or rarely on the other. At most that long
is lost to an interruption; a checkpoint's cost is measured in benchmarks/README.md.

What: the trial's `model.trial_state.TrialSnapshot` — its folds' weights, best weights,
early-stopping state, curves so far, optimizer state and random stream — saved with
`torch.save` as plain tensors and values (read back with `weights_only=True`).

Where: the study's artifact store (`study.artifacts`), so hosts that share it share the
checkpoints. A trial's latest is named in its system attribute `checkpoint`
({"artifact": id, "epoch": e, "seconds": its training time by then}); each new one
replaces the one before, so a trial holds one at most, and it is removed when the trial
is told its result (or fails for a reason other than an interruption): a study's
checkpoints take at most one per trial that is training or was interrupted.

Resuming: a trial queued again (by the worker on an interruption, or by the heartbeat
retry once its worker is gone) carries a copy of the system attributes of the trial it
retries, its checkpoint's name among them. If there is one, the retry takes it over: it
trains on from its epoch, records `resumed_from` ({"trial", "epoch", "seconds"}) and
`epochs_saved` as user attributes, and carries the intermediate values up to that epoch
over, so the pruner and the dashboard see the whole curve. A checkpoint that is missing,
unreadable, of another configuration or of another format is not used: the trial starts
from epoch 0, with one log line saying why.
"""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import optuna

from model.config import TrainConfig
from model.errors import first_line

if TYPE_CHECKING:
    import torch
    from optuna.artifacts import FileSystemArtifactStore

    from model.trial_state import TrialSnapshot

_log = logging.getLogger("optuna.mnist_study")
# torch is imported where used: the CLI reads the default below without it.

CHECKPOINT_EVERY_S = 60.0
CHECKPOINT_ATTR = "checkpoint"
RESUMED_FROM = "resumed_from"
EPOCHS_SAVED = "epochs_saved"


@dataclass
class Checkpoints:
    """A worker's checkpoints in `store`: what it writes for its trials, and takes over
    for retried ones."""

    store: FileSystemArtifactStore
    every: float = CHECKPOINT_EVERY_S
    log: Callable[[str], None] = _log.warning
    """Where the lines about resuming go: the worker's own log."""
    # The artifact each trial in hand holds now, by trial number: written or taken over.
    held: dict[int, str] = field(default_factory=dict)

    def save(self, trial: optuna.Trial, snapshot: TrialSnapshot) -> None:
        """Write `snapshot` as `trial`'s checkpoint, then drop the one it replaces.

        Named anew each time and recorded only once written, so a worker killed while
        writing leaves the trial's previous checkpoint, whole, as its resume point."""
        import torch

        artifact = f"checkpoint-{trial._trial_id}-epoch-{snapshot.epoch}"
        buffer = io.BytesIO()
        torch.save(snapshot.payload(), buffer)
        buffer.seek(0)
        try:
            self.store.write(artifact, buffer)
        except OSError as exc:
            # A full disk costs the trial its resume point, never the trial.
            _log.warning(f"trial {trial.number}: checkpoint not written ({first_line(exc)})")
            return
        where = {
            "artifact": artifact,
            "epoch": snapshot.epoch,
            "seconds": round(snapshot.seconds, 3),
        }
        trial.storage.set_trial_system_attr(trial._trial_id, CHECKPOINT_ATTR, where)
        self._remove(self.held.get(trial.number))
        self.held[trial.number] = artifact

    def discard(self, trial: optuna.Trial) -> None:
        """`trial` is about to be told how it ended: its checkpoint goes, and so does its
        name in the trial's attributes (a told trial's stay as they are)."""
        artifact = self.held.pop(trial.number, None)
        if artifact is not None:
            trial.storage.set_trial_system_attr(trial._trial_id, CHECKPOINT_ATTR, None)
            self._remove(artifact)

    def resume_point(
        self, trial: optuna.Trial, config: TrainConfig, device: torch.device
    ) -> TrialSnapshot | None:
        """The snapshot `trial` resumes from, taken over from the trial it retries; None
        where there is none (one log line says why if there was one it cannot use)."""

        # A retry is queued with a copy of the system attributes of the trial it retries
        # (Optuna's retry callback), so the copy read at its claim names that trial's
        # latest checkpoint; `retry_history` ends with that trial's number (`failed_trial`
        # is the first of the chain's).
        frozen = trial._cached_frozen_trial
        history = frozen.system_attrs.get("retry_history") or []
        saved = frozen.system_attrs.get(CHECKPOINT_ATTR)
        snapshot = None
        if history and isinstance(saved, dict) and isinstance(saved.get("artifact"), str):
            snapshot = self._take_over(trial, history[-1], saved, config, device)
        if snapshot is None and frozen.user_attrs.get(RESUMED_FROM) is not None:
            # Copied from a retried trial that had resumed: not so for this one.
            trial.set_user_attr(RESUMED_FROM, None)
            trial.set_user_attr(EPOCHS_SAVED, 0)
        return snapshot

    def _take_over(
        self,
        trial: optuna.Trial,
        retried: int,
        saved: dict[str, object],
        config: TrainConfig,
        device: torch.device,
    ) -> TrialSnapshot | None:
        from model.trial_state import SnapshotError

        artifact = str(saved["artifact"])
        try:
            snapshot = self._read(artifact)
            snapshot.check_resumes(config, device)
        except SnapshotError as exc:
            self.log(
                f"trial {trial.number} starts from epoch 0: the checkpoint trial {retried} "
                f"left at epoch {saved.get('epoch')} {exc}"
            )
            self._remove(artifact)
            trial.storage.set_trial_system_attr(trial._trial_id, CHECKPOINT_ATTR, None)
            return None
        self.held[trial.number] = artifact
        # With the training seconds it carries (its earlier runs'), so that what an
        # interruption cost can be told from what it kept (benchmarks/study_record.py).
        seconds = round(snapshot.seconds, 3)
        resumed = {"trial": retried, "epoch": snapshot.epoch, "seconds": seconds}
        trial.set_user_attr(RESUMED_FROM, resumed)
        trial.set_user_attr(EPOCHS_SAVED, snapshot.epoch)
        storage = trial.storage
        before = storage.get_trial(
            storage.get_trial_id_from_study_id_trial_number(trial.study._study_id, retried)
        )
        for step, value in sorted(before.intermediate_values.items()):
            if step <= snapshot.epoch:
                storage.set_trial_intermediate_value(trial._trial_id, step, value)
        self.log(
            f"trial {trial.number} resumes trial {retried} from its checkpoint at epoch "
            f"{snapshot.epoch}"
        )
        return snapshot

    def _read(self, artifact: str) -> TrialSnapshot:
        import torch
        from optuna.artifacts.exceptions import ArtifactNotFound

        from model.trial_state import SnapshotError, TrialSnapshot

        try:
            with self.store.open_reader(artifact) as reader:
                body = reader.read()
        except ArtifactNotFound:
            raise SnapshotError("is missing from the artifact store") from None
        except OSError as exc:
            raise SnapshotError(f"cannot be read ({first_line(exc)})") from None
        try:
            payload = torch.load(io.BytesIO(body), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds for a damaged file
            raise SnapshotError(
                f"cannot be read ({type(exc).__name__}: {first_line(exc)})"
            ) from None
        return TrialSnapshot.from_payload(payload)

    def _remove(self, artifact: str | None) -> None:
        from optuna.artifacts.exceptions import ArtifactNotFound

        if artifact is None:
            return
        # Gone already, or on a host's disk that this one cannot write.
        with contextlib.suppress(ArtifactNotFound, OSError):
            self.store.remove(artifact)
