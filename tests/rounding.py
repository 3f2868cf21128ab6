"""How far two correct computations of the same training, or two CPUs' draws of the same
trials, may differ through rounding alone: the bounds that the comparisons with
`tests/reference.py` and with stored draws allow.

Two computations of one training step (the trainer's products against `nn.Linear`'s, or
one kernel path against another: ATen's AVX512, AVX2 or default code, MKL's code
branches, another thread count) add the same numbers in other orders, so on another CPU
they round differently. A test that needs more agreement than rounding gives holds on
one machine only. The derivation, for a type of machine epsilon ε (float32 1.2e-7,
float64 2.2e-16):

1. One sum of n terms, added in another order: at worst n·ε of the sum of the terms'
   magnitudes (every one of its additions rounding the same way); typically √n·ε, as
   roundings of either sign add like a random walk (Higham and Mary, "A new approach to
   probabilistic rounding error analysis", SIAM J. Sci. Comput. 41, 2019). The longest
   sums of a step are the first layer's products over the 784 pixels: n = 784.
2. Each step carries the difference the steps before it made into the next and adds its
   own. Over the few hundred steps of a test, training a small network with a small
   learning rate neither amplifies nor damps such differences much, so after s steps
   they add up to about s steps' worth, and a loss measured then adds one more pass:
   a loss or a point of a loss curve after s steps differs by at most (s + 1)·√n·ε,
   relatively (`loss_tolerance`).
3. A weight's gradient sums the B rows of its batch, whose terms carry the error of 1;
   of mixed signs, they add up to about √B times less than their magnitudes do, so
   relative to the gradient the error is about √(n·B)·ε. Adam and Adamax step by
   lr·m̂/√v̂, about lr at most, and a relative error ρ of the gradient moves their step
   by about ρ·lr; SGD steps by lr·g, with |g| ≲ 1 here (pixels in [0, 1], each row's
   cross-entropy gradient in [−1, 1]), the same. So after s steps a network's weights
   differ by at most s·lr·√(n·B)·ε on average over the network (`weight_tolerance`).
   No bound holds for one weight: Adam and Adamax divide by the weight's own gradient
   scale, so where a gradient cancels to rounding size the step is decided by rounding,
   up to a whole step apart. Hence a mean over a whole network, not over one tensor (a
   bias of eight units averages too few weights to hide one such), and the network's
   losses, which every weight feeds, held to 2.
4. An accuracy counts argmaxes: two computations may count a row differently only where
   its two largest logits are within rounding of each other, 2·(s + 1)·√n·ε of the
   larger, in the reference (`near_ties`); a best epoch may differ only where the
   reference's validation losses at the two epochs are within twice 2's bound of each
   other (`within_rounding`, `same_best_epoch`).

In float64 these bounds stay below 1e-12 in the tests: far below any bug worth finding
(an unrounded dropout scale is up to 3e-5 off) and below any difference between two
epochs' losses, so there best and stopping epochs compare exactly. In float32 a loss
after 100 steps may be 3e-4 off, and two epochs' losses can be closer than that.

2 and 3 assume that training does not amplify small differences over these runs; a
check, not a proof. On an AMD EPYC, over tests/test_kfold.py's comparisons under six
kernel settings (native AVX512, ATen default and AVX2, MKL's COMPATIBLE, AVX2 and
AVX512 branches) and at 2 threads, the largest differences were 0.28 of the loss bound
and 0.23 of the weight bound; in float64 the closest any epoch's validation loss came
to its fold's best was 580,000 times the bound.

The sampler's draws vary by CPU too, in two ways, both measured on an AMD EPYC with
AVX-512 under numpy 2.4's three x86 kernel paths (native AVX-512, AVX2 and the X86_V2
baseline, chosen with NPY_DISABLE_CPU_FEATURES; Makefile, test-kernels):

5. A float that TPE or Optuna's random sampler draws goes through numpy's transcendental
   functions (log, exp, erf: the log-uniform transform, the Parzen estimator's kernels,
   its truncated normals), whose SIMD kernels round each result a few ulps differently
   per path. Over 200 draws of each shipped preset, 209 of 4,642 floats differed between
   the paths, by at most 17 ε (3.8e-15) relatively. `DRAW_TOLERANCE`, 1e-12 (4,500 ε),
   allows 250 times that, for TPE's longer histories and other CPUs; a change of the
   sampler or of a preset moves a draw by far more (another draw differs in its leading
   digits). Integers, categories and names still compare exactly: they are rounded or
   chosen from floats that rounding moves far less than a grid step, save on a tie.
6. TPE's Parzen estimator sorts each parameter's past values with `np.argsort`, whose
   order among equal values (a depth of 2 drawn twice) is the sort kernel's: here
   AVX-512's and AVX2's vectorised sorts agreed with each other, and not with the
   baseline's. The order decides which past trial gets which kernel width, and, with a
   multivariate TPE, which density the next trial is drawn from: on the baseline path
   `wide-smoke`'s 24th draw came out another network altogether (58 first-layer units
   against 19), and every later draw with it; with a stable sort all three paths drew
   the same 200 networks. That is no rounding, and no tolerance
   covers it; a stable sort's order is the same on every CPU, so comparisons with draws
   stored on another machine draw under `stable_sort_ties`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any
from unittest import mock

import numpy as np
import torch

# The longest sum of a training step: a first-layer unit's product over the pixels.
LONGEST_SUM = 784


def loss_tolerance(dtype: torch.dtype, steps: int) -> float:
    """Relative difference that rounding allows in a loss measured after `steps` steps."""
    return (steps + 1) * math.sqrt(LONGEST_SUM) * torch.finfo(dtype).eps


def weight_tolerance(dtype: torch.dtype, steps: int, lr: float, rows: int) -> float:
    """Mean absolute difference over a network's weights that rounding allows after
    `steps` optimizer steps at learning rates up to `lr`, on batches of up to `rows` rows."""
    return steps * lr * math.sqrt(LONGEST_SUM * rows) * torch.finfo(dtype).eps


def within_rounding(a: float, b: float, dtype: torch.dtype, steps: int) -> bool:
    """Whether two losses of one computation, after at most `steps` steps, are so close
    that another computation, each of its losses off by `loss_tolerance`, may order them
    the other way."""
    return abs(a - b) <= 2 * loss_tolerance(dtype, steps) * max(abs(a), abs(b))


def same_best_epoch(
    best: int,
    reference_best: int,
    reference_losses: list[float],
    dtype: torch.dtype,
    steps_per_epoch: int,
) -> bool:
    """Whether `best` may be the best epoch of a computation whose reference found
    `reference_best`, on the reference's validation losses (one per epoch): the same
    epoch, or one whose loss the reference found within rounding of its best's."""
    if best == reference_best:
        return True
    if not 1 <= best <= len(reference_losses):
        return False
    return within_rounding(
        reference_losses[best - 1],
        reference_losses[reference_best - 1],
        dtype,
        max(best, reference_best) * steps_per_epoch,
    )


