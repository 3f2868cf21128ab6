"""A reference k-fold trainer that owns everything it compares against.

The stacked trainer (`model.kfold`) and the hand-written CPU step (`model.cpu_step`) are
held to this file. It takes nothing from `model/` but the configuration: the folds, the
initial weights, the batch order and the dropout masks are rebuilt here from the rules
the trainer documents, and each fold is an ordinary `nn.Sequential` trained alone by
autograd with a plain (unfused) optimizer. A bug the trainer would otherwise share with
its reference — a validation fold leaking into a training part, a mask drawn from the
wrong place, a wrong dropout scale — shows as a difference.

The rules, as `model/` documents them:

- Folds (`split_folds`): one `randperm(n_images)` from a generator seeded with
  `fold_seed`; its first `subset` entries (all, for None) cut into k consecutive folds of
  m = subset // k images (the rest unused). Fold j validates on part j and trains on
  the other parts, concatenated in order.
- Initial weights (`StackedFFNN.reset_parameters`): a CPU generator seeded with `seed`
  draws, layer by layer, the weights (k, fan_in, fan_out) and then the biases
  (k, 1, fan_out) with `rand`, mapped to [-1/√fan_in, 1/√fan_in); network j takes slice j.
- Random stream (`train_kfold`): torch's generator seeded with `seed` as training
  starts. At mini-batch, each epoch first draws `rand(k, n_train)`; the argsort of row
  j orders fold j's training rows. Then every step draws, for each hidden layer in turn,
  one keep mask over (k, B, width) — only when dropout > 0.
- Keep masks (`keep_mask`): ⌈n/4⌉ int64 words from `random_()`, read as 16-bit chunks
  four to a word; the lower three chunks are uniform over int16, the top one over
  [0, 2^15). With t = round(keep · 2^15) (at least 1), a value is kept where its chunk is
  below 2t − 2^15 (lower chunks) or t (top chunk), and kept values are scaled by
  2^15 / t, the inverse of the probability actually drawn.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import TrainConfig

ACTIVATION_MODULES = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "hardswish": nn.Hardswish,
    "silu": nn.SiLU,
}


def fold_indices(n_images: int, config: TrainConfig) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(training rows, validation rows) of each fold, by the rule above."""
    permutation = torch.randperm(
        n_images, generator=torch.Generator().manual_seed(config.fold_seed)
    )
    subset = permutation[: n_images if config.subset is None else min(config.subset, n_images)]
    m = len(subset) // config.k
    parts = [subset[j * m : (j + 1) * m] for j in range(config.k)]
    return [
        (torch.cat([part for i, part in enumerate(parts) if i != j]), parts[j])
        for j in range(config.k)
    ]


def keep_probability(dropout: float) -> float:
    """The keep probability the masks really draw with: a multiple of 2^-15."""
    return min(max(round((1.0 - dropout) * 32768), 1), 32767) / 32768


