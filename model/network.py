"""The fully connected network, as one network and as a stack of independent ones.

`FFNN` is the ordinary network: 784 → h1 → … → hL → 10, activation then dropout after
every hidden layer, logits out (cross-entropy applies the softmax). Retraining,
checkpoints and pictures use it.

`StackedFFNN` holds many such networks in one set of tensors — the k folds of one trial,
or of several trials at once — each weight `(n, fan_in, fan_out)`, each bias
`(n, 1, fan_out)`, and advances all of them together through autograd, one batched
matmul per layer. (On the CPU in float32, training runs through `model.cpu_step`
instead, which reads the same tensors but not `forward`.) The networks share nothing:
each product stays within its network, the summed loss gives each its own gradient, and
Adam/Adamax act element-wise, so training the stack is training its networks side by
side. `extract(n)` gives network n back as an `FFNN` with the same outputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model import activations
from model.config import N_CLASSES, N_INPUTS


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


class StackedFFNN(nn.Module):
    """Independent `FFNN`s trained together: k networks (the folds) of each of several
    trials, trial-major (network n is fold n mod k of trial n // k).

    Each weight is `(n, fan_in, fan_out)` and each bias `(n, 1, fan_out)`, sized for the
    widest trial in each layer; a narrower network sits in the top-left corner of its
    slice with zeros around it. Zero units stay zero through training: their incoming and
    outgoing weights get zero gradients (every activation here maps 0 to 0), so Adam and
    Adamax, weight decay included, never move them. A trial's networks therefore train
    as they would alone, up to the order of floating-point sums.

    Trials with the same activation must be neighbours (`forward` applies each activation
    to one contiguous run of networks); `model.kfold` sorts them so.

    `forward` takes `(n, B, 784)` — each network its own batch — or `(B, 784)`, one batch
    shown to all; it returns `(n, B, 10)`. Dropout is whatever `masks` the caller passes
    (one `(n, B, width)` tensor of 0 or 1/keep per hidden layer, and `input_mask`
    `(n, B, 784)` over the pixels; `model.steps.draw_masks` draws them): without masks
    there is none, as in evaluation.
    """

    def __init__(self, shapes: Sequence[NetShape], k: int = 1) -> None:
        super().__init__()
        if not shapes:
            raise ValueError("a stack needs at least one network shape")
        depths = {len(shape.hidden) for shape in shapes}
        if len(depths) > 1:
            raise ValueError("only networks of one depth stack")
        self.k = int(k)
        self.shapes = tuple(shapes)
        self.n = len(self.shapes) * self.k
        self.hidden = tuple(max(widths) for widths in zip(*(s.hidden for s in shapes), strict=True))
        self.runs = _activation_runs([s.activation for s in shapes], self.k)
        # Looked up once here, not in `forward`, which torch.compile may trace.
        self._acts = [activations.get(name).forward for name, _, _ in self.runs]
        sizes = layer_sizes(self.hidden)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.zeros(self.n, fan_in, fan_out))
            for fan_in, fan_out in itertools.pairwise(sizes)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.zeros(self.n, 1, fan_out)) for fan_out in sizes[1:]
        )

    @classmethod
    def uniform(cls, k: int, hidden: Sequence[int], activation: str, dropout: float) -> StackedFFNN:
        """k networks of one shape: the folds of one trial."""
        return cls([NetShape(tuple(int(h) for h in hidden), activation, float(dropout))], k)

    def trial(self, t: int) -> slice:
        """The networks of trial t."""
        return slice(t * self.k, (t + 1) * self.k)

    def shape_of(self, n: int) -> NetShape:
        return self.shapes[n // self.k]

    def reset_parameters(self, seeds: int | Sequence[int]) -> None:
        """nn.Linear's default initialisation, each trial's k networks drawn from a CPU
        generator seeded with that trial's seed: layer by layer, the weights (k, fan_in,
        fan_out) then the biases (k, 1, fan_out), uniform in ±1/√fan_in of the trial's own
        fan-in. So a trial starts from the same weights in any stack and on any device.
        """
        seeds = [seeds] * len(self.shapes) if isinstance(seeds, int) else list(seeds)
        if len(seeds) != len(self.shapes):
            raise ValueError(f"{len(seeds)} seeds for {len(self.shapes)} trials")
        with torch.no_grad():
            for param in self.parameters():
                param.zero_()
            for t, (shape, seed) in enumerate(zip(self.shapes, seeds, strict=True)):
                generator = torch.Generator().manual_seed(seed)
                sizes = shape.sizes
                for i, (fan_in, fan_out) in enumerate(itertools.pairwise(sizes)):
                    bound = 1.0 / math.sqrt(fan_in)
                    for tensor, rows in ((self.weights[i], fan_in), (self.biases[i], 1)):
                        values = torch.rand(
                            (self.k, rows, fan_out), generator=generator, dtype=tensor.dtype
                        )
                        tensor[self.trial(t), :rows, :fan_out] = values.mul_(2 * bound).sub_(bound)

    def forward(
        self,
        x: torch.Tensor,
        masks: Sequence[torch.Tensor] | None = None,
        input_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if input_mask is not None:
            x = x * input_mask
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if x.dim() == 2:
                # One batch for all networks: broadcasting matmul avoids n copies of it.
                x = torch.matmul(x, weight) + bias
            else:
                x = torch.baddbmm(bias, x, weight)
            if i < last:
                x = self._activate(x)
                if masks is not None:
                    x = x * masks[i]
        return x

    def _activate(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.runs) == 1:
            return self._acts[0](x)
        runs = zip(self._acts, self.runs, strict=True)
        return torch.cat([act(x[start:stop]) for act, (_, start, stop) in runs])

    def extract(self, n: int) -> FFNN:
        """Network n as an ordinary `FFNN` on the same device, with the same outputs."""
        if not 0 <= n < self.n:
            raise IndexError(f"network {n} of a stack of {self.n}")
        shape = self.shape_of(n)
        like = self.weights[0]
        net = FFNN(shape.hidden, shape.activation, shape.dropout, shape.input_dropout)
        net.to(like.device, like.dtype)
        with torch.no_grad():
            for layer, weight, bias in zip(net.layers, self.weights, self.biases, strict=True):
                fan_out, fan_in = layer.weight.shape
                layer.weight.copy_(weight[n, :fan_in, :fan_out].T)
                layer.bias.copy_(bias[n, 0, :fan_out])
        return net

    def select(
        self, trials: Sequence[int], weights: Sequence[torch.Tensor] | None = None
    ) -> StackedFFNN:
        """A new stack of these trials' networks, as narrow as they allow, with their
        weights copied from this stack, or from `weights` (tensors laid out as this
        stack's parameters, such as the best weights kept by early stopping)."""
        stack = StackedFFNN([self.shapes[t] for t in trials], self.k)
        stack.to(self.weights[0].device)
        index = self.network_index(trials)
        source = self.parameters() if weights is None else weights
        with torch.no_grad():
            for mine, theirs in zip(source, stack.parameters(), strict=True):
                theirs.copy_(narrow(mine, index, theirs.shape))
        return stack

    def network_index(self, trials: Sequence[int]) -> torch.Tensor:
        """The networks of `trials`, in order, as an index tensor on the stack's device."""
        return torch.tensor(
            [n for t in trials for n in range(t * self.k, (t + 1) * self.k)],
            device=self.weights[0].device,
        )

    @classmethod
    def from_networks(cls, networks: Sequence[FFNN]) -> StackedFFNN:
        """Stack networks (each its own trial of one); the inverse of `extract`."""
        shapes = [
            NetShape(net.hidden, net.activation, net.dropout, net.input_dropout) for net in networks
        ]
        stacked = cls(shapes, 1)
        stacked.to(networks[0].layers[0].weight.device)
        with torch.no_grad():
            for n, net in enumerate(networks):
                for i, layer in enumerate(net.layers):
                    fan_out, fan_in = layer.weight.shape
                    stacked.weights[i][n, :fan_in, :fan_out] = layer.weight.T
                    stacked.biases[i][n, 0, :fan_out] = layer.bias
        return stacked


def narrow(tensor: torch.Tensor, index: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`tensor`'s networks `index` (dim 0), cut to `shape`'s other dimensions."""
    picked = tensor.index_select(0, index)
    return picked[:, : shape[1], : shape[2]].contiguous()


def per_network(model: StackedFFNN, values: Sequence[float]) -> torch.Tensor:
    """One value per trial as an (n, 1, 1) tensor over the stack's networks."""
    like = model.weights[0]
    column = torch.tensor(list(values), dtype=like.dtype, device=like.device)
    return column.repeat_interleave(model.k).view(-1, 1, 1)


def _activation_runs(names: Sequence[str], k: int) -> list[tuple[str, int, int]]:
    """(activation, first network, one past the last) for each run of equal activations."""
    runs: list[tuple[str, int, int]] = []
    for t, name in enumerate(names):
        if runs and runs[-1][0] == name:
            runs[-1] = (name, runs[-1][1], (t + 1) * k)
        elif any(run[0] == name for run in runs):
            raise ValueError(f"trials with activation {name!r} must be neighbours in a stack")
        else:
            runs.append((name, t * k, (t + 1) * k))
    return runs
