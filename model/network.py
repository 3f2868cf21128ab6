"""The fully connected network, as one network and as a stack of k independent ones.

`FFNN` is the ordinary network: 784 → h1 → … → hL → 10, activation then dropout after
every hidden layer, logits out (cross-entropy applies the softmax). Retraining,
checkpoints and pictures use it.

`StackedFFNN` holds k such networks in one set of tensors — each weight `(k, fan_in,
fan_out)`, each bias `(k, 1, fan_out)` — and advances all of them together through
autograd, one batched matmul per layer. (On the CPU in float32, training runs through
`model.cpu_step` instead, which reads the same tensors but not `forward`.) The k networks
share nothing: each product stays within its network, the summed loss gives each its own
gradient, and Adam/Adamax act element-wise, so training the stack is training k networks
side by side. `extract(j)` gives fold j back as an `FFNN` with the same outputs.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from model import activations
from model.config import N_CLASSES, N_INPUTS
from model.dropout import dropout


def layer_sizes(hidden: Sequence[int]) -> list[int]:
    """Every layer's width, input and output included: [784, h1, …, hL, 10]."""
    return [N_INPUTS, *hidden, N_CLASSES]


class FFNN(nn.Module):
    """One fully connected network; takes pixels in [0, 1] shaped (B, 784) or (B, 28, 28)."""

    def __init__(self, hidden: Sequence[int], activation: str, dropout: float) -> None:
        super().__init__()
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        self._act = activations.get(activation).forward
        self.dropout = float(dropout)
        sizes = layer_sizes(self.hidden)
        self.layers = nn.ModuleList(
            nn.Linear(fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(sizes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(x.shape[0], N_INPUTS)
        for layer in self.layers[:-1]:
            x = F.dropout(self._act(layer(x)), self.dropout, self.training)
        return self.layers[-1](x)


class StackedFFNN(nn.Module):
    """k independent `FFNN`s of one shape, trained together.

    `forward` takes `(k, B, 784)` — each network its own batch — or `(B, 784)`, one batch
    shown to all k; it returns `(k, B, 10)`.
    """

    def __init__(self, k: int, hidden: Sequence[int], activation: str, dropout: float) -> None:
        super().__init__()
        self.k = int(k)
        self.hidden = tuple(int(h) for h in hidden)
        self.activation = activation
        # Looked up once here, not in `forward`, which torch.compile may trace.
        self._act = activations.get(activation).forward
        self.dropout = float(dropout)
        sizes = layer_sizes(self.hidden)
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(self.k, fan_in, fan_out))
            for fan_in, fan_out in itertools.pairwise(sizes)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(self.k, 1, fan_out)) for fan_out in sizes[1:]
        )

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """nn.Linear's default initialisation, drawn independently for every network.

        Draws on the CPU from `generator` and copies to the parameters' device, so a seed
        gives the same initial weights on every device.
        """
        with torch.no_grad():
            for weight, bias in zip(self.weights, self.biases, strict=True):
                bound = 1.0 / math.sqrt(weight.shape[1])
                for tensor in (weight, bias):
                    values = torch.rand(tensor.shape, generator=generator, dtype=tensor.dtype)
                    tensor.copy_(values.mul_(2 * bound).sub_(bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if x.dim() == 2:
                # One batch for all networks: broadcasting matmul avoids k copies of it.
                x = torch.matmul(x, weight) + bias
            else:
                x = torch.baddbmm(bias, x, weight)
            if i < last:
                # Dropout draws an independent mask per element, hence per network.
                x = dropout(self._act(x), self.dropout, self.training)
        return x

    def extract(self, j: int) -> FFNN:
        """Network j as an ordinary `FFNN` on the same device, with the same outputs."""
        if not 0 <= j < self.k:
            raise IndexError(f"network {j} of a stack of {self.k}")
        net = FFNN(self.hidden, self.activation, self.dropout).to(self.weights[0].device)
        with torch.no_grad():
            for layer, weight, bias in zip(net.layers, self.weights, self.biases, strict=True):
                layer.weight.copy_(weight[j].T)
                layer.bias.copy_(bias[j, 0])
        return net

    @classmethod
    def from_networks(cls, networks: Sequence[FFNN]) -> StackedFFNN:
        """Stack networks of one shape; the inverse of `extract`."""
        first = networks[0]
        for net in networks[1:]:
            if (net.hidden, net.activation, net.dropout) != (
                first.hidden,
                first.activation,
                first.dropout,
            ):
                raise ValueError("only networks of one shape, activation and dropout stack")
        stacked = cls(len(networks), first.hidden, first.activation, first.dropout)
        stacked.to(first.layers[0].weight.device)
        with torch.no_grad():
            for i, (weight, bias) in enumerate(zip(stacked.weights, stacked.biases, strict=True)):
                weight.copy_(torch.stack([net.layers[i].weight.T for net in networks]))
                bias.copy_(torch.stack([net.layers[i].bias[None, :] for net in networks]))
        return stacked
