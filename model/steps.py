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
import math
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from model.config import PRECISIONS, SGD_MOMENTUM, TrainConfig
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
        self.smoothing = None
        if any(shape.label_smoothing for shape in model.shapes):
            smoothing = [shape.label_smoothing for shape in model.shapes]
            self.smoothing = per_network(model, smoothing).view(-1, 1)
        self.forward = self._forward
        if compile:
            cuda = model.weights[0].device.type == "cuda"
            self.forward = torch.compile(self._forward, mode="reduce-overhead" if cuda else None)

    def _forward(
        self, x: torch.Tensor, y: torch.Tensor, masks: Masks
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = x.device.type
        # No autocast cache: a CUDA graph may capture this, and the cache would outlive it.
        with torch.autocast(
            device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False
        ):
            logits = self.model(x, masks.hidden, masks.input)
        log_probs = logits.float().log_softmax(dim=2)
        losses = -log_probs.gather(2, y.unsqueeze(2)).squeeze(2)
        if self.smoothing is not None:
            # (1 − ε)·(−log p_y) + ε·mean over classes of (−log p), per network's own ε.
            spread = -log_probs.mean(dim=2)
            losses = torch.lerp(losses, spread, self.smoothing)
        correct = (logits.argmax(dim=2) == y).sum(dim=1)
        return losses.mean(dim=1), correct

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


class Masks(NamedTuple):
    """One step's dropout for the autograd path: `input` (n, rows, 784) over the pixels,
    and `hidden`, one (n, rows, width) tensor per hidden layer; 0 or 1/keep each, None
    where no trial of the stack drops there."""

    input: torch.Tensor | None
    hidden: list[torch.Tensor] | None


def draw_masks(model: StackedFFNN, rows: int, generators: list[torch.Generator]) -> Masks:
    """Each trial's part drawn from its own generator by `keep_mask`'s rule, in the order
    `CpuStep` draws in: the input mask (if it drops inputs), then each hidden layer's (if
    it drops units)."""
    device = model.weights[0].device
    dtype = model.weights[0].dtype

    def ones(width: int) -> torch.Tensor:
        return torch.ones(model.n, rows, width, device=device, dtype=dtype)

    shapes = model.shapes
    inputs = ones(model.weights[0].shape[1]) if any(s.input_dropout for s in shapes) else None
    hidden = [ones(width) for width in model.hidden] if any(s.dropout for s in shapes) else None
    for t, (shape, generator) in enumerate(zip(shapes, generators, strict=True)):
        drawn = []
        if shape.input_dropout > 0.0 and inputs is not None:
            drawn.append((inputs, shape.input_dropout, inputs.shape[2]))
        if shape.dropout > 0.0 and hidden is not None:
            drawn += [(m, shape.dropout, w) for m, w in zip(hidden, shape.hidden, strict=False)]
        for mask, dropout, width in drawn:
            keep, kept = keep_mask(
                (model.k, rows, width), 1.0 - dropout, generator=generator, device=device
            )
            mask[model.trial(t), :, :width] = keep.to(dtype) * (1.0 / kept)
    return Masks(inputs, hidden)


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
    model: StackedFFNN,
    configs: list[TrainConfig],
    *,
    total_steps: int,
    capturable: bool = False,
) -> Optimizer:
    """Each trial's optimizer over its networks, its learning rate following its
    `schedule` over `total_steps` steps (`lr_factors`), and its max-norm cap applied
    after every step (`MaxNorm`).

    The rules act element by element (or, max-norm, unit by unit), so on a stack each
    network has its own optimizer state in effect. Each trial gets torch's own optimizer
    over its networks (`TrialOptimizers`); a stack whose steps a CUDA graph will capture
    (`capturable`) gets `StackedAdam` instead: one update for the whole stack, its step
    count on the device (Adam and Adamax only).
    """
    if capturable:
        return StackedAdam(model, configs, total_steps)
    return TrialOptimizers(model, configs, total_steps)


