"""k-fold cross-validation of one configuration, the k fold models trained as one stack.

How fast it is, on the project's CPU and on GPUs: benchmarks/README.md (the report's
network on 5 folds of 60,000 images: 0.497 s per model-epoch on 2 CPU cores, 3.2× a
naive fold-after-fold trainer; about 5 ms per 5-fold epoch on an H100). The fused first
layer, against the padded stack it replaced: 0.472 against 0.520 s per model-epoch on the
CPU; on a GPU predicted 2.5× faster (13.3 ms an epoch of 8 seed trials, H200; unmeasured).

Data flow, per trial: the training images already sit on the device (`DeviceData`);
`split_folds` picks the same k folds for every configuration; the k networks live in one
`StackedFFNN`, and each step (`model.steps`) advances all of them at once. Each fold
stops early on its own, without the epoch loop waiting on the host
(`model.early_stopping`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from model.config import TrainConfig
from model.data import DeviceData
from model.early_stopping import FoldState
from model.network import NetShape, StackedFFNN
from model.optimizers import Optimizer, make_optimizer
from model.steps import (
    TrialStreams,
    make_step,
    matmul_precision,
    resolve_precision,
    train_epoch,
)
from model.trial_state import TrialSnapshot, restore_snapshot, take_snapshot

_log = logging.getLogger(__name__)


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
    per fold, one value per epoch that fold ran, for each name in
    `model.early_stopping.CURVES` (training figures are the epoch's running means, with
    dropout on).
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
    model = StackedFFNN([net_shape(config)], config.k)
    model.reset_parameters(config.seed)
    return model


def steps_per_epoch(n_train: int, batch_size: int) -> int:
    """Optimizer steps in one epoch over `n_train` rows in batches of `batch_size`."""
    return -(-n_train // batch_size)


def net_shape(config: TrainConfig) -> NetShape:
    return NetShape(
        config.hidden,
        config.activation,
        config.dropout,
        config.input_dropout,
        config.label_smoothing,
    )


# Eager epochs before an epoch is captured as a CUDA graph: the first calls set up cuBLAS
# handles, autograd's buffers and the allocator's blocks, which a capture must not do.
GRAPH_WARMUP_EPOCHS = 2

# The optimizers `StackedAdam` steps, and so the only ones a captured epoch can hold;
# a stack with any other trains eagerly.
GRAPH_OPTIMIZERS = ("adam", "adamax")

# What trials stacked together must share: they train on the same folds, with one batch
# size and one epoch loop.
STACK_FIELDS = ("k", "subset", "fold_seed", "batch_size", "max_epochs", "patience")


def stack_key(config: TrainConfig) -> tuple[object, ...]:
    """Configurations with equal keys can train as one stack (`train_trials`)."""
    return (len(config.hidden), *(getattr(config, name) for name in STACK_FIELDS))


def train_kfold(
    config: TrainConfig,
    data: DeviceData,
    *,
    sync_every: int | None = None,
    on_progress: Callable[[Progress], bool] | None = None,
    precision: str | None = None,
    compile: bool = False,
    graphs: bool = False,
) -> KFoldResult:
    """Cross-validate `config` on `data` (on its device): `train_trials` of one trial.

    `on_progress` is called every `sync_every` epochs (default: every 10 on a GPU at full
    batch, where an epoch is one step; every epoch elsewhere, where a read-back costs
    little beside the epoch); returning True stops the run,
    which is then marked `halted`. `precision` is fp32, tf32 or bf16 (default: tf32 on
    a GPU, fp32 on the CPU); `compile` hands the step to torch.compile (see
    `model.steps.AutogradStep`); `graphs`, on a GPU, captures whole epochs as one CUDA
    graph and replays it (`train_trials`). Same config, data and seed on the CPU → same
    numbers.
    """
    progress = None if on_progress is None else (lambda _trial, p: on_progress(p))
    return train_trials(
        [config],
        data,
        sync_every=sync_every,
        on_progress=progress,
        precision=precision,
        compile=compile,
        graphs=graphs,
    )[0]


def train_trials(
    configs: Sequence[TrainConfig],
    data: DeviceData,
    *,
    sync_every: int | None = None,
    on_progress: Callable[[int, Progress], bool] | None = None,
    on_result: Callable[[int, KFoldResult], None] | None = None,
    precision: str | None = None,
    compile: bool = False,
    graphs: bool = False,
    resume: Sequence[TrialSnapshot | None] | None = None,
    checkpoint_due: Callable[[float], bool] | None = None,
    on_checkpoint: Callable[[dict[int, TrialSnapshot]], None] | None = None,
) -> list[KFoldResult]:
    """Cross-validate several configurations at once, their k folds each stacked into
    one `StackedFFNN`; returns their results in the order given.

    They must share `stack_key` (depth, k, folds, batch size, epochs, patience); widths,
    activation, dropout, optimizer, learning rate, penalty and seed may differ. Each
    trial trains exactly as it would alone, up to the order of floating-point sums: its
    own initial weights (`StackedFFNN.reset_parameters`), its own random stream
    (`TrialStreams`), its own optimizer (`TrialOptimizers`; `StackedAdam` under
    `graphs`), its own early stopping.

    Every `sync_every` epochs `on_progress(i, progress)` hears of each trial i still
    training; True stops that trial alone (`halted`). A trial ends when all its folds
    have stopped, when one diverges, or when it is halted; `on_result(i, result)` hears
    of it then, and its networks leave the stack (the stack is rebuilt without them), so
    a finished trial costs nothing more.

    `resume[i]` is a `TrialSnapshot` trial i goes on from (all of one epoch, or none).
    At each read-back, if `checkpoint_due(seconds since the last)`, `on_checkpoint` gets
    a snapshot of each trial still training, by trial.

    `graphs` (GPU only; ignored on the CPU, and for stacks with AdamW or SGD, which
    `StackedAdam` does not step): after two eager epochs, one epoch —
    training steps, validation, early-stopping bookkeeping — is captured as a CUDA graph
    and replayed for every later epoch (and captured again when the stack shrinks), so
    an epoch costs one launch; the host still reads only every `sync_every` epochs. Its
    numbers are the eager path's, except that replays draw other dropout masks from the
    same generators.

    The random stream of each trial: a generator on the data's device seeded with its
    `seed`. At mini-batch, each epoch first draws `rand(k, n_train)`, whose row j's
    argsort orders fold j's training rows; then every step draws one keep mask over
    (k, B, 784) for the pixels (if the trial drops inputs), then, for each hidden layer in
    turn, one over (k, B, width) (if it drops units), with `model.dropout.keep_mask`. Initial
    weights come from their own generator (`initial_model`). tests/reference.py rebuilds
    each fold from these rules alone.
    """
    configs = list(configs)
    if not configs:
        return []
    if len({stack_key(c) for c in configs}) > 1:
        raise ValueError(
            "only configurations of one depth, k, subset, fold_seed, batch_size, "
            "max_epochs and patience train as one stack"
        )
    device = data.device
    precision = resolve_precision(precision, device)
    if sync_every is None:
        # A read-back costs a GPU the work it could queue meanwhile: at full batch (one
        # step an epoch) that is worth saving; an epoch of mini-batches dwarfs it.
        full_batch = configs[0].full_batch
        sync_every = 10 if device.type == "cuda" and full_batch else 1
    # A captured step needs StackedAdam, which knows Adam and Adamax only.
    graphs = (
        graphs and device.type == "cuda" and all(c.optimizer in GRAPH_OPTIMIZERS for c in configs)
    )
    trainer = _Trainer(configs, data, precision, compile, graphs)
    if resume is not None:
        trainer.resume(list(resume))
    with matmul_precision(precision, device):
        return trainer.run(sync_every, on_progress, on_result, checkpoint_due, on_checkpoint)


class _Trainer:
    """The epoch loop over a stack of trials, rebuilt smaller as trials end."""

    def __init__(
        self,
        configs: list[TrainConfig],
        data: DeviceData,
        precision: str,
        compile: bool,
        graphs: bool,
    ) -> None:
        self.configs = configs
        self.data = data
        self.precision = precision
        self.compile = compile
        self.graphs = graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.eager_epochs = 0
        # Warm-up epochs before a capture run on a side stream, as torch asks. One for the
        # trainer's life: the caching allocator reuses a block only on the stream that
        # allocated it, so a new stream each epoch would hold a second set of buffers.
        self.side_stream = torch.cuda.Stream(data.device) if graphs else None
        self.started = time.perf_counter()
        first = configs[0]
        device = data.device
        self.train_idx, val_idx = (idx.to(device) for idx in split_folds(len(data), first))
        n_train = self.train_idx.shape[1]
        # Validation sets never change: gather them once.
        self.x_val, self.y_val = data.gather(val_idx)
        self.full_batch = first.full_batch or first.batch_size >= n_train
        self.batch_size = n_train if self.full_batch else first.batch_size
        # One training part per fold, shared by every trial: at full batch gather it once.
        self.x_train = self.y_train = None
        if self.full_batch:
            self.x_train, self.y_train = data.gather(self.train_idx)
        # The trials still training, by their position in the stack.
        self.live = list(range(len(configs)))
        model = StackedFFNN([net_shape(c) for c in configs], first.k, device=device)
        model.reset_parameters([c.seed for c in configs])
        streams = TrialStreams([c.seed for c in configs], device)
        # A captured epoch needs an optimizer whose step count lives on the device.
        total_steps = first.max_epochs * steps_per_epoch(n_train, self.batch_size)
        optimizer = make_optimizer(model, configs, total_steps=total_steps, capturable=graphs)
        self._build(model, optimizer, streams)
        self.state = FoldState(model, first.max_epochs, device)
        # Training time before this run, per trial: a resumed trial's earlier runs.
        self.seconds_before = [0.0] * len(configs)

    def _build(self, model: StackedFFNN, optimizer: Optimizer, streams: TrialStreams) -> None:
        self.model = model
        self.optimizer = optimizer
        self.streams = streams
        self.step = make_step(
            model,
            optimizer,
            self.batch_size,
            streams.generators,
            precision=self.precision,
            compile=self.compile,
        )
        # Each fold's rows, shared by every trial's network of that fold: never repeated.
        self.gathered = (self.x_train, self.y_train) if self.full_batch else None

    def resume(self, snapshots: list[TrialSnapshot | None]) -> None:
        """Put each trial's snapshot (`snapshots[i]` for trial i) into the fresh stack."""
        if len(snapshots) != len(self.configs):
            raise ValueError(f"{len(snapshots)} snapshots for {len(self.configs)} trials")
        if all(s is None for s in snapshots):
            return
        if len({None if s is None else s.epoch for s in snapshots}) > 1:
            raise ValueError("trials resumed in one stack must all stop at one epoch")
        for position, trial in enumerate(self.live):
            snapshot = snapshots[trial]
            assert snapshot is not None
            config = self.configs[trial]
            snapshot.check_resumes(config, self.data.device)
            restore_snapshot(self, position, config, snapshot)
            self.seconds_before[trial] = snapshot.seconds

    def run(
        self,
        sync_every: int,
        on_progress: Callable[[int, Progress], bool] | None,
        on_result: Callable[[int, KFoldResult], None] | None,
        checkpoint_due: Callable[[float], bool] | None = None,
        on_checkpoint: Callable[[dict[int, TrialSnapshot]], None] | None = None,
    ) -> list[KFoldResult]:
        results: list[KFoldResult | None] = [None] * len(self.configs)
        max_epochs = self.configs[0].max_epochs
        patience = self.configs[0].patience
        k = self.model.k
        last_checkpoint = time.perf_counter()
        for epoch in range(self.state.epochs_done + 1, max_epochs + 1):
            if self.graph is None and self.graphs and self.eager_epochs >= GRAPH_WARMUP_EPOCHS:
                self.graph = self._capture(patience)
            if self.graph is not None:
                self.graph.replay()
            elif self.graphs:
                side = self.side_stream
                side.wait_stream(torch.cuda.current_stream(self.data.device))
                with torch.cuda.stream(side):
                    self._epoch(patience)
                torch.cuda.current_stream(self.data.device).wait_stream(side)
                self.eager_epochs += 1
            else:
                self._epoch(patience)
                self.eager_epochs += 1
            self.state.epochs_done = epoch
            if epoch % sync_every and epoch != max_epochs:
                continue
            # The only host sync of the loop: one small read every `sync_every` epochs.
            active, diverged, accuracy = (
                torch.stack(
                    [
                        self.state.active.float(),
                        (self.state.diverged_epoch > 0).float(),
                        self.state.best_accuracy,
                    ]
                )
                .view(3, -1, k)
                .tolist()
            )
            ended = []
            for position, trial in enumerate(self.live):
                halted = False
                if not any(diverged[position]) and on_progress is not None:
                    mean = sum(accuracy[position]) / k
                    halted = on_progress(trial, Progress(epoch, mean, int(sum(active[position]))))
                last = halted or any(diverged[position]) or not any(active[position])
                if last or epoch == max_epochs:
                    ended.append((position, halted))
            for position, halted in ended:
                trial = self.live[position]
                result = KFoldResult(
                    config=self.configs[trial],
                    seconds=self._seconds(trial),
                    device=str(self.data.device),
                    halted=halted,
                    **self.state.outcome(position),
                )
                results[trial] = result
                if on_result is not None:
                    on_result(trial, result)
            if ended:
                gone = {p for p, _ in ended}
                keep = [p for p in range(len(self.live)) if p not in gone]
                if not keep:
                    break
                self._compact(keep)
            since = time.perf_counter() - last_checkpoint
            if on_checkpoint is not None and checkpoint_due is not None and checkpoint_due(since):
                on_checkpoint(
                    {
                        trial: take_snapshot(
                            self, position, self.configs[trial], self._seconds(trial)
                        )
                        for position, trial in enumerate(self.live)
                    }
                )
                last_checkpoint = time.perf_counter()
        if self.data.device.type == "cuda":
            torch.cuda.synchronize(self.data.device)
        return [r for r in results if r is not None]

    def _seconds(self, trial: int) -> float:
        return self.seconds_before[trial] + time.perf_counter() - self.started

    def _epoch(self, patience: int) -> None:
        """One epoch of every network: training, validation, bookkeeping. Nothing in it
        reads back to the host, so it can be captured as one CUDA graph and replayed."""
        self.state.epoch += 1
        train_loss, train_accuracy = train_epoch(
            self.step, self.data, self.train_idx, self.batch_size, self.streams, self.gathered
        )
        val_loss, val_accuracy = self.step.evaluate(self.x_val, self.y_val)
        with torch.no_grad():
            self.state.record(
                self.state.epoch, train_loss, train_accuracy, val_loss, val_accuracy, patience
            )

    def _capture(self, patience: int) -> torch.cuda.CUDAGraph | None:
        """The epoch as a CUDA graph, after `GRAPH_WARMUP_EPOCHS` eager ones (which set
        up cuBLAS, autograd and the allocator); None where it cannot be captured, and the
        stack trains on in eager epochs, which give the same numbers: a capture that fails
        must cost a study its speed, never its trials."""
        graph = torch.cuda.CUDAGraph()
        try:
            for generator in self.streams.generators:
                graph.register_generator_state(generator)
            torch.cuda.synchronize(self.data.device)
            # A failed capture leaves the epoch's tensors as they were: captured kernels
            # are recorded, not run, so the eager epoch that follows starts clean.
            with torch.cuda.graph(graph):
                self._epoch(patience)
        except (AttributeError, RuntimeError) as exc:
            self.graphs = False
            _log.warning(
                "CUDA graph capture failed (%s: %s); this stack of %d trial(s) trains on in "
                "eager epochs",
                type(exc).__name__,
                str(exc).splitlines()[0] if str(exc) else "",
                len(self.live),
            )
            return None
        return graph

    def _compact(self, keep: list[int]) -> None:
        """Rebuild the stack from the trials at positions `keep`, where they stand."""
        model = self.model.select(keep)
        index = self.model.network_index(keep)
        optimizer = self.optimizer.select(model, keep, index)
        self.live = [self.live[p] for p in keep]
        self.state = self.state.select(model, keep, index)
        self._build(model, optimizer, self.streams.select(keep))
        # A new stack has new shapes: warm up and capture it afresh.
        self.graph = None
        self.eager_epochs = 0
