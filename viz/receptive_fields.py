"""Receptive fields of the output neurons, as the seed report defines them: the product of
the weight matrices without biases, W_out · … · W_1, one 784-pixel row per digit.

Biases and activations are left out, which is why the report found them hard to read.
"""

from __future__ import annotations

import torch

from model.network import FFNN


@torch.no_grad()
def receptive_fields(model: FFNN) -> torch.Tensor:
    """The (10, 784) product of the network's weight matrices, output layer first."""
    product = model.layers[0].weight
    for layer in model.layers[1:]:
        product = layer.weight @ product
    return product.detach().cpu()
