"""The optimizers of a stack of trials: each trial's own rule (Adam, AdamW, Adamax, SGD),
learning rate, L2 penalty, learning-rate schedule (`lr_factors`) and max-norm cap
(`MaxNorm`), over its networks' share of the stacked weights.

Its own file because a step only calls `zero_grad` and `step`: how the stack is updated is
a separate choice, made per stack by `make_optimizer` — torch's own optimizer per trial
(`TrialOptimizers`, the fastest where it may run), or one element-wise update of the whole
stack whose state lives on the device (`StackedAdam`, which a CUDA graph can capture).
Both keep each network's state apart, and both shrink with the stack (`select`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from model.config import SGD_MOMENTUM, TrainConfig
from model.network import StackedFFNN


def make_optimizer(
    model: StackedFFNN,
    configs: list[TrainConfig],
    *,
    total_steps: int,
    capturable: bool = False,
) -> Optimizer:
    """Each trial's optimizer over its networks, its learning rate following its
    `schedule` over `total_steps` steps (`lr_factors`), and its max-norm cap applied
    after every step (`MaxNorm`).

    The rules act element by element (or, max-norm, unit by unit), so on a stack each
    network has its own optimizer state in effect. Each trial gets torch's own optimizer
    over its networks (`TrialOptimizers`); a stack whose steps a CUDA graph will capture
    (`capturable`) gets `StackedAdam` instead: one update for the whole stack, its step
    count on the device (Adam and Adamax only).
    """
    if capturable:
        return StackedAdam(model, configs, total_steps)
    return TrialOptimizers(model, configs, total_steps)


def lr_factors(schedule: str, warmup: float, total_steps: int) -> torch.Tensor:
    """The learning rate of each of `total_steps` steps (0-based s, T steps in all) as a
    fraction of the configured one (float64, on the CPU):

    - constant: 1 (the report's);
    - cosine: a linear warm-up over the first W = round(warmup · T) steps, (s + 1) / W,
      then 0.5 · (1 + cos(π (s − W) / (T − W))), down towards 0 at the last step;
    - one_cycle (torch's `OneCycleLR` shape, learning rate only): from 1/25 up to 1 along
      a half cosine over the first R = round(0.3 · T) steps, then down along a half
      cosine to 1/25 · 10⁻⁴.

    W and R are at most T − 1, so every schedule ends on its way down.
    """
    steps = torch.arange(total_steps, dtype=torch.float64)
    if schedule == "constant":
        return torch.ones(total_steps, dtype=torch.float64)
    if schedule == "cosine":
        rise = min(round(warmup * total_steps), total_steps - 1)
        up = (steps + 1) / max(rise, 1)
        down = 0.5 * (1 + torch.cos(math.pi * (steps - rise) / (total_steps - rise)))
        return torch.where(steps < rise, up, down)
    if schedule == "one_cycle":
        start, end = 1 / 25, 1 / 25 / 1e4
        rise = min(round(0.3 * total_steps), total_steps - 1)
        up = start + (1 - start) * 0.5 * (1 - torch.cos(math.pi * steps / max(rise, 1)))
        down = end + (1 - end) * 0.5 * (
            1 + torch.cos(math.pi * (steps - rise) / (total_steps - rise))
        )
        return torch.where(steps < rise, up, down)
    raise ValueError(f"schedule {schedule!r}")


class MaxNorm:
    """The dropout paper's max-norm constraint: after each step, every hidden unit's
    incoming weights (a column of a hidden layer's (k, fan_in, fan_out) weight) are
    scaled down to an L2 norm of at most its trial's cap, in place (no host sync, so a
    CUDA graph may capture it). Trials without a cap are left alone."""

    def __init__(self, model: StackedFFNN, caps: Sequence[float | None]) -> None:
        self.capped = [
            (model.weights_of(t)[:-1], cap) for t, cap in enumerate(caps) if cap is not None
        ]

    @classmethod
    def of(cls, model: StackedFFNN, configs: Sequence[TrainConfig]) -> MaxNorm | None:
        caps = [c.max_norm for c in configs]
        return None if all(c is None for c in caps) else cls(model, caps)

    @torch.no_grad()
    def __call__(self) -> None:
        for weights, cap in self.capped:
            for weight in weights:
                norms = torch.linalg.vector_norm(weight, dim=1, keepdim=True)
                weight.mul_((cap / norms).clamp_(max=1.0))


class TrialOptimizers:
    """torch's Adam (fused), AdamW (fused), Adamax (multi-tensor) or SGD with Nesterov
    momentum (multi-tensor) for each trial, over its own parameters (each contiguous, so
    each trial's update is one fused pass).

    Measured on the project's 2-core CPU: one step for two trials of the quick preset
    (6 networks, 784-249-36-10) took 0.8 ms as fused Adam and 17 ms as `StackedAdam`'s
    element-wise sequence, which made stacked mini-batch training half as fast as one
    trial at a time (benchmarks/README.md). A mini-batch step of the report's network
    took 0.28 ms fused against 1.09 ms unfused.
    """

    def __init__(self, model: StackedFFNN, configs: list[TrainConfig], total_steps: int) -> None:
        self.model = model
        self.configs = list(configs)
        self.total_steps = total_steps
        self.optimizers = [
            _torch_optimizer(model.trial_params(t), config) for t, config in enumerate(configs)
        ]
        # Each trial's learning rate for each step; None where it stays constant.
        self.rates: list[list[float] | None] = [
            None
            if c.schedule == "constant"
            else (c.lr * lr_factors(c.schedule, c.warmup, total_steps)).tolist()
            for c in configs
        ]
        self.steps_done = 0
        self.max_norm = MaxNorm.of(model, configs)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model.parameters():
            param.grad = None

    def step(self) -> None:
        # Past the schedule's end (a caller training longer than it said) the last rate holds.
        at = min(self.steps_done, self.total_steps - 1)
        for optimizer, rates in zip(self.optimizers, self.rates, strict=True):
            if rates is not None:
                for group in optimizer.param_groups:
                    group["lr"] = rates[at]
            optimizer.step()
        self.steps_done += 1
        if self.max_norm is not None:
            self.max_norm()

    def state_of(self, t: int) -> list[dict[str, torch.Tensor]]:
        """Trial t's optimizer state, one dict per parameter (empty before a step)."""
        state = self.optimizers[t].state
        return [state.get(param, {}) for param in self.model.trial_params(t)]

    def select(self, model: StackedFFNN, keep: list[int], index: torch.Tensor) -> TrialOptimizers:
        """The optimizers of the trials at positions `keep`, where they stand, on `model`
        (their stack)."""
        kept = TrialOptimizers(model, [self.configs[t] for t in keep], self.total_steps)
        kept.steps_done = self.steps_done
        for new, t in enumerate(keep):
            for param, old in zip(model.trial_params(new), self.state_of(t), strict=True):
                if old:
                    kept.optimizers[new].state[param] = {
                        name: value.clone() for name, value in old.items()
                    }
        return kept


def _torch_optimizer(params: list[torch.Tensor], config: TrainConfig) -> torch.optim.Optimizer:
    lr, decay = config.lr, config.weight_decay
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=decay, fused=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=decay, fused=True)
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=lr, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=decay, foreach=True
        )
    # Adamax has no fused kernel; the multi-tensor one is the fastest there is.
    return torch.optim.Adamax(params, lr=lr, weight_decay=decay, foreach=True)


class StackedAdam:
    """Adam and Adamax (torch's formulas, L2 penalty added to the gradient) over a stack
    whose trials each have their own rule, learning rate and penalty.

    The stack's parameters are views of one flat tensor (`StackedFFNN.flat`), so the
    moments are two more such tensors and the per-trial settings are spread over each
    trial's share of them: a step is a fixed sequence of element-wise passes over the
    whole stack whatever the mix of trials — no loop over trials or parameters, and
    nothing read back to the host (the step count lives on the device, ready for graph
    capture).
    """

    BETAS = (0.9, 0.999)
    EPS = 1e-8

    def __init__(self, model: StackedFFNN, configs: list[TrainConfig], total_steps: int) -> None:
        unsupported = {c.optimizer for c in configs} - {"adam", "adamax"}
        if unsupported:
            raise ValueError(f"StackedAdam steps adam and adamax, not {', '.join(unsupported)}")
        self.model = model
        self.params = list(model.parameters())
        self.weight_decay = model.per_element([c.weight_decay for c in configs])
        self.adamax = model.per_element([float(c.optimizer == "adamax") for c in configs]).bool()
        # Each trial's learning rate at every step, (T, trials): the step count on the
        # device indexes it, so a captured step follows the schedule when replayed.
        like = model.flat
        self.rates = torch.stack(
            [c.lr * lr_factors(c.schedule, c.warmup, total_steps) for c in configs], dim=1
        ).to(like.device, like.dtype)
        self.trial_of = model.element_network // model.k
        self.step_count = torch.zeros((), dtype=like.dtype, device=like.device)
        self.first = torch.zeros_like(like)
        self.second = torch.zeros_like(like)
        self.max_norm = MaxNorm.of(model, configs)
        self._configs = list(configs)

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.BETAS
        at = self.step_count.long().clamp(max=self.rates.shape[0] - 1)
        lr = self.rates.index_select(0, at.view(1)).view(-1).index_select(0, self.trial_of)
        self.step_count += 1
        step_size = lr / (1 - beta1**self.step_count)
        root_correction = torch.sqrt(1 - beta2**self.step_count)
        param = self.model.flat
        grad = torch.cat([p.grad.reshape(-1) for p in self.params])
        grad.addcmul_(param, self.weight_decay)
        first, second = self.first, self.second
        first.lerp_(grad, 1 - beta1)
        adam_second = second * beta2 + (1 - beta2) * grad * grad
        adamax_second = torch.maximum(second * beta2, grad.abs() + self.EPS)
        second.copy_(torch.where(self.adamax, adamax_second, adam_second))
        denominator = torch.where(self.adamax, second, second.sqrt() / root_correction + self.EPS)
        param.sub_(step_size * first / denominator)
        if self.max_norm is not None:
            self.max_norm()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.params:
            param.grad = None

    def select(self, model: StackedFFNN, keep: list[int], index: torch.Tensor) -> StackedAdam:
        """This optimizer's state for the trials at positions `keep` (networks `index`),
        on `model` (their stack)."""
        kept = StackedAdam(model, [self._configs[t] for t in keep], 1)
        kept.rates = self.rates[:, keep]
        kept.step_count = self.step_count.clone()
        kept.first = self.model.gather(self.first, keep)
        kept.second = self.model.gather(self.second, keep)
        return kept


Optimizer = TrialOptimizers | StackedAdam
