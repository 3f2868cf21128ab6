"""The activations a network may use, in one table: each one's forward, in-place forward
and derivative, in the forms the network, the autograd step and the hand-written CPU
step (`model.cpu_step`) need.

An activation is added here and nowhere else: `TrainConfig` accepts the table's names,
the CLI's help lists them, and every training path reads the entry. (The study's search
spaces name their own choices, so a new activation is searched only where one says so.)

The names are read without importing torch — the CLI answers a mistyped flag without it —
so each entry is a function that builds its `Activation` the first time it is asked for.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

LEAKY_SLOPE = 0.01  # F.leaky_relu's default


@dataclass(frozen=True)
class Activation:
    """One activation f, as the training steps use it.

    The hand-written backward needs f'(x) at every pre-activation x. Where the output
    y = f(x) · mask alone gives it (`derivative_from_output`), the step writes y over x and
    keeps nothing else; otherwise (`backward_from_input`) it keeps x beside y.
    """

    forward: Callable[[torch.Tensor], torch.Tensor]
    """f(x) out of place, for autograd."""
    forward_in_place: Callable[[torch.Tensor], torch.Tensor]
    """f(x) written over x."""
    derivative_from_output: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """(y, into) → d(f(x) · mask)/dx, read off y = f(x) · mask (0 where y is 0, dropped);
    may be written into `into`, a buffer of y's shape and dtype."""
    backward_from_input: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    """(grad, x) → grad · f'(x), from the pre-activation x."""

    def __post_init__(self) -> None:
        if (self.derivative_from_output is None) == (self.backward_from_input is None):
            raise ValueError("an activation's derivative comes from its output or its input")

    @property
    def keeps_input(self) -> bool:
        """Whether backward needs the pre-activation kept beside the output."""
        return self.derivative_from_output is None


def _relu() -> Activation:
    import torch
    import torch.nn.functional as F

    return Activation(
        forward=F.relu,
        forward_in_place=lambda x: x.clamp_min_(0.0),
        derivative_from_output=lambda y, into: torch.gt(y, 0, out=into),
    )


def _leaky_relu() -> Activation:
    import torch
    import torch.nn.functional as F

    def derivative_from_output(y: torch.Tensor, into: torch.Tensor) -> torch.Tensor:
        # 0-d tensors in the output's dtype: a Python 0.01 would become float32's
        # 0.0099999998 (2e-9 off), which the float64 tests would see.
        one, slope, zero = (y.new_tensor(v) for v in (1.0, LEAKY_SLOPE, 0.0))
        return torch.where(y > 0, one, torch.where(y < 0, slope, zero), out=into)

    return Activation(
        forward=functools.partial(F.leaky_relu, negative_slope=LEAKY_SLOPE),
        forward_in_place=lambda x: F.leaky_relu_(x, LEAKY_SLOPE),
        derivative_from_output=derivative_from_output,
    )


def _hardswish() -> Activation:
    import torch
    import torch.nn.functional as F

    return Activation(
        forward=F.hardswish,
        forward_in_place=lambda x: F.hardswish(x, inplace=True),
        backward_from_input=torch.ops.aten.hardswish_backward,
    )


def _silu() -> Activation:
    import torch
    import torch.nn.functional as F

    return Activation(
        forward=F.silu,
        forward_in_place=lambda x: F.silu(x, inplace=True),
        backward_from_input=torch.ops.aten.silu_backward,
    )


TABLE: dict[str, Callable[[], Activation]] = {
    "relu": _relu,
    "leaky_relu": _leaky_relu,
    "hardswish": _hardswish,
    "silu": _silu,
}


@functools.cache
def get(name: str) -> Activation:
    """The table's activation `name`; KeyError for a name it lacks (`TrainConfig` refuses
    such names where they enter, so here one is a bug)."""
    return TABLE[name]()
