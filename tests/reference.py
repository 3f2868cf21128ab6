"""A reference k-fold trainer that owns everything it compares against.

The stacked trainer (`model.kfold`) and the hand-written CPU step (`model.cpu_step`) are
held to this file. It takes nothing from `model/` but the configuration: the folds, the
initial weights, the batch order, the dropout masks, the learning-rate schedules and the
max-norm cap are rebuilt here from the rules the trainer documents, and each fold is an
ordinary `nn.Sequential` trained alone by autograd with a plain (unfused) optimizer. A
bug the trainer would otherwise share with its reference — a validation fold leaking
into a training part, a mask drawn from the wrong place, a wrong dropout scale, a
schedule one step off, a cap on the wrong axis — shows as a difference.

The rules, as `model/` documents them:

- Folds (`split_folds`): one `randperm(n_images)` from a generator seeded with
  `fold_seed`; its first `subset` entries (all, for None) cut into k consecutive folds of
  m = subset // k images (the rest unused). Fold j validates on part j and trains on
  the other parts, concatenated in order.
- Initial weights (`StackedFFNN.reset_parameters`): a CPU generator seeded with `seed`
  draws, layer by layer, the weights (k, fan_in, fan_out) and then the biases
  (k, 1, fan_out) with `rand` in the model's dtype (torch's default dtype when the
  trainer builds it: float32, or float64 in the tests that set it), mapped to
  [-1/√fan_in, 1/√fan_in); network j takes slice j.
- Random stream (`train_kfold`): torch's generator seeded with `seed` as training
  starts. At mini-batch, each epoch first draws `rand(k, n_train)` (in that dtype too);
  the argsort of row j orders fold j's training rows. Then every step draws one keep mask over
  (k, B, 784) for the input pixels — only when input_dropout > 0 — and then, for each
  hidden layer in turn, one keep mask over (k, B, width) — only when dropout > 0.
- Keep masks (`keep_mask`): ⌈n/4⌉ int64 words from `random_()`, read as 16-bit chunks
  four to a word; the lower three chunks are uniform over int16, the top one over
  [0, 2^15). With t = round(keep · 2^15) (at least 1), a value is kept where its chunk is
  below 2t − 2^15 (lower chunks) or t (top chunk), and kept values are scaled by
  2^15 / t, the inverse of the probability actually drawn. The input mask drops pixels
  before the first layer (the network's first module), by the same rule.
- Optimizers (`make_optimizer`): adam and adamax with the L2 penalty as `weight_decay`;
  adamw (decoupled decay); sgd with momentum 0.9, Nesterov, the penalty as L2
  `weight_decay`. torch's own formulas, here unfused (`foreach=False`).
- Learning rate (`lr_factors`): step s (0-based) of T = max_epochs · ⌈n_train / B⌉ steps
  (one per epoch at full batch) uses lr · factor(s), set before the optimizer steps:
  constant 1; cosine (s + 1) / W for s < W = min(round(warmup · T), T − 1), then
  0.5 · (1 + cos(π (s − W) / (T − W))); one_cycle, with R = min(round(0.3 · T), T − 1),
  1/25 + (1 − 1/25) · 0.5 · (1 − cos(π s / R)) for s < R, then
  e + (1 − e) · 0.5 · (1 + cos(π (s − R) / (T − R))) with e = 1/25 · 10⁻⁴.
- Max-norm (`MaxNorm`): after every optimizer step, each hidden unit's incoming weights
  (a row of a hidden `nn.Linear`'s (out, in) weight) are multiplied by
  min(1, cap / ‖row‖₂); the output layer is not capped.
- Label smoothing: the training loss is `F.cross_entropy(label_smoothing=ε)`,
  (1 − ε)·CE + ε·mean over the classes of −log p, and the training curve reports it;
  validation losses stay plain cross-entropy.
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


def draw_step_masks(k: int, rows: int, config: TrainConfig) -> list[torch.Tensor | None]:
    """One step's keep masks, in the order they are drawn and the network applies them:
    the input's (k, rows, 784), then each hidden layer's (k, rows, width); None where
    that dropout is 0 (nothing is drawn for it)."""
    inputs = draw_keep_mask((k, rows, 784), config.input_dropout) if config.input_dropout else None
    hidden = [
        draw_keep_mask((k, rows, width), config.dropout) if config.dropout else None
        for width in config.hidden
    ]
    return [inputs, *hidden]


def fold_masks(masks: list[torch.Tensor | None], j: int) -> list[torch.Tensor | None]:
    """Network j's part of one step's masks."""
    return [None if mask is None else mask[j] for mask in masks]


class MaskedDropout(nn.Module):
    """Dropout whose mask is set from outside before each training forward pass."""

    def __init__(self, dropout: float) -> None:
        super().__init__()
        self.scale = 1.0 / keep_probability(dropout) if dropout else 1.0
        self.mask: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.mask is None:
            return x
        return x * self.mask * self.scale


def initial_networks(
    config: TrainConfig, dtype: torch.dtype = torch.float32
) -> list[nn.Sequential]:
    """The k fold networks before training, by the rule above, drawn in `dtype` (a float64
    draw is not a float32 draw widened: it reads other bits of the stream)."""
    generator = torch.Generator().manual_seed(config.seed)
    sizes = [784, *config.hidden, 10]
    drawn = []
    for fan_in, fan_out in itertools.pairwise(sizes):
        bound = 1.0 / math.sqrt(fan_in)
        weight = torch.rand(config.k, fan_in, fan_out, generator=generator, dtype=dtype)
        bias = torch.rand(config.k, 1, fan_out, generator=generator, dtype=dtype)
        weight, bias = weight * (2 * bound) - bound, bias * (2 * bound) - bound
        drawn.append((weight, bias))
    return [
        network_from(config, [(w[j].T, b[j, 0]) for w, b in drawn], dtype) for j in range(config.k)
    ]


def network_from(
    config: TrainConfig, layers: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype
) -> nn.Sequential:
    """An `nn.Sequential` with the given (weight (out, in), bias) per layer: input dropout
    first, then each hidden layer's linear map, activation and dropout, then the output."""
    modules: list[nn.Module] = [MaskedDropout(config.input_dropout)]
    for i, (weight, bias) in enumerate(layers):
        linear = nn.Linear(weight.shape[1], weight.shape[0], dtype=dtype)
        with torch.no_grad():
            linear.weight.copy_(weight)
            linear.bias.copy_(bias)
        modules.append(linear)
        if i < len(layers) - 1:
            modules += [ACTIVATION_MODULES[config.activation](), MaskedDropout(config.dropout)]
    return nn.Sequential(*modules)


