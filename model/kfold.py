"""k-fold cross-validation of one configuration, the k fold models trained as one stack.

How fast, measured 2026-11-27 (benchmarks/README.md, README.md's Results):
- AMD EPYC, 2 cores, no GPU, torch 2.14.1: the report's network (784-249-36-10, relu,
  dropout 0.35, Adam) on 5 folds of all 60,000 training images trains at 0.497 s per
  model-epoch (one fold's network over its 48,000 training images) at full batch — 3.22×
  a naive fold-after-fold trainer, 0.86 of the speed of its bare matrix products — and
  0.557 s at mini-batches of 256 (1.87×; 0.73). `mnist-study train --preset quick` (that
  network, 3 folds of the 12,000-image subset) reaches a mean validation accuracy of
  0.9528 ± 0.0028.
- One NVIDIA H100 80GB, torch 2.11, TF32: 0.002 s per model-epoch at full batch (422.7×
  naive); a trial of the seed preset takes about 5 ms per 5-fold epoch (10.9 s for the cap
  of 2,000 epochs). The quick study there reached a best mean validation accuracy of
  0.9525, and a test accuracy of 0.9620 once retrained.

Data flow, per trial: the training images already sit on the device (`DeviceData`);
`split_folds` picks the same k folds for every configuration; the k networks live in one
`StackedFFNN`, and each step (`model.steps`) advances all of them at once.

Early stopping never waits on the host inside the epoch loop. Each fold's best
validation loss, best epoch, patience counter and best weights are device tensors updated
with `torch.where`; the host reads them back only every `sync_every` epochs to learn
whether every fold has stopped. A fold that stopped keeps being computed until then (its
results are frozen at its stop epoch, so the numbers do not depend on `sync_every`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from model.config import TrainConfig
from model.data import DeviceData
from model.network import StackedFFNN
from model.steps import (
    make_optimizer,
    make_step,
    matmul_precision,
    resolve_precision,
    seeded,
    train_epoch,
)

CURVES = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


@dataclass(frozen=True)
class Progress:
    """What the trainer tells its caller every `sync_every` epochs."""

    epoch: int
    """Epochs completed (1-based)."""
    mean_accuracy: float
    """Mean over folds of each fold's validation accuracy at its best epoch so far."""
    active_folds: int


@dataclass(frozen=True)
class KFoldResult:
    """The outcome of one k-fold cross-validation.

    Epoch numbers are 1-based. A fold's accuracy and loss are its validation figures at
    its best epoch (lowest validation loss), whose weights `model` holds. `curves` has,
    per fold, one value per epoch that fold ran, for each name in `CURVES` (training
    figures are the epoch's running means, with dropout on).
    `diverged` names the fold and epoch whose loss became NaN or infinite; `halted` says
    the caller's `on_progress` stopped the run.
    """

    config: TrainConfig
    fold_accuracies: list[float]
    fold_losses: list[float]
    best_epochs: list[int]
    epochs_run: list[int]
    curves: dict[str, list[list[float]]]
    seconds: float
    device: str
    diverged: str | None = None
    halted: bool = False
    model: StackedFFNN | None = field(default=None, repr=False, compare=False)

    @property
    def mean_accuracy(self) -> float:
        return sum(self.fold_accuracies) / len(self.fold_accuracies)

    @property
    def std_accuracy(self) -> float:
        mean = self.mean_accuracy
        return math.sqrt(
            sum((a - mean) ** 2 for a in self.fold_accuracies) / len(self.fold_accuracies)
        )

    def summary(self) -> dict[str, object]:
        """The JSON-ready figures (no curves, no weights)."""
        return {
            "mean_accuracy": self.mean_accuracy,
            "std_accuracy": self.std_accuracy,
            "fold_accuracies": self.fold_accuracies,
            "fold_losses": self.fold_losses,
            "best_epochs": self.best_epochs,
            "epochs_run": self.epochs_run,
            "seconds": self.seconds,
            "device": self.device,
            "diverged": self.diverged,
            "halted": self.halted,
            "params": self.config.params(),
        }