def lr_factors(schedule: str, warmup: float, total_steps: int) -> torch.Tensor:
    """The learning rate of each of `total_steps` steps (0-based s, T steps in all) as a
    fraction of the configured one (float64, on the CPU):

    - constant: 1 (the report's);
    - cosine: a linear warm-up over the first W = round(warmup · T) steps, (s + 1) / W,
      then 0.5 · (1 + cos(π (s − W) / (T − W))), down towards 0 at the last step;
    - one_cycle (torch's `OneCycleLR` shape, learning rate only): from 1/25 up to 1 along
      a half cosine over the first R = round(0.3 · T) steps, then down along a half
      cosine to 1/25 · 10⁻⁴.

    W and R are at most T − 1, so every schedule ends on its way down.
    """
    steps = torch.arange(total_steps, dtype=torch.float64)
    if schedule == "constant":
        return torch.ones(total_steps, dtype=torch.float64)
    if schedule == "cosine":
        rise = min(round(warmup * total_steps), total_steps - 1)
        up = (steps + 1) / max(rise, 1)
        down = 0.5 * (1 + torch.cos(math.pi * (steps - rise) / (total_steps - rise)))
        return torch.where(steps < rise, up, down)
    if schedule == "one_cycle":
        start, end = 1 / 25, 1 / 25 / 1e4
        rise = min(round(0.3 * total_steps), total_steps - 1)
        up = start + (1 - start) * 0.5 * (1 - torch.cos(math.pi * steps / max(rise, 1)))
        down = end + (1 - end) * 0.5 * (
            1 + torch.cos(math.pi * (steps - rise) / (total_steps - rise))
        )
        return torch.where(steps < rise, up, down)
    raise ValueError(f"schedule {schedule!r}")


def per_network(model: StackedFFNN, values: Sequence[float]) -> torch.Tensor:
    """One value per trial as an (n, 1, 1) tensor over the stack's networks."""
    like = model.weights[0]
    column = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    return column.repeat_interleave(model.k).view(-1, 1, 1)


class MaxNorm:
    """The dropout paper's max-norm constraint: after each step, every hidden unit's
    incoming weights (a column of a hidden layer's (n, fan_in, fan_out) weight) are
    scaled down to an L2 norm of at most the network's cap, in place (no host sync, so a
    CUDA graph may capture it). Networks without a cap have an infinite one. A padded
    column is zero and stays zero."""

    def __init__(self, model: StackedFFNN, caps: Sequence[float | None]) -> None:
        self.weights = list(model.weights)[:-1]
        self.cap = per_network(model, [math.inf if c is None else c for c in caps])

    @classmethod
    def of(cls, model: StackedFFNN, configs: Sequence[TrainConfig]) -> MaxNorm | None:
        caps = [c.max_norm for c in configs]
        return None if all(c is None for c in caps) else cls(model, caps)

    @torch.no_grad()
    def __call__(self) -> None:
        for weight in self.weights:
            norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
            weight.mul_((self.cap / norms).clamp_(max=1.0))