def set_masks(net: nn.Sequential, masks: list[torch.Tensor | None] | None) -> None:
    """One network's masks (`fold_masks`), input's first, onto its dropout modules."""
    dropouts = [m for m in net if isinstance(m, MaskedDropout)]
    for i, module in enumerate(dropouts):
        module.mask = None if masks is None else masks[i]


def plain_optimizer(net: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params, lr, decay = net.parameters(), config.lr, config.weight_decay
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=0.9, nesterov=True, weight_decay=decay, foreach=False
        )
    kind = {"adam": torch.optim.Adam, "adamax": torch.optim.Adamax, "adamw": torch.optim.AdamW}
    return kind[config.optimizer](params, lr=lr, weight_decay=decay, foreach=False)


def lr_factor(schedule: str, warmup: float, total_steps: int, s: int) -> float:
    """The learning rate of step s (0-based) of `total_steps`, as a fraction of the
    configured one, by the rule above."""
    t = total_steps
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        w = min(round(warmup * t), t - 1)
        if s < w:
            return (s + 1) / w
        return 0.5 * (1.0 + math.cos(math.pi * (s - w) / (t - w)))
    if schedule == "one_cycle":
        low = 1.0 / 25.0
        end = low / 1e4
        r = min(round(0.3 * t), t - 1)
        if s < r:
            return low + (1.0 - low) * 0.5 * (1.0 - math.cos(math.pi * s / r))
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * (s - r) / (t - r)))
    raise ValueError(schedule)


def apply_max_norm(net: nn.Sequential, cap: float) -> None:
    """Each hidden unit's incoming weights scaled to an L2 norm of at most `cap`."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        for linear in linears[:-1]:
            weight = linear.weight  # (out, in): row u holds unit u's incoming weights
            norms = weight.square().sum(dim=1, keepdim=True).sqrt()
            weight.mul_(torch.where(norms > cap, cap / norms, torch.ones_like(norms)))


class PlainTrainer:
    """One network trained alone by the rules above: its optimizer, its learning rate at
    each of `total_steps` steps, its max-norm cap and its label smoothing."""

    def __init__(self, net: nn.Sequential, config: TrainConfig, total_steps: int) -> None:
        self.net = net
        self.config = config
        self.optimizer = plain_optimizer(net, config)
        self.rates = [
            config.lr * lr_factor(config.schedule, config.warmup, total_steps, s)
            for s in range(total_steps)
        ]
        self.steps = 0
        self.logits: torch.Tensor | None = None  # the last step's, for `top_two_gaps`

    def step(
        self, x: torch.Tensor, y: torch.Tensor, masks: list[torch.Tensor | None] | None = None
    ) -> tuple[float, int]:
        """One optimizer step on a batch with these masks (`fold_masks`): (mean training
        loss, correct count), as training saw them."""
        set_masks(self.net, masks)
        self.net.train()
        self.optimizer.zero_grad()
        logits = self.net(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.config.label_smoothing)
        loss.backward()
        self.update()
        self.logits = logits.detach()
        return loss.item(), int((logits.argmax(dim=1) == y).sum())

    def update(self) -> None:
        """The optimizer step on the gradients the network holds, at this step's learning
        rate, then the max-norm cap."""
        for group in self.optimizer.param_groups:
            group["lr"] = self.rates[self.steps]
        self.steps += 1
        self.optimizer.step()
        if self.config.max_norm is not None:
            apply_max_norm(self.net, self.config.max_norm)


@dataclass
class FoldRun:
    """One fold trained alone: its figures at its best epoch (lowest validation loss), the
    epoch early stopping ends it at, and its curves and weights, one entry per epoch
    trained (past `epochs` too, when it was run out to `max_epochs`)."""

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
    nets: list[nn.Sequential] = field(default_factory=list)
    gaps: dict[str, list[torch.Tensor]] = field(
        default_factory=lambda: {"train_accuracy": [], "val_accuracy": []}
    )
    """Per epoch, each row's `top_two_gaps` as the accuracy of that name counted it."""

    def net_at(self, epoch: int) -> nn.Sequential:
        """The weights after `epoch` (1-based)."""
        return self.nets[epoch - 1]


