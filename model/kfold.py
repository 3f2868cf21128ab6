"""k-fold cross-validation of one configuration, the k fold models trained as one stack.

Data flow, per trial: the training images already sit on the device (`DeviceData`);
`split_folds` picks the same k folds for every configuration; the k networks live in one
`StackedFFNN`, so each optimizer step is one batched matmul per layer for all folds.

Early stopping never waits on the host inside the epoch loop. Each fold's best
validation loss, best epoch, patience counter and best weights are device tensors updated
with `torch.where`; the host reads them back only every `sync_every` epochs to learn
whether every fold has stopped. A fold that stopped keeps being computed until then (its
results are frozen at its stop epoch, so the numbers do not depend on `sync_every`).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from model.config import TrainConfig
from model.cpu_step import CpuStep
from model.data import DeviceData
from model.network import StackedFFNN

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


@contextlib.contextmanager
def seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's random streams (dropout, batch order) for a block, then restore them,
    so training is reproducible without disturbing the caller's random state."""
    devices = []
    if device.type == "cuda":
        devices = [torch.cuda.current_device() if device.index is None else device.index]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def initial_model(config: TrainConfig) -> StackedFFNN:
    """The k fold networks before training, drawn on the CPU from `config.seed`."""
    model = StackedFFNN(config.k, config.hidden, config.activation, config.dropout)
    model.reset_parameters(torch.Generator().manual_seed(config.seed))
    return model


def make_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Adam or Adamax with the L2 penalty as `weight_decay`, as the seed report trains.

    Both act element by element, so on a stacked model each fold has its own optimizer
    state in effect.
    """
    params = list(model.parameters())
    if config.optimizer == "adam":
        # The fused kernel updates each tensor in one pass: on the CPU a mini-batch step
        # of the report's network took 0.28 ms fused against 1.09 ms unfused.
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    # Adamax has no fused kernel; the multi-tensor one is the fastest there is.
    return torch.optim.Adamax(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


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
    `AutogradStep`). Same config, data and seed on the CPU → same numbers.

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


class AutogradStep:
    """The training step through autograd: any device, any precision. See `make_step`.

    `bf16` runs forward and loss under autocast (matrix products in bfloat16, weights
    and optimizer in float32). `compile` hands forward and loss to `torch.compile`; on a
    GPU in "reduce-overhead" mode, which captures the step's kernels as CUDA graphs and
    replays them, so a step costs one launch instead of dozens. Backward follows from the
    compiled forward; the optimizer step stays eager (it is one fused kernel already).
    """

    def __init__(
        self,
        model: StackedFFNN,
        optimizer: torch.optim.Optimizer,
        *,
        bf16: bool = False,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.bf16 = bf16
        self.forward = self._forward
        if compile:
            cuda = model.weights[0].device.type == "cuda"
            self.forward = torch.compile(self._forward, mode="reduce-overhead" if cuda else None)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.model.k
        device_type = x.device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        correct = (logits.argmax(dim=2) == y).sum(dim=1)
        return losses.view(k, -1).mean(dim=1), correct

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        per_network, correct = self.forward(x, y)
        self.optimizer.zero_grad(set_to_none=True)
        # Summing the networks' losses gives each one's weights exactly its own gradient.
        per_network.sum().backward()
        self.optimizer.step()
        return per_network.detach(), correct

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy (k,) without dropout, whatever mode the model is in."""
        k = self.model.k
        training = self.model.training
        self.model.eval()
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x).float()
        self.model.train(training)
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        accuracy = (logits.argmax(dim=2) == y).float().mean(dim=1)
        return losses.view(k, -1).mean(dim=1), accuracy


Step = AutogradStep | CpuStep


PRECISIONS = ("fp32", "tf32", "bf16")


def make_step(
    model: StackedFFNN,
    optimizer: torch.optim.Optimizer,
    max_rows: int,
    *,
    precision: str = "fp32",
    compile: bool = False,
    hand_written: bool | None = None,
) -> Step:
    """The fastest training step for the model's device: one optimizer step for all k
    networks on a (k, B, 784) batch, returning each network's mean loss and count of
    correct predictions (k,), both left on the device; and `evaluate`, without dropout.

    On the CPU in float32 that is `CpuStep`, written by hand into preallocated buffers;
    `hand_written=False` asks for the autograd step instead (the tests compare the two).
    """
    if hand_written is None:
        on_cpu = model.weights[0].device.type == "cpu"
        hand_written = on_cpu and precision == "fp32" and not compile
    if hand_written:
        return CpuStep(model, optimizer, max_rows)
    return AutogradStep(model, optimizer, bf16=precision == "bf16", compile=compile)


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """`None` → tf32 on a GPU (tensor cores, ~10 mantissa bits in the products), fp32 on
    the CPU; tf32 is refused on the CPU, which has no such mode."""
    if precision is None:
        return "tf32" if device.type == "cuda" else "fp32"
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: must be one of {', '.join(PRECISIONS)}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError("precision tf32: a CUDA setting; on the CPU use fp32 or bf16")
    return precision


@contextlib.contextmanager
def matmul_precision(precision: str, device: torch.device) -> Iterator[None]:
    """TF32 tensor-core products on a GPU for the block when `precision` is tf32."""
    if device.type != "cuda":
        yield
        return
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def train_epoch(
    step: Step,
    data: DeviceData,
    train_idx: torch.Tensor,
    batch_size: int,
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of each network over its rows of `train_idx` (k, n); returns the mean
    training loss and accuracy per network (with dropout on, as training sees them).

    `gathered` — the (k, n, 784) images and (k, n) labels of `train_idx`, gathered once
    by the caller — means full batch: one step per epoch.
    """
    k, n = train_idx.shape
    if gathered is not None:
        loss, correct = step(*gathered)
        return loss, correct / n
    # Each network shuffles its own rows; batches are cut by indexing, no DataLoader.
    order = train_idx.gather(1, torch.rand(k, n, device=data.device).argsort(dim=1))
    total_loss = torch.zeros(k, device=data.device)
    total_correct = torch.zeros(k, device=data.device)
    for start in range(0, n, batch_size):
        batch = order[:, start : start + batch_size]
        loss, correct = step(*data.gather(batch))
        total_loss += loss * batch.shape[1]
        total_correct += correct
    return total_loss / n, total_correct / n


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
