"""One training step for all k stacked networks, and what a training loop sets up around
it: the optimizer, the precision, the seeded random stream, one epoch of steps.

A step takes a (k, B, 784) batch with its (k, B) labels, updates every network once and
returns each one's mean loss and count of correct predictions (k,), left on the device;
its `evaluate` scores them without dropout. `make_step` picks the fastest for the device:
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
from model.network import StackedFFNN


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
