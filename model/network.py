"""The fully connected network, as one network and as a stack of independent ones.

`FFNN` is the ordinary network: 784 → h1 → … → hL → 10, activation then dropout after
every hidden layer, logits out (cross-entropy applies the softmax). Retraining,
checkpoints and pictures use it.

`StackedFFNN` holds many such networks: the k folds of one trial, or of several trials at
once, each trial at its own widths. Trial t's parameters are k-batched tensors — each
weight `(k, fan_in, fan_out)`, each bias `(k, 1, fan_out)` — and all of them are views of
one flat tensor, `flat`, trial after trial, so that a whole-stack update (`StackedAdam`,
early stopping's best weights) is a few element-wise passes over one tensor, and a trial's
share of any flat-shaped tensor is one contiguous slice of it (`trial_range`).

`forward` computes the first layer of every trial that reads the shared images as one
batched product over the k folds: its width is the sum of those trials' first widths
(rounded up to a multiple of `ALIGN` with zero columns, for the tensor cores), and the
images are read once per fold, never copied per network. Layer 1 is about 95 % of the
products of the report's networks. The later layers run per trial at its own widths. (On
the CPU in float32, training runs through `model.cpu_step` instead, which reads the same
tensors but not `forward`.) The networks share nothing: each product stays within its
network, the summed loss gives each its own gradient, and the optimizers act element-wise,
so training the stack is training its networks side by side. `extract(n)` gives network n
back as an `FFNN` with the same outputs.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model import activations
from model.config import N_CLASSES, N_INPUTS

# The fused first layer's width is rounded up to a multiple of this: tensor-core kernels
# want the product's N and its output's leading dimension so; a drawn width is any
# integer (257 was the first GPU stack's widest). Zero columns cost under 1 % of a stack
# of seed trials (about 1,500 units).
ALIGN = 16


def layer_sizes(hidden: Sequence[int]) -> list[int]:
    """Every layer's width, input and output included: [784, h1, …, hL, 10]."""
    return [N_INPUTS, *hidden, N_CLASSES]


