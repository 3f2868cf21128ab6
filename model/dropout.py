"""Dropout masks on the CPU, drawn from 16-bit slices of random 64-bit words.

Measured on the project's 2-core CPU (benchmarks/README.md): `bernoulli_` drew the
60 M mask values of the report's network on 48,000 images × 5 folds in 0.92 s — nearly
half the time of the products — and `keep_mask` draws them in 0.14 s. The keep
probability is thereby rounded to a multiple of 2^-15 (|error| < 3.1e-5), and the scale
uses the probability actually drawn, so a layer's expected output is unchanged.
Every trial in a stack draws its masks from its own generator (`model.steps.TrialStreams`),
on every device, so a trial's masks do not depend on what it is stacked with. On a GPU
the same rule runs there (its generator is a CUDA one, so its numbers differ from the
CPU's).
"""

from __future__ import annotations

import functools
import math

import torch


def keep_mask(
    shape: torch.Size | tuple[int, ...],
    keep: float,
    *,
    words: torch.Tensor | None = None,
    bits: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    device: torch.device | None = None,
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
    `generator` (torch's global one if None) draws the words, on `device` (the CPU if
    None, or the buffers' device).
    """
    numel = math.prod(shape)
    n_words = -(-numel // 4)
    if words is None:
        words = torch.empty(n_words, dtype=torch.int64, device=device)
    words = words[:n_words]
    if bits is None:
        bits = torch.empty(4 * n_words, dtype=torch.bool, device=words.device)
    bits = bits[: 4 * n_words]
    threshold = _threshold(keep)
    thresholds = _thresholds(threshold, words.device)
    chunks = words.random_(generator=generator).view(torch.int16).view(-1, 4)
    torch.lt(chunks, thresholds, out=bits.view(-1, 4))
    return bits[:numel].view(shape), threshold / 32768


@functools.cache
def _thresholds(threshold: int, device: torch.device) -> torch.Tensor:
    """Each chunk's threshold, made once per device: a copy to a GPU inside a CUDA graph's
    capture would be refused, and every epoch after the first finds it here."""
    values = [2 * threshold - 32768] * 3 + [threshold]
    return torch.tensor(values, dtype=torch.int16, device=device)


def inverse_keep(dropout: float) -> float:
    """The scale 1/keep of a kept value, for the keep probability `keep_mask` really draws
    with at this dropout; 1 without dropout."""
    return 1.0 if dropout == 0.0 else 1.0 / kept_probability(1.0 - dropout)


def kept_probability(keep: float) -> float:
    """The keep probability `keep_mask` really draws with for `keep`."""
    return _threshold(keep) / 32768


def _threshold(keep: float) -> int:
    # At least one step of 2^-15 kept, and one dropped: a keep probability of 0 would
    # make the scale 1/0 (dropout 0.99999 is accepted), and 2^15 overflows int16.
    return min(max(round(keep * 32768), 1), 32767)