def draw_keep_mask(shape: tuple[int, ...], dropout: float) -> torch.Tensor:
    """A bool keep mask from torch's global stream, by the rule above."""
    numel = math.prod(shape)
    threshold = round(keep_probability(dropout) * 32768)
    words = torch.empty(-(-numel // 4), dtype=torch.int64).random_()
    chunks = words.view(torch.int16).view(-1, 4).to(torch.int32)
    below = torch.tensor([2 * threshold - 32768] * 3 + [threshold], dtype=torch.int32)
    return (chunks < below).flatten()[:numel].view(shape)


def draw_step_masks(k: int, rows: int, config: TrainConfig) -> list[torch.Tensor] | None:
    """One step's keep masks, (k, rows, width) per hidden layer; None without dropout."""
    if config.dropout == 0.0:
        return None
    return [draw_keep_mask((k, rows, width), config.dropout) for width in config.hidden]


class MaskedDropout(nn.Module):
    """Dropout whose mask is set from outside before each training forward pass."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.scale = 1.0 / keep_probability(dropout)
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.mask is None:
            return x
        return x * self.mask * self.scale


def initial_networks(
    config: TrainConfig, dtype: torch.dtype = torch.float32
) -> list[nn.Sequential]:
    """The k fold networks before training, by the rule above."""
    generator = torch.Generator().manual_seed(config.seed)
    sizes = [784, *config.hidden, 10]
    drawn = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(fan_in)
        weight = torch.rand(config.k, fan_in, fan_out, generator=generator) * (2 * bound) - bound
        bias = torch.rand(config.k, 1, fan_out, generator=generator) * (2 * bound) - bound
        drawn.append((weight, bias))
    return [
        network_from(config, [(w[j].T, b[j, 0]) for w, b in drawn], dtype) for j in range(config.k)
    ]


def network_from(
    config: TrainConfig, layers: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> nn.Sequential:
    """An `nn.Sequential` with the given (weight (out, in), bias) per layer."""
    modules: list[nn.Module] = []
    for i, (weight, bias) in enumerate(layers):
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        modules.append(linear)
        if i < len(layers) - 1:
            modules += [ACTIVATION_MODULES[config.activation](), MaskedDropout(config.dropout)]
    return nn.Sequential(*modules)


def set_masks(net: nn.Sequential, masks: list[torch.Tensor] | None) -> None:
    dropouts = [m for m in net if isinstance(m, MaskedDropout)]
    for i, module in enumerate(dropouts):
        module.mask = None if masks is None else masks[i]


def plain_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    kind = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax}[config.optimizer]
    return kind(net.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=False)


def plain_step(
    net: nn.Sequential, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor
) -> tuple[float, int]:
    """One optimizer step on a batch: (mean loss, correct count), as training saw them."""
    net.train()
    optimizer.zero_grad()
    logits = net(x)
    loss = F.cross_entropy(logits, y)
    loss.backward()
    optimizer.step()
    return loss.item(), int((logits.argmax(dim=1) == y).sum())


@dataclass
class FoldRun:
    accuracy: float = 0.0
    loss: float = math.inf
    best_epoch: int = 0
    epochs: int = 0
    curves: dict[str, list[float]] = field(
        default_factory=lambda: {
            "train_loss": [],
            "train_accuracy": [],
            "val_loss": [],
            "val_accuracy": [],
        }
    )
    net: nn.Sequential | None = None


def reference_kfold(config: TrainConfig, x: torch.Tensor, y: torch.Tensor) -> list[FoldRun]:
    """Each fold trained alone, on the CPU, by the rules above."""
    splits = fold_indices(len(x), config)
    n_train = len(splits[0][0])
    full_batch = config.full_batch or config.batch_size >= n_train
    batch = n_train if full_batch else config.batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        epochs = []  # per epoch: (batch order (k, n_train) or None, per step its masks)
        for _ in range(config.max_epochs):
            order = None if full_batch else torch.rand(config.k, n_train).argsort(dim=1)
            steps = [
                draw_step_masks(config.k, min(batch, n_train - start), config)
                for start in range(0, n_train, batch)
            ]
            epochs.append((order, steps))

    runs = []
    for j, (net, (train_rows, val_rows)) in enumerate(
        zip(initial_networks(config), splits, strict=True)
    ):
        optimizer = plain_optimizer(net, config)
        run, bad = FoldRun(), 0
        for epoch, (order, steps) in enumerate(epochs, start=1):
            rows = train_rows if order is None else train_rows[order[j]]
            loss_sum, correct = 0.0, 0
            for s, masks in enumerate(steps):
                batch_rows = rows[s * batch : (s + 1) * batch]
                set_masks(net, None if masks is None else [m[j] for m in masks])
                loss, right = plain_step(net, optimizer, x[batch_rows], y[batch_rows])
                loss_sum += loss * len(batch_rows)
                correct += right
            net.eval()
            with torch.no_grad():
                logits = net(x[val_rows])
                val_loss = F.cross_entropy(logits, y[val_rows]).item()
                val_accuracy = (logits.argmax(dim=1) == y[val_rows]).float().mean().item()
            for name, value in zip(
                run.curves,
                (loss_sum / n_train, correct / n_train, val_loss, val_accuracy),
                strict=True,
            ):
                run.curves[name].append(value)
            if val_loss < run.loss:
                run.loss, run.accuracy, run.best_epoch, bad = val_loss, val_accuracy, epoch, 0
                run.net = _copy(net, config)
            else:
                bad += 1
            run.epochs = epoch
            if bad >= config.patience:
                break
        runs.append(run)
    return runs


def _copy(net: nn.Sequential, config: TrainConfig) -> nn.Sequential:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    layers = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]
    return network_from(config, layers, linears[0].weight.dtype)
