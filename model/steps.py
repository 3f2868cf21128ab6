"""One training step for all k stacked networks, and what a training loop sets up around
it: the optimizer, the precision, the seeded random stream, one epoch of steps.

A step takes an (n, B, 784) batch with its (n, B) labels — or a (k, B, 784) one, fold
j's rows for network j of every trial — updates every network once and returns each
one's mean loss and count of correct predictions (n,), left on the device; its
`evaluate` scores them without dropout. Each trial in the stack draws its batch order and
dropout masks from its own generator (`TrialStreams`), so a trial trains the same
whatever it is stacked with. `make_step` picks the fastest for the device:
`model.cpu_step.CpuStep`, written by hand, on the CPU in float32; `AutogradStep`, plain
PyTorch through autograd, everywhere else. `model.kfold` and `model.retrain` train with
them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from model.config import PRECISIONS, TrainConfig
from model.cpu_step import CpuStep
from model.data import DeviceData
from model.dropout import keep_mask
from model.network import StackedFFNN, narrow


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
        optimizer: Optimizer,
        generators: list[torch.Generator],
        *,
        bf16: bool = False,
        compile: bool = False,
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        self.generators = generators
        self.bf16 = bf16
        self.forward = self._forward
        if compile:
            cuda = model.weights[0].device.type == "cuda"
            self.forward = torch.compile(self._forward, mode="reduce-overhead" if cuda else None)

    def _forward(
        self, x: torch.Tensor, y: torch.Tensor, masks: list[torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.model.n
        device_type = x.device.type
        # No autocast cache: a CUDA graph may capture this, and the cache would outlive it.
        with torch.autocast(
            device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False
        ):
            logits = self.model(x, masks)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        correct = (logits.argmax(dim=2) == y).sum(dim=1)
        return losses.view(n, -1).mean(dim=1), correct

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = tile(x, self.model.n), tile(y, self.model.n)
        masks = draw_masks(self.model, x.shape[1], self.generators)
        per_network, correct = self.forward(x, y, masks)
        self.optimizer.zero_grad(set_to_none=True)
        # Summing the networks' losses gives each one's weights exactly its own gradient.
        per_network.sum().backward()
        self.optimizer.step()
        return per_network.detach(), correct

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy (n,) without dropout."""
        n = self.model.n
        x, y = tile(x, n), tile(y, n)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x).float()
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        accuracy = (logits.argmax(dim=2) == y).float().mean(dim=1)
        return losses.view(n, -1).mean(dim=1), accuracy