def reference_kfold(
    config: TrainConfig, x: torch.Tensor, y: torch.Tensor, *, run_out: bool = False
) -> list[FoldRun]:
    """Each fold trained alone, on the CPU, by the rules above, in the dtype of `x` (the
    trainer's model takes torch's default dtype; a test that trains in float64 sets both).

    With `run_out`, each fold trains on to `max_epochs` after early stopping would end
    it, so that its curves and weights can be read at any epoch another run stopped or
    found its best at; `best_epoch` and `epochs` stay what early stopping gives."""
    dtype = x.dtype
    splits = fold_indices(len(x), config)
    n_train = len(splits[0][0])
    full_batch = config.full_batch or config.batch_size >= n_train
    batch = n_train if full_batch else config.batch_size
    steps_per_epoch = -(-n_train // batch)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        epochs = []  # per epoch: (batch order (k, n_train) or None, per step its masks)
        for _ in range(config.max_epochs):
            order = None if full_batch else torch.rand(config.k, n_train, dtype=dtype).argsort(1)
            steps = [
                draw_step_masks(config.k, min(batch, n_train - start), config)
                for start in range(0, n_train, batch)
            ]
            epochs.append((order, steps))

    runs = []
    for j, (net, (train_rows, val_rows)) in enumerate(
        zip(initial_networks(config, dtype), splits, strict=True)
    ):
        trainer = PlainTrainer(net, config, config.max_epochs * steps_per_epoch)
        run, bad, stopped = FoldRun(), 0, False
        for epoch, (order, steps) in enumerate(epochs, start=1):
            rows = train_rows if order is None else train_rows[order[j]]
            loss_sum, correct, train_gaps = 0.0, 0, []
            for s, masks in enumerate(steps):
                batch_rows = rows[s * batch : (s + 1) * batch]
                loss, right = trainer.step(x[batch_rows], y[batch_rows], fold_masks(masks, j))
                loss_sum += loss * len(batch_rows)
                correct += right
                train_gaps.append(top_two_gaps(trainer.logits))
            net.eval()
            with torch.no_grad():
                logits = net(x[val_rows])
                val_loss = F.cross_entropy(logits, y[val_rows]).item()
                val_accuracy = (logits.argmax(dim=1) == y[val_rows]).float().mean().item()
            run.gaps["train_accuracy"].append(torch.cat(train_gaps))
            run.gaps["val_accuracy"].append(top_two_gaps(logits))
            for name, value in zip(
                run.curves,
                (loss_sum / n_train, correct / n_train, val_loss, val_accuracy),
                strict=True,
            ):
                run.curves[name].append(value)
            if run_out:
                run.nets.append(_copy(net, config))
            if stopped:
                continue
            if val_loss < run.loss:
                run.loss, run.accuracy, run.best_epoch, bad = val_loss, val_accuracy, epoch, 0
                run.net = _copy(net, config)
            else:
                bad += 1
            run.epochs = epoch
            stopped = bad >= config.patience
            if stopped and not run_out:
                break
        runs.append(run)
    return runs


def top_two_gaps(logits: torch.Tensor) -> torch.Tensor:
    """Per row of (rows, 10) logits, how far apart its two largest are, relative to its
    largest magnitude: a row whose gap is within rounding may be counted right by one
    computation and wrong by another."""
    top = logits.detach().topk(2, dim=1).values
    scale = logits.detach().abs().amax(dim=1).clamp_min(torch.finfo(logits.dtype).tiny)
    return (top[:, 0] - top[:, 1]) / scale


def _copy(net: nn.Sequential, config: TrainConfig) -> nn.Sequential:
    linears = [m for m in net if isinstance(m, nn.Linear)]
    layers = [(m.weight.detach().clone(), m.bias.detach().clone()) for m in linears]
    return network_from(config, layers, linears[0].weight.dtype)
