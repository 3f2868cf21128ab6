"""Dropout masks on the CPU, drawn from 16-bit slices of random 64-bit words.

Measured on the project's 2-core CPU (benchmarks/README.md): `bernoulli_` drew the
60 M mask values of the report's network on 48,000 images × 5 folds in 0.92 s — nearly
half the time of the products — and `keep_mask` draws them in 0.14 s. The keep
probability is thereby rounded to a multiple of 2^-15 (|error| < 3.1e-5), and the scale
uses the probability actually drawn, so a layer's expected output is unchanged.
On a GPU the ordinary `F.dropout` is already fast and stays.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Dropout with probability p, independent per element: on the CPU in float32 with
    `keep_mask`'s mask and scale — the mask `CpuStep` draws, so from the same random state
    the autograd step and the hand-written one give the same numbers — elsewhere (a GPU,
    bf16, under torch.compile) `F.dropout`."""
    if not training or p == 0.0:
        return x
    if x.device.type == "cpu" and x.dtype == torch.float32 and not torch.compiler.is_compiling():
        mask, kept = keep_mask(x.shape, 1.0 - p)
        return x * mask * (1.0 / kept)
    return F.dropout(x, p, training=True)


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
