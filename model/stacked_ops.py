"""The stacked network's two hot operations, in the form that is fastest on each device.

Measured on the project's 2-core CPU (benchmarks/README.md), for the report's network
on 48,000 images × 5 folds, the first layer's product as one `torch.bmm` took 1.32 s and
as five plain `mm` calls 1.10 s; but stacking five `mm` results with `torch.stack` copied
more than it saved. `stacked_linear` therefore runs, on the CPU, one `addmm` per network
written straight into its slice of a preallocated output (and likewise in backward); on
a GPU it is one `baddbmm`, a single kernel for all networks.

Dropout on the CPU was the other cost: `bernoulli_` drew 60 M mask values in 0.92 s —
nearly half the time of the products. `activation_dropout` draws 16 random bits per value
from 64-bit words (0.14 s for the same mask) and applies activation, mask and scale in
place, in one autograd node that keeps only its output for backward. The keep
probability is thereby rounded to a multiple of 2^-15 (|error| < 3.1e-5), and the scale
uses the probability actually drawn, so the layer's expected output is unchanged.
On a GPU the ordinary `F.dropout(act(x))` is already fast and stays.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

LEAKY_SLOPE = 0.01  # F.leaky_relu's default


def stacked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """x (k, n, fan_in) @ weight (k, fan_in, fan_out) + bias (k, 1, fan_out), per network."""
    if _cpu_eager(x):
        return _PerNetworkLinear.apply(x, weight, bias)
    return torch.baddbmm(bias, x, weight)


def _cpu_eager(x: torch.Tensor) -> bool:
    """Whether the hand-tuned CPU forms apply: plain float32 eager execution on the CPU.
    Under autocast (bf16) or while torch.compile traces, the plain ops are the right ones
    (inductor fuses them itself)."""
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
    )


class _PerNetworkLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        k, n, _ = x.shape
        out = torch.empty(k, n, weight.shape[2], dtype=x.dtype)
        for j in range(k):
            torch.addmm(bias[j], x[j], weight[j], out=out[j])
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous()
        grad_weight = torch.empty_like(weight)
        for j in range(x.shape[0]):
            torch.mm(x[j].T, grad[j], out=grad_weight[j])
        grad_x = None
        if ctx.needs_input_grad[0]:  # never for the first layer: images need no gradient
            grad_x = torch.empty_like(x)
            for j in range(x.shape[0]):
                torch.mm(grad[j], weight[j].T, out=grad_x[j])
        return grad_x, grad_weight, grad.sum(dim=1, keepdim=True)


def activation_dropout(x: torch.Tensor, activation: str, p: float, training: bool) -> torch.Tensor:
    """activation(x), then dropout with probability p (independent per element)."""
    act = {"relu": F.relu, "leaky_relu": F.leaky_relu, "hardswish": F.hardswish}[activation]
    if not training or p == 0.0:
        return act(x)
    if not _cpu_eager(x) or not x.requires_grad:
        return F.dropout(act(x), p, training=True)
    if activation == "hardswish":
        # Its derivative needs its input, which the in-place form overwrites; the mask is
        # still drawn as `CpuStep` draws it, so both give the same numbers.
        mask, kept = keep_mask(x.shape, 1.0 - p)
        return F.hardswish(x) * mask * (1.0 / kept)
    return _InPlaceActivationDropout.apply(x, activation, 1.0 - p)


def keep_mask(
    shape: torch.Size | tuple[int, ...],
    keep: float,
    *,
    words: torch.Tensor | None = None,
    bits: torch.Tensor | None = None,
) -> tuple[torch.Tensor, float]:
    """A bool mask with P(True) ≈ `keep`, and the probability actually used (`keep`
    rounded to a multiple of 2^-15 in [2^-15, 1 − 2^-15]).

    `random_()` fills int64 words uniformly in [0, 2^63): of each word's four 16-bit
    chunks the lower three are uniform over all of int16, the top one over [0, 2^15).
    Each chunk is compared with a threshold for its own range, at 2^-15 resolution.
    `words` (int64) and `bits` are optional buffers of at least ⌈n/4⌉ and 4·⌈n/4⌉
    elements, for callers that draw the same mask sizes again and again; a float32
    `bits` gives the mask as 0.0/1.0, which multiplies a float tensor without the
    conversion a bool mask costs (7× faster on the CPU at 5 × 256 × 249).
    """
    numel = math.prod(shape)
    n_words = -(-numel // 4)
    words = torch.empty(n_words, dtype=torch.int64) if words is None else words[:n_words]
    bits = torch.empty(4 * n_words, dtype=torch.bool) if bits is None else bits[: 4 * n_words]
    threshold = _threshold(keep)
    thresholds = torch.tensor([2 * threshold - 32768] * 3 + [threshold], dtype=torch.int16)
    chunks = words.random_().view(torch.int16).view(-1, 4)
    torch.lt(chunks, thresholds, out=bits.view(-1, 4))
    return bits[:numel].view(shape), threshold / 32768


def kept_probability(keep: float) -> float:
    """The keep probability `keep_mask` really draws with for `keep`."""
    return _threshold(keep) / 32768


def _threshold(keep: float) -> int:
    # At least one step of 2^-15 kept, and one dropped: a keep probability of 0 would
    # make the scale 1/0 (dropout 0.99999 is accepted), and 2^15 overflows int16.
    return min(max(round(keep * 32768), 1), 32767)


class _InPlaceActivationDropout(torch.autograd.Function):
    """relu or leaky_relu, mask and scale on the GEMM output in place. Backward needs
    only the output: where it is positive the derivative is the scale, where negative
    (leaky_relu) slope·scale, and where zero the value was dropped (or exactly 0)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, activation: str, keep: float) -> torch.Tensor:
        mask, kept = keep_mask(x.shape, keep)
        scale = 1.0 / kept
        if activation == "relu":
            x.clamp_min_(0.0)
        else:
            F.leaky_relu_(x, LEAKY_SLOPE)
        x.mul_(mask).mul_(scale)
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        ctx.scale, ctx.activation = scale, activation
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (out,) = ctx.saved_tensors
        if ctx.activation == "relu":
            return torch.where(out > 0, grad * ctx.scale, 0.0), None, None
        slope = torch.where(out > 0, ctx.scale, torch.where(out < 0, ctx.scale * LEAKY_SLOPE, 0.0))
        return grad * slope, None, None