def near_ties(gaps: torch.Tensor, dtype: torch.dtype, steps: int) -> int:
    """How many rows, of `gaps` (`tests.reference.top_two_gaps`), another computation may
    count differently after `steps` steps: their two largest logits, each off by up to
    `loss_tolerance` of the largest, may swap."""
    return int((gaps <= 2 * loss_tolerance(dtype, steps)).sum())


# Relative difference that numpy's kernel paths allow in a float the sampler drew (5.).
DRAW_TOLERANCE = 1e-12


def same_draw_value(a: Any, b: Any) -> bool:
    """Whether two values of one parameter are one draw on two CPUs: floats within
    `DRAW_TOLERANCE`, everything else (integers, categories, booleans) exactly."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=DRAW_TOLERANCE, abs_tol=0.0)
    return type(a) is type(b) and a == b


def assert_same_draws(
    drawn: Sequence[Mapping[str, Any]], stored: Sequence[Mapping[str, Any]]
) -> None:
    """`drawn` are the draws `stored` recorded, as another CPU draws them: the same number
    of draws, each the same parameters in the same order, each value `same_draw_value`."""
    assert len(drawn) == len(stored), f"{len(drawn)} draws against {len(stored)} stored"
    for i, (here, there) in enumerate(zip(drawn, stored, strict=True)):
        assert list(here) == list(there), f"draw {i}: parameters {list(here)} != {list(there)}"
        wrong = {k: (here[k], there[k]) for k in here if not same_draw_value(here[k], there[k])}
        assert not wrong, f"draw {i}: (drawn, stored) differ beyond rounding: {wrong}"


@contextmanager
def stable_sort_ties() -> Iterator[None]:
    """numpy's `argsort` as a stable sort, while the sampler draws (6.): equal values keep
    their order, as on every CPU; an order of unequal values is the same either way."""
    unstable = np.argsort

    def argsort(a: Any, axis: int = -1, kind: str | None = None, **rest: Any) -> np.ndarray:
        return unstable(a, axis=axis, kind="stable" if kind is None else kind, **rest)

    with mock.patch.object(np, "argsort", argsort):
        yield