def tile(x: torch.Tensor, n: int) -> torch.Tensor:
    """A (k, …) batch shared by the folds of every trial, repeated to the stack's n
    networks; an (n, …) batch as it is."""
    return x if x.shape[0] == n else x.repeat(n // x.shape[0], *([1] * (x.dim() - 1)))


def draw_masks(
    model: StackedFFNN, rows: int, generators: list[torch.Generator]
) -> list[torch.Tensor] | None:
    """One step's dropout for the autograd path: per hidden layer an (n, rows, width)
    tensor of 0 or 1/keep, each trial's part drawn from its own generator, layer by
    layer, by `keep_mask`'s rule (the order `CpuStep` draws in). None without dropout."""
    if all(shape.dropout == 0.0 for shape in model.shapes):
        return None
    device = model.weights[0].device
    dtype = model.weights[0].dtype
    masks = [torch.ones(model.n, rows, width, device=device, dtype=dtype) for width in model.hidden]
    for t, (shape, generator) in enumerate(zip(model.shapes, generators, strict=True)):
        if shape.dropout == 0.0:
            continue
        for mask, width in zip(masks, shape.hidden, strict=False):
            keep, kept = keep_mask(
                (model.k, rows, width), 1.0 - shape.dropout, generator=generator, device=device
            )
            mask[model.trial(t), :, :width] = keep.to(dtype) * (1.0 / kept)
    return masks


Step = AutogradStep | CpuStep


def make_step(
    model: StackedFFNN,
    optimizer: Optimizer,
    max_rows: int,
    generators: list[torch.Generator],
    *,
    precision: str = "fp32",
    compile: bool = False,
    hand_written: bool | None = None,
) -> Step:
    """The fastest training step for the model's device: one optimizer step for all n
    networks on an (n or k, B, 784) batch, returning each network's mean loss and count
    of correct predictions (n,), both left on the device; and `evaluate`, without
    dropout. `generators` holds each trial's random stream (`TrialStreams`).

    On the CPU in float32 that is `CpuStep`, written by hand into preallocated buffers;
    `hand_written=False` asks for the autograd step instead (the tests compare the two).
    """
    if hand_written is None:
        on_cpu = model.weights[0].device.type == "cpu"
        hand_written = on_cpu and precision == "fp32" and not compile
    if hand_written:
        return CpuStep(model, optimizer, max_rows, generators)
    return AutogradStep(model, optimizer, generators, bf16=precision == "bf16", compile=compile)


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
    streams: TrialStreams,
    gathered: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of each network over its fold's rows of `train_idx` (k, n); returns the
    mean training loss and accuracy per network (with dropout on, as training sees them).

    `gathered` — the (k, n, 784) images and (k, n) labels of `train_idx`, gathered once
    by the caller (or already repeated for every network) — means full batch: one step
    per epoch.
    """
    n = train_idx.shape[1]
    if gathered is not None:
        loss, correct = step(*gathered)
        return loss, correct / n
    order = streams.batch_order(train_idx)
    total_loss = torch.zeros(order.shape[0], device=data.device)
    total_correct = torch.zeros(order.shape[0], device=data.device)
    for start in range(0, n, batch_size):
        batch = order[:, start : start + batch_size]
        loss, correct = step(*data.gather(batch))
        total_loss += loss * batch.shape[1]
        total_correct += correct
    return total_loss / n, total_correct / n


class TrialStreams:
    """Each stacked trial's random stream: a generator on the training device, seeded
    with the trial's `seed`. At mini-batch it first draws, every epoch, `rand(k, n)`,
    whose row j's argsort orders fold j's training rows; then each step's dropout masks
    (`CpuStep`, `draw_masks`). Nothing else draws from it, so a trial's numbers do not
    depend on the trials beside it."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.device = device
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def select(self, trials: list[int]) -> TrialStreams:
        """The streams of these trials, where they stand (for a compacted stack)."""
        kept = TrialStreams([], self.device)
        kept.generators = [self.generators[t] for t in trials]
        return kept

    def batch_order(self, train_idx: torch.Tensor) -> torch.Tensor:
        """(n, rows): each network's training rows in this epoch's order."""
        k, n = train_idx.shape
        return torch.cat(
            [
                train_idx.gather(
                    1, torch.rand(k, n, generator=g, device=self.device).argsort(dim=1)
                )
                for g in self.generators
            ]
        )


def make_optimizer(
    model: StackedFFNN, configs: list[TrainConfig], *, capturable: bool = False
) -> Optimizer:
    """Adam or Adamax with the L2 penalty as `weight_decay`, as the seed report trains,
    one configuration per trial of the stack.

    Both act element by element, so on a stack each network has its own optimizer state
    in effect. Each trial gets torch's own optimizer over its networks (`TrialOptimizers`);
    a stack whose steps a CUDA graph will capture (`capturable`) gets `StackedAdam`
    instead: one update for the whole stack, its step count on the device.
    """
    if capturable:
        return StackedAdam(model, configs)
    return TrialOptimizers(model, configs)


class TrialOptimizers:
    """torch's Adam (fused) or Adamax (multi-tensor) for each trial, over its k networks:
    the leading slice of every stacked tensor, which is contiguous, so each trial's
    update is one fused pass. A trial's padding has zero gradients and stays zero.

    Measured on the project's 2-core CPU: one step for two trials of the quick preset
    (6 networks, 784-249-36-10) took 0.8 ms as fused Adam and 17 ms as `StackedAdam`'s
    element-wise sequence, which made stacked mini-batch training half as fast as one
    trial at a time (benchmarks/README.md). A mini-batch step of the report's network
    took 0.28 ms fused against 1.09 ms unfused.
    """

    def __init__(self, model: StackedFFNN, configs: list[TrainConfig]) -> None:
        self.model = model
        self.configs = list(configs)
        self.views = [
            [p.detach()[model.trial(t)] for p in model.parameters()] for t in range(len(configs))
        ]
        self.optimizers = [
            _torch_optimizer(views, config)
            for views, config in zip(self.views, configs, strict=True)
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model.parameters():
            param.grad = None

    def step(self) -> None:
        params = list(self.model.parameters())
        for t, (views, optimizer) in enumerate(zip(self.views, self.optimizers, strict=True)):
            # The step may have made new gradient tensors (autograd): see them through.
            for view, param in zip(views, params, strict=True):
                view.grad = param.grad[self.model.trial(t)]
            optimizer.step()

    def select(self, model: StackedFFNN, keep: list[int], index: torch.Tensor) -> TrialOptimizers:
        """The optimizers of the trials at positions `keep`, where they stand, on `model`
        (their stack)."""
        kept = TrialOptimizers(model, [self.configs[t] for t in keep])
        for new, t in enumerate(keep):
            old_views, old = self.views[t], self.optimizers[t]
            for old_view, view in zip(old_views, kept.views[new], strict=True):
                if old_view in old.state:
                    kept.optimizers[new].state[view] = {
                        name: narrow_like(value, view)
                        for name, value in old.state[old_view].items()
                    }
        return kept


def _torch_optimizer(params: list[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    # Adamax has no fused kernel; the multi-tensor one is the fastest there is.
    return torch.optim.Adamax(params, lr=config.lr, weight_decay=config.weight_decay, foreach=True)


def narrow_like(value: object, like: torch.Tensor) -> object:
    """Optimizer state cut to a narrower stack's shape: a tensor shaped as a parameter is
    cut to `like`'s (its corner holds the trial; the rest is padding); anything else
    (the step count) is copied."""
    if isinstance(value, torch.Tensor) and value.dim() == like.dim() == 3:
        return value[:, : like.shape[1], : like.shape[2]].clone()
    return value.clone() if isinstance(value, torch.Tensor) else value


class StackedAdam:
    """Adam and Adamax (torch's formulas, L2 penalty added to the gradient) over a stack
    whose trials each have their own rule, learning rate and penalty.

    Every quantity is a tensor over the whole stack, with the per-network settings as
    (n, 1, 1) tensors, so a step is a fixed sequence of element-wise operations per
    parameter tensor whatever the mix of trials: no loop over networks, and nothing read
    back to the host (the step count lives on the device too, ready for graph capture).
    A padded zero weight has zero gradient and zero moments, so its update is 0/(0 + ε)
    (Adam) or 0/ε (Adamax): exactly zero.
    """

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, model: StackedFFNN, configs: list[TrainConfig]) -> None:
        device = model.weights[0].device
        dtype = model.weights[0].dtype

        def per_network(values: list[float]) -> torch.Tensor:
            column = torch.tensor(values, dtype=dtype, device=device)
            return column.repeat_interleave(model.k).view(-1, 1, 1)

        self.params = list(model.parameters())
        self.lr = per_network([c.lr for c in configs])
        self.weight_decay = per_network([c.weight_decay for c in configs])
        self.adamax = per_network([float(c.optimizer == "adamax") for c in configs]).bool()
        self.step_count = torch.zeros((), dtype=dtype, device=device)
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.BETAS
        self.step_count += 1
        step_size = self.lr / (1 - beta1**self.step_count)
        root_correction = torch.sqrt(1 - beta2**self.step_count)
        for param, first, second in zip(self.params, self.first, self.second, strict=True):
            grad = param.grad.addcmul(param, self.weight_decay)
            first.lerp_(grad, 1 - beta1)
            adam_second = second * beta2 + (1 - beta2) * grad * grad
            adamax_second = torch.maximum(second * beta2, grad.abs() + self.EPS)
            second.copy_(torch.where(self.adamax, adamax_second, adam_second))
            denominator = torch.where(
                self.adamax, second, second.sqrt() / root_correction + self.EPS
            )
            param.sub_(step_size * first / denominator)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def select(self, model: StackedFFNN, keep: list[int], index: torch.Tensor) -> StackedAdam:
        """This optimizer's state for the trials at positions `keep` (networks `index`),
        on `model` (their stack)."""
        kept = object.__new__(StackedAdam)
        kept.params = list(model.parameters())
        kept.lr = self.lr.index_select(0, index)
        kept.weight_decay = self.weight_decay.index_select(0, index)
        kept.adamax = self.adamax.index_select(0, index)
        kept.step_count = self.step_count.clone()
        shapes = [p.shape for p in kept.params]
        kept.first = [narrow(m, index, s) for m, s in zip(self.first, shapes, strict=True)]
        kept.second = [narrow(v, index, s) for v, s in zip(self.second, shapes, strict=True)]
        return kept


Optimizer = TrialOptimizers | StackedAdam
