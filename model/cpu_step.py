"""The CPU training step written out by hand: forward, cross-entropy, backward and the
optimizer update of stacked networks, in buffers allocated once, without autograd.

Why: on the project's 2-core CPU the products are most of the work, and what is left
over was bookkeeping — autograd's graph, a fresh tensor for every intermediate, and, in
full batch, 48 MB activations that the allocator maps and the kernel faults in again
every epoch (bigger than malloc's mmap threshold). Writing every result into a buffer
made once per trial removes all of it.

The products are one `addmm` per network, each written straight into its slice of a
buffer. For the report's network on 48,000 images × 5 folds the first layer's product
took 1.32 s as one `torch.bmm` and 1.10 s as five plain `mm` calls (weight gradient:
0.80 s against 0.66 s); stacking five `mm` results with `torch.stack` copied more than
it saved (benchmarks/README.md). On a GPU one `baddbmm` for all networks stays.

Trials stacked together are stepped one after another (`_TrialStep`), each on its own
parameters (the stack keeps each trial at its own widths) with its own buffers,
activation, dropout and random stream. One optimizer step then updates the whole stack.
The GPU's step fuses the trials' first layers into one product (`model.network`); here
a trial's first layer is already one `addmm` per fold over 48,000 rows, which keeps both
cores busy, and the per-trial outputs stay contiguous for the passes that follow.

The step draws its dropout masks with `model.dropout.keep_mask` from each trial's
generator in the same order as the autograd step, so from the same streams both give the
same numbers (a test holds them to it). `make_step` in `model.steps` chooses this step on
the CPU in float32.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from model import activations
from model.dropout import inverse_keep, keep_mask
from model.network import StackedFFNN


class CpuStep:
    """Callable like `model.steps.make_step`'s step: (x, y) → (mean loss (n,), correct
    count (n,)), where x is (n, B, 784) — each network its own batch — or (k, B, 784),
    fold j's batch for every trial's network j; `max_rows` is the largest B it will see;
    `generators` holds each trial's random stream."""

    def __init__(
        self,
        model: StackedFFNN,
        optimizer: Any,
        max_rows: int,
        generators: list[torch.Generator],
    ) -> None:
        self.model = model
        self.optimizer = optimizer
        # The optimizer reads .grad; the step writes gradients straight into these.
        for param in model.parameters():
            param.grad = torch.zeros_like(param)
        self.trials = [
            _TrialStep(model, t, max_rows, generator) for t, generator in enumerate(generators)
        ]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [trial(*_inputs_of(trial.networks, x, y)) for trial in self.trials]
        self.optimizer.step()
        return _joined(parts)

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy (n,) of every network on its images, without dropout."""
        return _joined([trial.evaluate(*_inputs_of(trial.networks, x, y)) for trial in self.trials])


def _joined(
    parts: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The trials' (n,) figures in stack order; one trial's as they are (no copy per step)."""
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _inputs_of(
    networks: slice, x: torch.Tensor, y: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """A trial's (k, B, …) batch out of a stack's: its own rows, or the folds' shared ones."""
    k = networks.stop - networks.start
    if x.shape[0] == k:
        return x, y
    return x[networks], y[networks]


class _TrialStep:
    """The step of one trial's k networks, on views of the stack's tensors."""

    def __init__(
        self, model: StackedFFNN, t: int, max_rows: int, generator: torch.Generator
    ) -> None:
        shape = model.shapes[t]
        self.networks = model.trial(t)
        self.generator = generator
        self.k = k = model.k
        self.dropout = shape.dropout
        self.input_dropout = shape.input_dropout
        self.label_smoothing = shape.label_smoothing
        self.activation = activations.get(shape.activation)
        sizes = shape.sizes
        weights, biases = model.weights_of(t), model.biases_of(t)
        self.weights = [w.detach() for w in weights]
        self.biases = [b.detach() for b in biases]
        self.weight_grads = [w.grad for w in weights]
        self.bias_grads = [b.grad for b in biases]
        widths = sizes[1:]
        # The model's dtype: float32 in training; the tests also run it in float64, where
        # an error of 1e-5 (a dropout scale slightly off) stands far above the rounding.
        self.dtype = dtype = model.flat.dtype
        # out[i]: layer i's output after activation and dropout; pre[i]: before them
        # (kept only where the derivative needs it); grad_out[i]: its gradient.
        self.out = [torch.empty(k, max_rows, n, dtype=dtype) for n in widths]
        self.grad_out = [torch.empty(k, max_rows, n, dtype=dtype) for n in widths]
        hidden = widths[:-1]
        self.pre = (
            [torch.empty(k, max_rows, n, dtype=dtype) for n in hidden]
            if self.activation.keeps_input
            else []
        )
        # Scratch for dropout masks and derivative flags, sized for the widest layer:
        # 0/1 floats, since multiplying by a bool tensor first converts it (7× slower).
        most = k * max_rows * max(hidden, default=1)
        masked = max(most, k * max_rows * sizes[0]) if self.input_dropout else most
        self.words = torch.empty(-(-masked // 4), dtype=torch.int64)
        self.bits = torch.empty(4 * self.words.numel(), dtype=dtype)
        self.flags = torch.empty(most, dtype=dtype)
        # The images with their dropped pixels zeroed (unscaled, as the hidden outputs).
        self.dropped_in = (
            torch.empty(k, max_rows, sizes[0], dtype=dtype) if self.input_dropout else None
        )
        self.val_out: list[torch.Tensor] = []
        # 1/keep for the keep probability `keep_mask` really draws with.
        self.scale = inverse_keep(self.dropout)
        self.input_scale = inverse_keep(self.input_dropout)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = x.shape[1]
        layers = len(self.weights)
        if self.dropped_in is not None:
            x = torch.mul(x, self._mask(x.shape, self.input_dropout), out=self.dropped_in[:, :rows])
        inputs = [x] + [o[:, :rows] for o in self.out[:-1]]
        # A hidden layer's output is kept unscaled (activation · mask); the dropout scale
        # 1/keep rides on the next layer's products as addmm's alpha, which costs nothing,
        # instead of a pass over the activations each way. So does the input's.
        scale_in = [self.input_scale] + [self.scale] * (layers - 1)
        for i in range(layers):
            out = self.out[i][:, :rows]
            for j in range(self.k):
                torch.addmm(
                    self.biases[i][j],
                    inputs[i][j],
                    self.weights[i][j],
                    alpha=scale_in[i],
                    out=out[j],
                )
            if i < layers - 1:
                self._activate(i, out)
        logits = self.out[-1][:, :rows]
        loss, correct = _cross_entropy_and_grad(
            logits, y, self.grad_out[-1][:, :rows], self.label_smoothing
        )
        for i in reversed(range(layers)):
            grad = self.grad_out[i][:, :rows]
            weight_grad = self.weight_grads[i]
            for j in range(self.k):
                torch.addmm(
                    weight_grad[j], inputs[i][j].T, grad[j], beta=0, alpha=scale_in[i],
                    out=weight_grad[j],
                )  # fmt: skip
            self.bias_grads[i].copy_(grad.sum(dim=1, keepdim=True))
            if i > 0:  # the images need no gradient
                below = self.grad_out[i - 1][:, :rows]
                for j in range(self.k):
                    torch.addmm(
                        below[j], grad[j], self.weights[i][j].T, beta=0, alpha=scale_in[i],
                        out=below[j],
                    )  # fmt: skip
                self._activation_backward(i - 1, below, inputs[i])
        return loss, correct

    @torch.no_grad()
    def evaluate(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean loss and accuracy (k,) of every network on its own (k, n, 784) images,
        without dropout, in buffers kept for the next call with the same n."""
        rows = x.shape[1]
        if not self.val_out or self.val_out[0].shape[1] != rows:
            self.val_out = [
                torch.empty(self.k, rows, w.shape[2], dtype=self.dtype) for w in self.weights
            ]
        a = x
        for i, out in enumerate(self.val_out):
            for j in range(self.k):
                torch.addmm(self.biases[i][j], a[j], self.weights[i][j], out=out[j])
            if i < len(self.val_out) - 1:
                self.activation.forward_in_place(out)
            a = out
        losses = F.cross_entropy(a.flatten(0, 1), y.flatten(), reduction="none")
        accuracy = (a.argmax(dim=-1) == y).float().mean(dim=1)
        return losses.view(self.k, -1).mean(dim=1), accuracy

    def _activate(self, i: int, z: torch.Tensor) -> None:
        """activation and dropout mask, in place on layer i's output."""
        if self.activation.keeps_input:
            self.pre[i][:, : z.shape[1]].copy_(z)
        self.activation.forward_in_place(z)
        if self.dropout > 0.0:
            z.mul_(self._mask(z.shape, self.dropout))

    def _mask(self, shape: torch.Size, dropout: float) -> torch.Tensor:
        """The next keep mask of the trial's stream, as 0/1 floats in the scratch buffer."""
        mask, _ = keep_mask(
            shape, 1.0 - dropout, words=self.words, bits=self.bits, generator=self.generator
        )
        return mask

    def _activation_backward(self, i: int, grad: torch.Tensor, out: torch.Tensor) -> None:
        """grad ← grad · d(activation · mask)/d(pre-activation), in place; `out` is layer
        i's stored output (activation · mask; the scale is already in `grad`).

        Where the output is 0 the value was dropped (or its activation is flat there), so
        the derivative is 0; elsewhere the activation's own, read off the output or
        computed from the kept pre-activation (`model.activations`).
        """
        flags = self.flags[: out.numel()].view(out.shape)
        derivative_from_output = self.activation.derivative_from_output
        if derivative_from_output is not None:
            grad.mul_(derivative_from_output(out, flags))
        else:
            pre = self.pre[i][:, : out.shape[1]]
            derivative = self.activation.backward_from_input(grad, pre)
            grad.copy_(derivative).mul_(torch.ne(out, 0, out=flags))


def _cross_entropy_and_grad(
    logits: torch.Tensor, y: torch.Tensor, grad: torch.Tensor, smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-network mean cross-entropy and correct count of `logits` (k, B, 10), against
    targets with `smoothing` of the uniform distribution mixed in; writes
    d(sum of the k mean losses)/d(logits) = (softmax − target) / B into `grad`."""
    rows, classes = logits.shape[1], logits.shape[2]
    target = y.unsqueeze(-1)
    correct = (logits.argmax(dim=-1) == y).sum(dim=1)
    shifted = torch.sub(logits, logits.amax(dim=-1, keepdim=True), out=grad)
    target_logit = shifted.gather(-1, target)
    if smoothing:
        # −Σ q log p with q = (1 − ε)·one-hot + ε/C: log Σ exp − (1 − ε)·z_y − ε·mean z.
        target_logit = torch.lerp(target_logit, shifted.mean(dim=-1, keepdim=True), smoothing)
    probs = shifted.exp_()
    total = probs.sum(dim=-1, keepdim=True)
    loss = (total.log() - target_logit).mean(dim=(1, 2))
    probs.div_(total)
    if smoothing:
        probs.sub_(smoothing / classes)
    probs.scatter_add_(-1, target, torch.full_like(target, -(1.0 - smoothing), dtype=probs.dtype))
    grad.div_(rows)
    return loss, correct
