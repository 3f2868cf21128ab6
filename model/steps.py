"""One training step for all k stacked networks, and what a training loop sets up around
it: the precision, the seeded random stream, one epoch of steps. The optimizer a step
calls is made in `model.optimizers`.

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
from collections.abc import Iterator
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from model.config import N_INPUTS, PRECISIONS
from model.cpu_step import CpuStep
from model.data import DeviceData
from model.dropout import inverse_keep, keep_mask
from model.network import StackedFFNN, TrialMasks, per_network

if TYPE_CHECKING:
    from model.optimizers import Optimizer


class AutogradStep:
    """The training step through autograd: any device, any precision. See `make_step`.

    The first layer of the trials that share the batch is one product (`StackedFFNN`):
    a (k, B, 784) batch is read once per fold, never repeated per network.

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
            cuda = model.flat.device.type == "cuda"
            self.forward = torch.compile(self._forward, mode="reduce-overhead" if cuda else None)

    def _forward(
        self, x: torch.Tensor, y: torch.Tensor, masks: list[TrialMasks]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        device_type = x.device.type
        # No autocast cache: a CUDA graph may capture this, and the cache would outlive it.
        with torch.autocast(
            device_type, dtype=torch.bfloat16, enabled=self.bf16, cache_enabled=False
        ):
            logits = self.model(x, masks)
        log_probs = logits.float().log_softmax(dim=2)
        losses = -log_probs.gather(2, y.unsqueeze(2)).squeeze(2)
        if self.smoothing is not None:
            # (1 − ε)·(−log p_y) + ε·mean over classes of (−log p), per network's own ε.
            spread = -log_probs.mean(dim=2)
            losses = torch.lerp(losses, spread, self.smoothing)
        correct = (logits.argmax(dim=2) == y).sum(dim=1)
        return losses.mean(dim=1), correct

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        masks = draw_masks(self.model, x.shape[1], self.generators)
        per_network, correct = self.forward(x, tile(y, self.model.n), masks)
        self.optimizer.zero_grad(set_to_none=True)
        # Summing the networks' losses gives each one's weights exactly its own gradient.
        per_network.sum().backward()
        self.optimizer.step()
        return per_network.detach(), correct

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy (n,) without dropout."""
        n = self.model.n
        y = tile(y, n)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.model(x).float()
        losses = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none")
        accuracy = (logits.argmax(dim=2) == y).float().mean(dim=1)
        return losses.view(n, -1).mean(dim=1), accuracy


def tile(y: torch.Tensor, n: int) -> torch.Tensor:
    """(k, B) labels shared by the folds of every trial, repeated to the stack's n
    networks (labels are 1/784 of a batch's bytes); (n, B) labels as they are."""
    return y if y.shape[0] == n else y.repeat(n // y.shape[0], 1)


def draw_masks(
    model: StackedFFNN, rows: int, generators: list[torch.Generator]
) -> list[TrialMasks]:
    """Each trial's masks drawn from its own generator by `keep_mask`'s rule, in the order
    `CpuStep` draws in: the input mask (if it drops inputs), then each hidden layer's (if
    it drops units); each one draw of (k, rows, width) 0/1 values in the model's dtype."""
    device, dtype = model.flat.device, model.flat.dtype

    def draw(width: int, dropout: float, generator: torch.Generator) -> torch.Tensor:
        shape = (model.k, rows, width)
        bits = torch.empty(4 * -(-math.prod(shape) // 4), dtype=dtype, device=device)
        mask, _ = keep_mask(shape, 1.0 - dropout, bits=bits, generator=generator, device=device)
        return mask

    masks = []
    for shape, generator in zip(model.shapes, generators, strict=True):
        pixels = None
        if shape.input_dropout > 0.0:
            pixels = draw(N_INPUTS, shape.input_dropout, generator)
        hidden = None
        if shape.dropout > 0.0:
            hidden = [draw(width, shape.dropout, generator) for width in shape.hidden]
        masks.append(
            TrialMasks(
                pixels, hidden, inverse_keep(shape.input_dropout), inverse_keep(shape.dropout)
            )
        )
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
        on_cpu = model.flat.device.type == "cpu"
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