class TrialOptimizers:
    """torch's Adam (fused), AdamW (fused), Adamax (multi-tensor) or SGD with Nesterov
    momentum (multi-tensor) for each trial, over its k networks: the leading slice of
    every stacked tensor, which is contiguous, so each trial's update is one fused pass.
    A trial's padding has zero gradients and stays zero.

    Measured on the project's 2-core CPU: one step for two trials of the quick preset
    (6 networks, 784-249-36-10) took 0.8 ms as fused Adam and 17 ms as `StackedAdam`'s
    element-wise sequence, which made stacked mini-batch training half as fast as one
    trial at a time (benchmarks/README.md). A mini-batch step of the report's network
    took 0.28 ms fused against 1.09 ms unfused.
    """

    def __init__(self, model: StackedFFNN, configs: list[TrainConfig], total_steps: int) -> None:
        self.model = model
        self.configs = list(configs)
        self.total_steps = total_steps
        self.views = [
            [p.detach()[model.trial(t)] for p in model.parameters()] for t in range(len(configs))
        ]
        self.optimizers = [
            _torch_optimizer(views, config)
            for views, config in zip(self.views, configs, strict=True)
        ]
        # Each trial's learning rate for each step; None where it stays constant.
        self.rates: list[list[float] | None] = [
            None
            if c.schedule == "constant"
            else (c.lr * lr_factors(c.schedule, c.warmup, total_steps)).tolist()
            for c in configs
        ]
        self.steps_done = 0
        self.max_norm = MaxNorm.of(model, configs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model.parameters():
            param.grad = None

    def step(self) -> None:
        params = list(self.model.parameters())
        # Past the schedule's end (a caller training longer than it said) the last rate holds.
        at = min(self.steps_done, self.total_steps - 1)
        for t, (views, optimizer) in enumerate(zip(self.views, self.optimizers, strict=True)):
            # The step may have made new gradient tensors (autograd): see them through.
            for view, param in zip(views, params, strict=True):
                view.grad = param.grad[self.model.trial(t)]
            rates = self.rates[t]
            if rates is not None:
                for group in optimizer.param_groups:
                    group["lr"] = rates[at]
            optimizer.step()
        self.steps_done += 1
        if self.max_norm is not None:
            self.max_norm()

    def select(self, model: StackedFFNN, keep: list[int], index: torch.Tensor) -> TrialOptimizers:
        """The optimizers of the trials at positions `keep`, where they stand, on `model`
        (their stack)."""
        kept = TrialOptimizers(model, [self.configs[t] for t in keep], self.total_steps)
        kept.steps_done = self.steps_done
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
    lr, decay = config.lr, config.weight_decay
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=decay, foreach=True
        )
    # Adamax has no fused kernel; the multi-tensor one is the fastest there is.
    return torch.optim.Adamax(params, lr=lr, weight_decay=decay, foreach=True)


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

    def __init__(self, model: StackedFFNN, configs: list[TrainConfig], total_steps: int) -> None:
        unsupported = {c.optimizer for c in configs} - {"adam", "adamax"}
        if unsupported:
            raise ValueError(f"StackedAdam steps adam and adamax, not {', '.join(unsupported)}")
        device = model.weights[0].device
        dtype = model.weights[0].dtype
        self.params = list(model.parameters())
        self.weight_decay = per_network(model, [c.weight_decay for c in configs])
        self.adamax = per_network(model, [float(c.optimizer == "adamax") for c in configs]).bool()
        # Each network's learning rate at every step, (T, n, 1, 1): the step count on the
        # device indexes it, so a captured step follows the schedule when replayed.
        self.rates = _stacked_rates(model, configs, total_steps)
        self.step_count = torch.zeros((), dtype=dtype, device=device)
        self.first = [torch.zeros_like(p) for p in self.params]
        self.second = [torch.zeros_like(p) for p in self.params]
        self.max_norm = MaxNorm.of(model, configs)
        self._configs = list(configs)

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.BETAS
        at = self.step_count.long().clamp(max=self.rates.shape[0] - 1)
        lr = self.rates.index_select(0, at.view(1)).squeeze(0)
        self.step_count += 1
        step_size = lr / (1 - beta1**self.step_count)
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
        if self.max_norm is not None:
            self.max_norm()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def select(self, model: StackedFFNN, keep: list[int], index: torch.Tensor) -> StackedAdam:
        """This optimizer's state for the trials at positions `keep` (networks `index`),
        on `model` (their stack)."""
        kept = object.__new__(StackedAdam)
        kept.params = list(model.parameters())
        kept.rates = self.rates.index_select(1, index)
        kept.weight_decay = self.weight_decay.index_select(0, index)
        kept.adamax = self.adamax.index_select(0, index)
        kept.step_count = self.step_count.clone()
        shapes = [p.shape for p in kept.params]
        kept.first = [narrow(m, index, s) for m, s in zip(self.first, shapes, strict=True)]
        kept.second = [narrow(v, index, s) for v, s in zip(self.second, shapes, strict=True)]
        kept.max_norm = MaxNorm.of(model, [self._configs[t] for t in keep])
        kept._configs = [self._configs[t] for t in keep]
        return kept


def _stacked_rates(
    model: StackedFFNN, configs: list[TrainConfig], total_steps: int
) -> torch.Tensor:
    """(T, n, 1, 1): each network's learning rate at each of the T steps."""
    like = model.weights[0]
    per_trial = torch.stack(
        [c.lr * lr_factors(c.schedule, c.warmup, total_steps) for c in configs], dim=1
    )
    rates = per_trial.repeat_interleave(model.k, dim=1)
    return rates.to(like.device, like.dtype).view(total_steps, -1, 1, 1)


Optimizer = TrialOptimizers | StackedAdam
