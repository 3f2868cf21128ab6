"""Images that maximise each output neuron, found by gradient ascent on the pixels.

The report's way (`plain`): start from pixels uniform in [0, 1), freeze the network
(eval mode, no dropout), and step every pixel along the gradient of one output neuron,
3000 steps at learning rate 0.01, pixels kept in [0, 1]; all ten neurons as one batch.
Its images looked like noise: the network responds to many pixel patterns that are no
digit at all, and nothing pulls the search towards smooth strokes.

`regularised` adds what feature-visualisation work has found to help: an L2 penalty and
a total-variation penalty on the pixels (fewer, smoother strokes on a dark background)
and a Gaussian blur every 4 steps (removes the high-frequency patterns the raw gradient
feeds on), with a tenfold step. Its weights were chosen by looking: on a quick-preset
network, stronger penalties blacked out some digits (the penalty outweighed a small
logit), and ascending the log-softmax instead of the logit gave dimmer, vaguer strokes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model.config import N_CLASSES
from model.network import FFNN


@dataclass(frozen=True)
class AscentSettings:
    steps: int = 3000
    lr: float = 0.01
    l2: float = 0.0
    tv: float = 0.0
    blur_every: int = 0
    blur_sigma: float = 0.8
    seed: int = 0


PLAIN = AscentSettings()
REGULARISED = AscentSettings(lr=0.1, l2=0.01, tv=0.1, blur_every=4)


@dataclass(frozen=True)
class AscentResult:
    images: torch.Tensor
    """(10, 784) pixels in [0, 1]; row d maximises output neuron d."""
    start_outputs: torch.Tensor
    """(10,) each target neuron's output on its starting image."""
    end_outputs: torch.Tensor
    """(10,) the same on the final image."""


def gradient_ascent(model: FFNN, settings: AscentSettings = PLAIN) -> AscentResult:
    """Ascend every output neuron's activation (its logit) over its own image."""
    model = model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.rand(N_CLASSES, 28 * 28, generator=generator).to(device)
    digits = torch.arange(N_CLASSES, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        start = _target_outputs(model, x, digits).detach()
        kernel = _gaussian_kernel(settings.blur_sigma).to(device)
        for step in range(1, settings.steps + 1):
            x.requires_grad_(True)
            objective = _target_outputs(model, x, digits).sum()
            if settings.l2:
                objective = objective - settings.l2 * x.pow(2).sum()
            if settings.tv:
                objective = objective - settings.tv * _total_variation(x)
            (grad,) = torch.autograd.grad(objective, x)
            with torch.no_grad():
                x = (x + settings.lr * grad).clamp_(0.0, 1.0)
                if settings.blur_every and step % settings.blur_every == 0:
                    x = _blur(x, kernel)
        end = _target_outputs(model, x, digits).detach()
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return AscentResult(x.detach().cpu(), start.cpu(), end.cpu())


def _target_outputs(model: FFNN, x: torch.Tensor, digits: torch.Tensor) -> torch.Tensor:
    return model(x)[digits, digits]


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Summed absolute differences between neighbouring pixels."""
    img = x.view(-1, 28, 28)
    return (img[:, 1:, :] - img[:, :-1, :]).abs().sum() + (
        img[:, :, 1:] - img[:, :, :-1]
    ).abs().sum()


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    return (weights[:, None] * weights[None, :])[None, None]


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.view(-1, 1, 28, 28), kernel, padding=2).view(-1, 28 * 28).clamp_(0.0, 1.0)