class FFNN(nn.Module):
    """One fully connected network; takes pixels in [0, 1] shaped (B, 784) or (B, 28, 28)."""

    def __init__(
        self, hidden: Sequence[int], activation: str, dropout: float, input_dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self._act = activations.get(activation).forward
        self.dropout = float(dropout)
        self.input_dropout = float(input_dropout)
        sizes = layer_sizes(self.hidden)
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(sizes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x.reshape(x.shape[0], N_INPUTS), self.input_dropout, self.training)
        for layer in self.layers[:-1]:
            x = F.dropout(self._act(layer(x)), self.dropout, self.training)
        return self.layers[-1](x)


@dataclass(frozen=True)
class NetShape:
    """What makes a network itself in a stack: its hidden widths, activation, dropouts
    (hidden and input), and the label smoothing of its training loss."""

    hidden: tuple[int, ...]
    activation: str
    dropout: float
    input_dropout: float = 0.0
    label_smoothing: float = 0.0

    @property
    def drops(self) -> bool:
        """Whether a training step draws dropout masks for this network."""
        return self.dropout > 0.0 or self.input_dropout > 0.0

    @property
    def sizes(self) -> list[int]:
        return layer_sizes(self.hidden)

    def parameter_shapes(self, k: int) -> list[tuple[int, int, int]]:
        """A trial's k-batched parameters, in the stack's order: every weight
        (k, fan_in, fan_out), then every bias (k, 1, fan_out)."""
        pairs = list(itertools.pairwise(self.sizes))
        return [(k, a, b) for a, b in pairs] + [(k, 1, b) for _, b in pairs]


class TrialMasks(NamedTuple):
    """One step's dropout for one trial's k networks: `input` (k, rows, 784) over the
    pixels and `hidden`, one (k, rows, width) per hidden layer, each 0 or 1 (None where
    the trial does not drop there); a kept value is scaled by `input_scale` or `scale`
    (1/keep), which the next layer's product applies as its alpha."""

    input: torch.Tensor | None
    hidden: list[torch.Tensor] | None
    input_scale: float = 1.0
    scale: float = 1.0


class StackedFFNN(nn.Module):
    """Independent `FFNN`s trained together: k networks (the folds) of each of several
    trials, trial-major (network n is fold n mod k of trial n // k), each trial at its own
    widths (see the module's docstring).

    `forward` takes `(k, B, 784)` — fold j's rows for network j of every trial, the first
    layer fused across trials — or `(n, B, 784)`, each network its own batch (each
    trial's first layer then its own product), or `(B, 784)`, one batch shown to all; it
    returns `(n, B, 10)`. Dropout is whatever `masks` the caller passes, one `TrialMasks`
    per trial (`model.steps.draw_masks` draws them); without masks there is none, as in
    evaluation.
    """

    def __init__(
        self,
        shapes: Sequence[NetShape],
        k: int = 1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("a stack needs at least one network shape")
        if len({len(shape.hidden) for shape in shapes}) > 1:
            raise ValueError("only networks of one depth stack")
        self.k = int(k)
        self.shapes = tuple(shapes)
        self.n = len(self.shapes) * self.k
        self.depth = len(self.shapes[0].hidden) + 1
        # Looked up once here, not in `forward`, which torch.compile may trace.
        self._acts = [activations.get(shape.activation).forward for shape in self.shapes]
        sizes = [[math.prod(s) for s in shape.parameter_shapes(self.k)] for shape in self.shapes]
        starts = list(itertools.accumulate((sum(s) for s in sizes), initial=0))
        self._ranges = list(itertools.pairwise(starts))
        flat = torch.zeros(starts[-1], device=device, dtype=dtype or torch.get_default_dtype())
        self._bind(flat)

    def _bind(self, flat: torch.Tensor) -> None:
        """Make every parameter a view of `flat` (trial-major, as `parameter_shapes`)."""
        self.flat = flat
        self._trial_params: list[list[nn.Parameter]] = []
        for t in range(len(self.shapes)):
            views = self.views(flat, t)
            params = [nn.Parameter(view) for view in views]
            for i, param in enumerate(params):
                self.register_parameter(f"trial{t}_{i}", param)
            self._trial_params.append(params)
        self._zeros: dict[tuple[int, int], torch.Tensor] = {}
        self.__dict__.pop("element_network", None)

    def _apply(self, fn, recurse: bool = True):  # type: ignore[no-untyped-def]
        # `.to()`, `.double()`, …: move the flat tensor and rebind the views to it, which
        # moving each parameter on its own would break.
        self._bind(fn(self.flat.detach()))
        return self

    # --- where each trial's parameters live -------------------------------------------

    def trial(self, t: int) -> slice:
        """The networks of trial t."""
        return slice(t * self.k, (t + 1) * self.k)

    def shape_of(self, n: int) -> NetShape:
        return self.shapes[n // self.k]

    def trial_params(self, t: int) -> list[nn.Parameter]:
        """Trial t's parameters: its weights, then its biases (`parameter_shapes`)."""
        return self._trial_params[t]

    def weights_of(self, t: int) -> list[nn.Parameter]:
        return self._trial_params[t][: self.depth]

    def biases_of(self, t: int) -> list[nn.Parameter]:
        return self._trial_params[t][self.depth :]

    def trial_range(self, t: int) -> slice:
        """Trial t's share of `flat`, or of any tensor laid out as it."""
        return slice(*self._ranges[t])

    def views(self, flat: torch.Tensor, t: int) -> list[torch.Tensor]:
        """Trial t's parameters as views of `flat`, a tensor laid out as the stack's."""
        start = self._ranges[t][0]
        out = []
        for shape in self.shapes[t].parameter_shapes(self.k):
            size = math.prod(shape)
            out.append(flat[start : start + size].view(shape))
            start += size
        return out

    def gather(self, flat: torch.Tensor, trials: Sequence[int]) -> torch.Tensor:
        """The shares of `trials`, in order, of a tensor laid out as `flat`: a flat tensor
        laid out as the stack of those trials."""
        return torch.cat([flat[self.trial_range(t)] for t in trials])

    @functools.cached_property
    def element_network(self) -> torch.Tensor:
        """(len(flat),) int64: the network each element of `flat` belongs to."""
        parts = []
        network = torch.arange(self.n, device=self.flat.device)
        for t, shape in enumerate(self.shapes):
            for _, rows, cols in shape.parameter_shapes(self.k):
                parts.append(network[self.trial(t)].repeat_interleave(rows * cols))
        return torch.cat(parts)

    def per_element(self, values: Sequence[float]) -> torch.Tensor:
        """One value per trial spread over its share of `flat`, in `flat`'s dtype."""
        lengths = torch.tensor([stop - start for start, stop in self._ranges])
        column = torch.tensor(list(values), dtype=self.flat.dtype)
        return column.repeat_interleave(lengths).to(self.flat.device)

    # --- initialisation ----------------------------------------------------------------

    @classmethod
    def uniform(cls, k: int, hidden: Sequence[int], activation: str, dropout: float) -> StackedFFNN:
        """k networks of one shape: the folds of one trial."""
        return cls([NetShape(tuple(int(h) for h in hidden), activation, float(dropout))], k)

    def reset_parameters(self, seeds: int | Sequence[int]) -> None:
        """nn.Linear's default initialisation, each trial's k networks drawn from a CPU
        generator seeded with that trial's seed: layer by layer, the weights (k, fan_in,
        fan_out) then the biases (k, 1, fan_out), uniform in ±1/√fan_in of the layer's
        fan-in. So a trial starts from the same weights in any stack and on any device.
        """
        seeds = [seeds] * len(self.shapes) if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(self.shapes):
            raise ValueError(f"{len(seeds)} seeds for {len(self.shapes)} trials")
        with torch.no_grad():
            for t, seed in enumerate(seeds):
                generator = torch.Generator().manual_seed(seed)
                for weight, bias in zip(self.weights_of(t), self.biases_of(t), strict=True):
                    bound = 1.0 / math.sqrt(weight.shape[1])
                    for tensor in (weight, bias):
                        values = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
                        tensor.copy_(values.mul_(2 * bound).sub_(bound))

    # --- the forward pass --------------------------------------------------------------

    def forward(self, x: torch.Tensor, masks: Sequence[TrialMasks] | None = None) -> torch.Tensor:
        logits = []
        for t, z in enumerate(self._first_layer(x, masks)):
            weights, biases = self.weights_of(t), self.biases_of(t)
            act = self._acts[t]
            mask = None if masks is None else masks[t]
            for i in range(1, self.depth):
                a = act(z)
                scale = 1.0
                if mask is not None and mask.hidden is not None:
                    a, scale = a * mask.hidden[i - 1], mask.scale
                z = torch.baddbmm(biases[i], a, weights[i], alpha=scale)
            logits.append(z)
        return logits[0] if len(logits) == 1 else torch.cat(logits)

    def _first_layer(
        self, x: torch.Tensor, masks: Sequence[TrialMasks] | None
    ) -> list[torch.Tensor]:
        """Each trial's first-layer pre-activations (k, B, h1). The trials that read the
        shared images unmasked share one product; a trial that drops pixels, or that has
        its own rows (an (n, B, 784) batch), has its own."""
        shared = x.dim() == 2 or x.shape[0] != self.n or self.n == self.k
        own: dict[int, torch.Tensor] = {}
        fused = []
        for t in range(len(self.shapes)):
            weight, bias = self.weights_of(t)[0], self.biases_of(t)[0]
            rows = x if shared else x[self.trial(t)]
            mask = None if masks is None else masks[t]
            if mask is not None and mask.input is not None:
                rows = _broadcast(rows, self.k) * mask.input
                own[t] = torch.baddbmm(bias, rows, weight, alpha=mask.input_scale)
            elif not shared:
                own[t] = torch.baddbmm(bias, rows, weight)
            else:
                fused.append(t)
        if fused:
            widths = [self.shapes[t].hidden[0] for t in fused]
            weights = [self.weights_of(t)[0] for t in fused]
            biases = [self.biases_of(t)[0] for t in fused]
            pad = -sum(widths) % ALIGN if len(fused) > 1 else 0
            if pad:
                weights.append(self._zero_columns(weights[0], weights[0].shape[1], pad))
                biases.append(self._zero_columns(biases[0], 1, pad))
            weight = weights[0] if len(weights) == 1 else torch.cat(weights, dim=2)
            bias = biases[0] if len(biases) == 1 else torch.cat(biases, dim=2)
            if x.dim() == 2:
                z = torch.matmul(x, weight) + bias
            else:
                z = torch.baddbmm(bias, x, weight)
            parts = z.split(widths + ([pad] if pad else []), dim=2) if len(weights) > 1 else [z]
            own.update(zip(fused, parts, strict=False))
        return [own[t] for t in range(len(self.shapes))]

    def _zero_columns(self, like: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
        # Made once per stack: a tensor made inside a CUDA graph's capture would be lost.
        zeros = self._zeros.get((rows, cols))
        if zeros is None:
            zeros = torch.zeros(self.k, rows, cols, device=like.device, dtype=like.dtype)
            self._zeros[(rows, cols)] = zeros
        return zeros

    # --- taking networks out and putting them in ---------------------------------------

    def extract(self, n: int) -> FFNN:
        """Network n as an ordinary `FFNN` on the same device, with the same outputs."""
        if not 0 <= n < self.n:
            raise IndexError(f"network {n} of a stack of {self.n}")
        shape = self.shape_of(n)
        t, j = divmod(n, self.k)
        net = FFNN(shape.hidden, shape.activation, shape.dropout, shape.input_dropout)
        net.to(self.flat.device, self.flat.dtype)
        with torch.no_grad():
            for layer, weight, bias in zip(
                net.layers, self.weights_of(t), self.biases_of(t), strict=True
            ):
                layer.weight.copy_(weight[j].T)
                layer.bias.copy_(bias[j, 0])
        return net

    def select(self, trials: Sequence[int], flat: torch.Tensor | None = None) -> StackedFFNN:
        """A new stack of these trials' networks, with their weights copied from this
        stack, or from `flat` (a tensor laid out as this stack's, such as the best weights
        kept by early stopping)."""
        stack = StackedFFNN(
            [self.shapes[t] for t in trials], self.k, device=self.flat.device, dtype=self.flat.dtype
        )
        with torch.no_grad():
            stack.flat.copy_(self.gather(self.flat if flat is None else flat, trials))
        return stack

    def network_index(self, trials: Sequence[int]) -> torch.Tensor:
        """The networks of `trials`, in order, as an index tensor on the stack's device."""
        return torch.tensor(
            [n for t in trials for n in range(t * self.k, (t + 1) * self.k)],
            device=self.flat.device,
        )

    @classmethod
    def from_networks(cls, networks: Sequence[FFNN]) -> StackedFFNN:
        """Stack networks (each its own trial of one); the inverse of `extract`."""
        shapes = [
            NetShape(net.hidden, net.activation, net.dropout, net.input_dropout) for net in networks
        ]
        like = networks[0].layers[0].weight
        stacked = cls(shapes, 1, device=like.device, dtype=like.dtype)
        with torch.no_grad():
            for t, net in enumerate(networks):
                for layer, weight, bias in zip(
                    net.layers, stacked.weights_of(t), stacked.biases_of(t), strict=True
                ):
                    weight[0].copy_(layer.weight.T)
                    bias[0, 0].copy_(layer.bias)
        return stacked


def _broadcast(x: torch.Tensor, k: int) -> torch.Tensor:
    """A (B, 784) batch as (k, B, 784) for the k networks of a trial (a view)."""
    return x.expand(k, *x.shape) if x.dim() == 2 else x


def per_network(model: StackedFFNN, values: Sequence[float]) -> torch.Tensor:
    """One value per trial as an (n, 1, 1) tensor over the stack's networks."""
    column = torch.tensor(list(values), dtype=model.flat.dtype, device=model.flat.device)
    return column.repeat_interleave(model.k).view(-1, 1, 1)