def split_folds(n_images: int, config: TrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The folds, as indices into the training images: (train (k, m·(k-1)), val (k, m)).

    One permutation from `fold_seed` picks the subset (its first `subset` images) and
    cuts it into k consecutive folds of m images each; the `n mod k` images left over are
    not used, so every fold has the same shape and the stack needs no padding. Fold j
    validates on part j and trains on the other parts, concatenated in order.
    """
    subset = training_subset(n_images, config)
    k = config.k
    m = len(subset) // k
    if m < 1:
        raise ValueError(f"{len(subset)} images cannot make {k} folds")
    parts = subset[: m * k].view(k, m)
    val = parts
    train = torch.stack([torch.cat([parts[i] for i in range(k) if i != j]) for j in range(k)])
    return train, val


def training_subset(n_images: int, config: TrainConfig) -> torch.Tensor:
    """The training images a configuration learns from, in the order `fold_seed` shuffles
    them: the folds are cut from it, and the final model is retrained on all of it."""
    n = n_images if config.subset is None else min(config.subset, n_images)
    generator = torch.Generator().manual_seed(config.fold_seed)
    return torch.randperm(n_images, generator=generator)[:n]


def initial_model(config: TrainConfig) -> StackedFFNN:
    """The k fold networks before training, drawn on the CPU from `config.seed`."""
    model = StackedFFNN(config.k, config.hidden, config.activation, config.dropout)
    model.reset_parameters(torch.Generator().manual_seed(config.seed))
    return model


def train_kfold(
    config: TrainConfig,
    data: DeviceData,
    *,
    sync_every: int | None = None,
    on_progress: Callable[[Progress], bool] | None = None,
    precision: str | None = None,
    compile: bool = False,
) -> KFoldResult:
    """Cross-validate `config` on `data` (on its device); see the module docstring.

    `on_progress` is called every `sync_every` epochs (default: every epoch on the CPU,
    where reading back costs nothing, every 10 on a GPU); returning True stops the run,
    which is then marked `halted`. `precision` is fp32, tf32 or bf16 (default: tf32 on
    a GPU, fp32 on the CPU); `compile` hands the step to torch.compile (see
    `model.steps.AutogradStep`). Same config, data and seed on the CPU → same numbers.

    The random stream: torch's generator on the data's device, seeded with `config.seed`
    as training starts (and restored afterwards). At mini-batch, each epoch first draws
    `rand(k, n_train)`, whose row j's argsort orders fold j's training rows; then every
    step draws, for each hidden layer in turn, one keep mask over (k, B, width) — on the
    CPU in float32 with `model.dropout.keep_mask`, elsewhere with `F.dropout`. Initial
    weights come from their own generator (`initial_model`). tests/reference.py rebuilds
    each fold from these rules alone.
    """
    device = data.device
    precision = resolve_precision(precision, device)
    if sync_every is None:
        sync_every = 1 if device.type == "cpu" else 10
    started = time.perf_counter()
    with seeded(config.seed, device), matmul_precision(precision, device):
        state = _run(config, data, sync_every, on_progress, precision, compile)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return state.result(config, device, time.perf_counter() - started)


class _FoldState:
    """Each fold's early-stopping bookkeeping, as device tensors of shape (k,)."""

    def __init__(self, model: StackedFFNN, max_epochs: int, device: torch.device) -> None:
        k = model.k
        self.model = model
        self.best_loss = torch.full((k,), math.inf, device=device)
        self.best_accuracy = torch.zeros(k, device=device)
        self.best_epoch = torch.zeros(k, dtype=torch.int64, device=device)
        self.bad_epochs = torch.zeros(k, dtype=torch.int64, device=device)
        self.stop_epoch = torch.full((k,), max_epochs, dtype=torch.int64, device=device)
        self.active = torch.ones(k, dtype=torch.bool, device=device)
        self.diverged_epoch = torch.zeros(k, dtype=torch.int64, device=device)
        self.best_params = [p.detach().clone() for p in model.parameters()]
        # Rows: CURVES; filled per epoch.
        self.curves = torch.full((max_epochs, len(CURVES), k), math.nan, device=device)
        self.epochs_done = 0
        self.halted = False

    def record(
        self,
        epoch: int,
        train_loss: torch.Tensor,
        train_accuracy: torch.Tensor,
        val_loss: torch.Tensor,
        val_accuracy: torch.Tensor,
        patience: int,
    ) -> None:
        """Book epoch `epoch` (1-based) for the folds still active; no host sync."""
        self.curves[epoch - 1] = torch.stack([train_loss, train_accuracy, val_loss, val_accuracy])
        finite = torch.isfinite(train_loss) & torch.isfinite(val_loss)
        newly_diverged = self.active & ~finite
        self.diverged_epoch = torch.where(newly_diverged, epoch, self.diverged_epoch)
        improved = self.active & finite & (val_loss < self.best_loss)
        self.best_loss = torch.where(improved, val_loss, self.best_loss)
        self.best_accuracy = torch.where(improved, val_accuracy, self.best_accuracy)
        self.best_epoch = torch.where(improved, epoch, self.best_epoch)
        self.bad_epochs = torch.where(improved, 0, self.bad_epochs + 1)
        with torch.no_grad():
            for best, param in zip(self.best_params, self.model.parameters(), strict=True):
                best.copy_(torch.where(improved.view(-1, 1, 1), param, best))
        stopping = self.active & ((self.bad_epochs >= patience) | newly_diverged)
        self.stop_epoch = torch.where(stopping, epoch, self.stop_epoch)
        self.active = self.active & ~stopping
        self.epochs_done = epoch

    def result(self, config: TrainConfig, device: torch.device, seconds: float) -> KFoldResult:
        with torch.no_grad():
            for best, param in zip(self.best_params, self.model.parameters(), strict=True):
                param.copy_(best)
        stop = self.stop_epoch.clamp(max=self.epochs_done).tolist()
        curves = self.curves.cpu()
        per_fold = {
            name: [curves[: stop[j], row, j].tolist() for j in range(config.k)]
            for row, name in enumerate(CURVES)
        }
        diverged_epoch = self.diverged_epoch.tolist()
        diverged = None
        for j, epoch in enumerate(diverged_epoch):
            if epoch:
                diverged = f"fold {j + 1} loss became non-finite at epoch {epoch}"
                break
        return KFoldResult(
            config=config,
            fold_accuracies=self.best_accuracy.tolist(),
            fold_losses=self.best_loss.tolist(),
            best_epochs=self.best_epoch.tolist(),
            epochs_run=stop,
            curves=per_fold,
            seconds=seconds,
            device=str(device),
            diverged=diverged,
            halted=self.halted,
            model=self.model,
        )


def _run(
    config: TrainConfig,
    data: DeviceData,
    sync_every: int,
    on_progress: Callable[[Progress], bool] | None,
    precision: str,
    compile: bool,
) -> _FoldState:
    device = data.device
    train_idx, val_idx = (idx.to(device) for idx in split_folds(len(data), config))
    n_train = train_idx.shape[1]
    # Validation sets never change: gather them once.
    x_val, y_val = data.gather(val_idx)
    full_batch = config.full_batch or config.batch_size >= n_train
    x_train = y_train = None
    if full_batch:
        # One step per epoch over each fold's whole training part: gather that once too.
        x_train, y_train = data.gather(train_idx)

    model = initial_model(config).to(device)
    optimizer = make_optimizer(model, config)
    state = _FoldState(model, config.max_epochs, device)
    batch_size = n_train if full_batch else config.batch_size
    step = make_step(model, optimizer, batch_size, precision=precision, compile=compile)

    for epoch in range(1, config.max_epochs + 1):
        model.train()
        train_loss, train_accuracy = train_epoch(
            step, data, train_idx, batch_size, (x_train, y_train) if full_batch else None
        )

        model.eval()
        val_loss, val_accuracy = step.evaluate(x_val, y_val)
        with torch.no_grad():
            state.record(epoch, train_loss, train_accuracy, val_loss, val_accuracy, config.patience)

        if epoch % sync_every == 0 or epoch == config.max_epochs:
            # The only host sync of the loop: one small read every `sync_every` epochs.
            active, diverged, mean_accuracy = torch.stack(
                [
                    state.active.sum().float(),
                    (state.diverged_epoch > 0).sum().float(),
                    state.best_accuracy.mean(),
                ]
            ).tolist()
            if diverged:
                break
            if on_progress is not None and on_progress(Progress(epoch, mean_accuracy, int(active))):
                state.halted = True
                break
            if not active:
                break
    return state
