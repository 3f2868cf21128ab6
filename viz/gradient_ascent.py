"""Images that maximise each output neuron, found by gradient ascent on the pixels.

The report's way (`PLAIN`): start from pixels uniform in [0, 1), freeze the network
(eval mode, no dropout), and step every pixel along the gradient of one output neuron,
3000 steps at learning rate 0.01, pixels kept in [0, 1]; all ten neurons as one batch.
Its images looked like noise: the network responds to many pixel patterns that are no
digit at all, and nothing pulls the search towards smooth strokes.

`REGULARISED` adds what feature-visualisation work has found to help:

- an L2 and a total-variation penalty on the pixels (fewer, smoother strokes on a dark
  background) and a Gaussian blur every 4 steps (removes the high-frequency patterns the
  raw gradient feeds on), with a tenfold step. With these alone, on two of three
  networks trained for 20 epochs on the quick preset's 12,000 images, and on one trained
  for 3 epochs on 4,000, some digit's image was won by another output: a 1 that went
  flat grey, output 0, and was called a 5; an 8 called a 5; a 1 called a 2. A thin
  stroke pays the total variation on both its edges, and a small logit is outweighed
  by the penalties.
- the logit plus its margin over the other nine (the logit minus the log-sum-exp of the
  others) as the objective: on the logit alone a neuron can rise while another rises
  more. (The log-softmax alone gave dimmer, vaguer strokes: it stops pulling once the
  digit wins.)
- the 4-pixel border kept black: MNIST centres each digit in a 20 × 20 box, so the
  network never saw ink there and its weights for those pixels are leftovers; with the
  border free, bars along the edges (under 7 and 9) and blobs in the corners (5) took
  the place of strokes.
- penalties that give way where they win: every 300 steps, each digit whose output is
  not ahead of every other by `margin_goal` has its penalties halved, so a digit the
  penalties still flatten ends near the unpenalised ascent rather than grey.

On those four networks each of the last three alone made every digit win; together, the
smallest margin was 2.0, and the penalties were relaxed only for two digits of the
3-epoch network. Random shifts of the image at each step (jitter) gave fainter images and
lost a 1 again.
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
    border: int = 0
    """Pixels this far from the image's edge are kept at 0."""
    contrast: bool = False
    """Ascend the logit plus its margin over the others' log-sum-exp, not the logit alone."""
    relax_every: int = 0
    """Every this many steps, halve the penalties of each digit not ahead by `margin_goal`."""
    margin_goal: float = 2.0
    seed: int = 0


PLAIN = AscentSettings()
REGULARISED = AscentSettings(
    lr=0.1, l2=0.01, tv=0.1, blur_every=4, border=4, contrast=True, relax_every=300
)


@dataclass(frozen=True)
class AscentResult:
    images: torch.Tensor
    """(10, 784) pixels in [0, 1]; row d maximises output neuron d."""
    start_outputs: torch.Tensor
    """(10,) each target neuron's output on its starting image."""
    end_outputs: torch.Tensor
    """(10,) the same on the final image."""
    margins: torch.Tensor
    """(10,) on image d, output d minus the largest other output (> 0: d wins)."""
    penalty_scale: torch.Tensor
    """(10,) what the penalties of each digit were multiplied by at the end (1: never
    relaxed)."""


def gradient_ascent(model: FFNN, settings: AscentSettings = PLAIN) -> AscentResult:
    """Ascend every output neuron's activation (its logit) over its own image."""
    model = model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(settings.seed)
    x = torch.rand(N_CLASSES, 28 * 28, generator=generator).to(device)
    inside = _inside_mask(settings.border).to(device)
    if settings.border:
        x = x * inside
    digits = torch.arange(N_CLASSES, device=device)
    others = ~torch.eye(N_CLASSES, dtype=torch.bool, device=device)
    scale = torch.ones(N_CLASSES, device=device)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    try:
        start = model(x)[digits, digits].detach()
        kernel = _gaussian_kernel(settings.blur_sigma).to(device)
        for step in range(1, settings.steps + 1):
            x.requires_grad_(True)
            outputs = model(x)
            objective = outputs[digits, digits]
            if settings.contrast:
                rest = outputs.masked_fill(~others, float("-inf")).logsumexp(dim=1)
                objective = objective + (objective - rest)
            if settings.l2:
                objective = objective - scale * settings.l2 * x.pow(2).sum(dim=1)
            if settings.tv:
                objective = objective - scale * settings.tv * _total_variation(x)
            (grad,) = torch.autograd.grad(objective.sum(), x)
            with torch.no_grad():
                x = (x + settings.lr * grad).clamp_(0.0, 1.0)
                if settings.blur_every and step % settings.blur_every == 0:
                    x = _blur(x, kernel)
                if settings.border:
                    x = x * inside
                if settings.relax_every and step % settings.relax_every == 0:
                    behind = _margins(model(x), others) < settings.margin_goal
                    scale = torch.where(behind, scale / 2, scale)
        with torch.no_grad():
            outputs = model(x)
    finally:
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    return AscentResult(
        x.detach().cpu(),
        start.cpu(),
        outputs[digits, digits].cpu(),
        _margins(outputs, others).cpu(),
        scale.cpu(),
    )


def _margins(outputs: torch.Tensor, others: torch.Tensor) -> torch.Tensor:
    """Row d: output d minus the largest of the other outputs."""
    rival = outputs.masked_fill(~others, float("-inf")).amax(dim=1)
    return outputs.diagonal() - rival


def _inside_mask(border: int) -> torch.Tensor:
    mask = torch.zeros(28, 28)
    mask[border : 28 - border, border : 28 - border] = 1.0
    return mask.view(1, 28 * 28)


def _total_variation(x: torch.Tensor) -> torch.Tensor:
    """Each image's summed absolute differences between neighbouring pixels."""
    img = x.view(-1, 28, 28)
    return (img[:, 1:, :] - img[:, :-1, :]).abs().sum(dim=(1, 2)) + (
        img[:, :, 1:] - img[:, :, :-1]
    ).abs().sum(dim=(1, 2))


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    weights = torch.exp(-(offsets**2) / (2 * sigma**2))
    weights = weights / weights.sum()
    return (weights[:, None] * weights[None, :])[None, None]


def _blur(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.view(-1, 1, 28, 28), kernel, padding=2).view(-1, 28 * 28).clamp_(0.0, 1.0)
