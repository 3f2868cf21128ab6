"""Early stopping of every network in a stack, kept on the device: each fold's best
validation loss, accuracy and epoch, its patience count, its best weights and its
learning curves (`FoldState`).

Its own file because it is the part of training that decides when a network is done and
which of its weights count; the epoch loop (`model.kfold`) only books each epoch
(`record`), reads back now and then which folds are still active, and asks for a trial's
`outcome` when it ends.

Early stopping never waits on the host inside the epoch loop. Each fold's best
validation loss, best epoch, patience counter and best weights are device tensors updated
with `torch.where`; the host reads them back only every `sync_every` epochs to learn
whether every fold has stopped. A fold that stopped keeps being computed until then (its
results are frozen at its stop epoch, so the numbers do not depend on `sync_every`).
"""

from __future__ import annotations

import math
from typing import TypedDict

import torch

from model.network import StackedFFNN

CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")
# `FoldState`'s tensors of one value a network, (n,) over the stack.
PER_NETWORK = (
    "best_loss",
    "best_accuracy",
    "best_epoch",
    "bad_epochs",
    "stop_epoch",
    "active",
    "diverged_epoch",
)


class FoldOutcome(TypedDict):
    """What a trial's folds reached, as `model.kfold.KFoldResult` holds it."""

    fold_accuracies: list[float]
    fold_losses: list[float]
    best_epochs: list[int]
    epochs_run: list[int]
    curves: dict[str, list[list[float]]]
    diverged: str | None
    model: StackedFFNN


class FoldState:
    """Each network's early-stopping bookkeeping, as device tensors of shape (n,)."""

    def __init__(self, model: StackedFFNN, max_epochs: int, device: torch.device) -> None:
        n = model.n
        self.model = model
        self.best_loss = torch.full((n,), math.inf, device=device)
        self.best_accuracy = torch.zeros(n, device=device)
        self.best_epoch = torch.zeros(n, dtype=torch.int64, device=device)
        self.bad_epochs = torch.zeros(n, dtype=torch.int64, device=device)
        self.stop_epoch = torch.full((n,), max_epochs, dtype=torch.int64, device=device)
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.diverged_epoch = torch.zeros(n, dtype=torch.int64, device=device)
        # Laid out as the stack's `flat`: one pass keeps every improved network's weights.
        self.best = model.flat.detach().clone()
        # Rows: CURVES; filled per epoch.
        self.curves = torch.full((max_epochs, len(CURVES), n), math.nan, device=device)
        # Epochs booked: on the device, counted up by each (maybe replayed) epoch; and
        # as the host last read it.
        self.epoch = torch.zeros((), dtype=torch.int64, device=device)
        self.epochs_done = 0

    def select(self, model: StackedFFNN, keep: list[int], index: torch.Tensor) -> FoldState:
        """The bookkeeping of the trials at positions `keep` (networks `index`), for
        their new stack `model`."""
        kept = object.__new__(FoldState)
        kept.model = model
        for name in PER_NETWORK:
            setattr(kept, name, getattr(self, name).index_select(0, index))
        kept.best = self.model.gather(self.best, keep)
        kept.curves = self.curves.index_select(2, index)
        kept.epoch = self.epoch.clone()
        kept.epochs_done = self.epochs_done
        return kept

    def record(
        self,
        epoch: torch.Tensor,
        train_loss: torch.Tensor,
        train_accuracy: torch.Tensor,
        val_loss: torch.Tensor,
        val_accuracy: torch.Tensor,
        patience: int,
    ) -> None:
        """Book epoch `epoch` (1-based, a 0-d int64 device tensor) for the networks still
        active; no host sync. Every update is in place, so that a CUDA graph that captured
        this call reads and writes the same tensors when it is replayed."""
        row = torch.stack([train_loss, train_accuracy, val_loss, val_accuracy])
        self.curves.index_copy_(0, (epoch - 1).view(1), row.unsqueeze(0))
        finite = torch.isfinite(train_loss) & torch.isfinite(val_loss)
        newly_diverged = self.active & ~finite
        self.diverged_epoch.copy_(torch.where(newly_diverged, epoch, self.diverged_epoch))
        improved = self.active & finite & (val_loss < self.best_loss)
        self.best_loss.copy_(torch.where(improved, val_loss, self.best_loss))
        self.best_accuracy.copy_(torch.where(improved, val_accuracy, self.best_accuracy))
        self.best_epoch.copy_(torch.where(improved, epoch, self.best_epoch))
        self.bad_epochs.copy_(torch.where(improved, 0, self.bad_epochs + 1))
        with torch.no_grad():
            improved_elements = improved.index_select(0, self.model.element_network)
            self.best.copy_(torch.where(improved_elements, self.model.flat, self.best))
        stopping = self.active & ((self.bad_epochs >= patience) | newly_diverged)
        self.stop_epoch.copy_(torch.where(stopping, epoch, self.stop_epoch))
        self.active &= ~stopping

    def outcome(self, position: int) -> FoldOutcome:
        """The trial at `position` in the stack: its folds' figures and best weights."""
        networks = self.model.trial(position)
        k = self.model.k
        model = self.model.select([position], self.best)
        stop = self.stop_epoch[networks].clamp(max=self.epochs_done).tolist()
        curves = self.curves[:, :, networks].cpu()
        per_fold = {
            name: [curves[: stop[j], row, j].tolist() for j in range(k)]
            for row, name in enumerate(CURVES)
        }
        diverged = None
        for j, epoch in enumerate(self.diverged_epoch[networks].tolist()):
            if epoch:
                diverged = f"fold {j + 1} loss became non-finite at epoch {epoch}"
                break
        return FoldOutcome(
            fold_accuracies=self.best_accuracy[networks].tolist(),
            fold_losses=self.best_loss[networks].tolist(),
            best_epochs=self.best_epoch[networks].tolist(),
            epochs_run=stop,
            curves=per_fold,
            diverged=diverged,
            model=model,
        )
