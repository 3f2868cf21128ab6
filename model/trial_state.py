"""A trial's training state at the end of an epoch, taken out of one stack and put into
another: what a checkpoint holds, so that an interrupted trial resumes where it stopped
(`study.checkpoints` stores it).

Its own file because the epoch loop (`model.kfold`) only asks for a snapshot now and then
and starts some trials from one; where each piece of a trial's state lives in a stack —
the stacked weights, early stopping's bookkeeping (`FoldState`), the optimizer's moments,
the random stream — is what this file knows. It reads them from any `Training` (the
trainer's stack, its bookkeeping, optimizer and streams), not from the trainer itself.

A snapshot holds, for the trial's k networks at its own widths: the weights; early
stopping's best weights, best figures, patience counts and stop epochs; the learning
curves so far; the optimizer's moments and step count; and the state of the trial's random
stream. Put back into a stack of the same trials it continues exactly as if never
stopped; into another stack, up to the order of floating-point sums, as any stacking is
(`train_trials`). The layout of a snapshot is the trial's own parameters, which is also
what the padded stacks before the fused first layer cut theirs to: their checkpoints
resume.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from model.config import TrainConfig
from model.early_stopping import CURVES, PER_NETWORK, FoldState
from model.network import StackedFFNN
from model.optimizers import Optimizer, TrialOptimizers
from model.steps import TrialStreams


class Training(Protocol):
    """Where a stack's trials keep their state as they train (`model.kfold`'s trainer)."""

    model: StackedFFNN
    state: FoldState
    optimizer: Optimizer
    streams: TrialStreams


# Raised whenever the layout below changes: a checkpoint of another layout is not read.
SNAPSHOT_FORMAT = 1


# torch's names for each rule's buffers, in the order a snapshot keeps them: the first
# moment, then Adam's second moment or Adamax's infinity norm (`StackedAdam`'s `first`
# and `second` are the same quantities, so a snapshot taken under one resumes under the
# other).
TORCH_BUFFERS = {
    "adam": ("exp_avg", "exp_avg_sq"),
    "adamw": ("exp_avg", "exp_avg_sq"),
    "adamax": ("exp_avg", "exp_inf"),
    "sgd": ("momentum_buffer",),
}


class SnapshotError(ValueError):
    """A snapshot that this trainer cannot resume. Its text, a one-line reason, follows
    the snapshot's name: "the checkpoint … was written for another configuration (lr)"."""


@dataclass
class TrialSnapshot:
    """One trial's training state after `epoch` epochs (CPU tensors)."""

    config: dict[str, Any]
    """`TrainConfig.params()` of the trial it was taken from."""
    device: str
    """The device type it trained on: a random stream continues on the same kind only."""
    epoch: int
    seconds: float
    """Training time up to here, earlier resumptions included."""
    weights: list[torch.Tensor]
    best_weights: list[torch.Tensor]
    folds: dict[str, torch.Tensor]
    curves: torch.Tensor
    """(epoch, len(CURVES), k)."""
    moments: list[list[torch.Tensor]]
    """Per parameter, the optimizer's buffers in `TORCH_BUFFERS` order."""
    optimizer_steps: int
    generator: torch.Tensor

    def payload(self) -> dict[str, Any]:
        """Plain values and tensors only, so that `torch.load(weights_only=True)` reads it."""
        return {"format": SNAPSHOT_FORMAT, **self.__dict__}

    @classmethod
    def from_payload(cls, payload: object) -> TrialSnapshot:
        if not isinstance(payload, dict) or "format" not in payload:
            raise SnapshotError("is not a trial checkpoint")
        if payload["format"] != SNAPSHOT_FORMAT:
            raise SnapshotError(
                f"is of format {payload['format']!r} and this version reads {SNAPSHOT_FORMAT}"
            )
        fields = {name: value for name, value in payload.items() if name != "format"}
        try:
            return cls(**fields)
        except TypeError as exc:
            raise SnapshotError(f"lacks part of a trial's state ({exc})") from None

    def check_resumes(self, config: TrainConfig, device: torch.device) -> None:
        """Raise `SnapshotError` unless this snapshot can go on as `config` on `device`."""
        if self.config != config.params():
            changed = sorted(
                name
                for name in set(self.config) | set(config.params())
                if self.config.get(name) != config.params().get(name)
            )
            raise SnapshotError(f"was written for another configuration ({', '.join(changed)})")
        if self.device != device.type:
            raise SnapshotError(
                f"was trained on {self.device} and this worker trains on {device.type}, "
                "whose random streams differ"
            )
        if not 0 < self.epoch < config.max_epochs:
            raise SnapshotError(f"has epoch {self.epoch}, outside 1..{config.max_epochs - 1}")
        k = config.k
        own = own_shapes(config)
        laid_out = [list(t.shape) for t in self.weights] == [list(s) for s in own] and [
            list(t.shape) for t in self.best_weights
        ] == [list(s) for s in own]
        if not laid_out or list(self.curves.shape) != [self.epoch, len(CURVES), k]:
            raise SnapshotError("does not have the configuration's shapes")


def own_shapes(config: TrainConfig) -> list[tuple[int, int, int]]:
    """The shapes of one trial's stacked parameters at its own widths, in the order of
    `StackedFFNN.trial_params`: every weight (k, fan_in, fan_out), then every bias
    (k, 1, fan_out)."""
    sizes = [784, *config.hidden, 10]
    weights = [(config.k, fan_in, fan_out) for fan_in, fan_out in itertools.pairwise(sizes)]
    return weights + [(config.k, 1, fan_out) for fan_out in sizes[1:]]


def take_snapshot(
    training: Training, position: int, config: TrainConfig, seconds: float
) -> TrialSnapshot:
    """The state of the trial at `position` in `training`'s stack, after its last epoch."""
    model, state, optimizer = training.model, training.state, training.optimizer
    nets = model.trial(position)

    def copy(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        return [t.detach().cpu().clone() for t in tensors]

    if isinstance(optimizer, TrialOptimizers):
        names = TORCH_BUFFERS[config.optimizer]
        moments = [copy([own[name] for name in names]) for own in optimizer.state_of(position)]
        steps = optimizer.steps_done
    else:
        moments = [
            copy([first, second])
            for first, second in zip(
                model.views(optimizer.first, position),
                model.views(optimizer.second, position),
                strict=True,
            )
        ]
        steps = int(optimizer.step_count.item())
    epoch = state.epochs_done
    return TrialSnapshot(
        config=config.params(),
        device=model.flat.device.type,
        epoch=epoch,
        seconds=seconds,
        weights=copy(model.trial_params(position)),
        best_weights=copy(model.views(state.best, position)),
        folds={name: getattr(state, name)[nets].cpu().clone() for name in PER_NETWORK},
        curves=state.curves[:epoch, :, nets].cpu().clone(),
        moments=moments,
        optimizer_steps=steps,
        generator=training.streams.generators[position].get_state(),
    )


def restore_snapshot(
    training: Training, position: int, config: TrainConfig, snapshot: TrialSnapshot
) -> None:
    """Put `snapshot` into the trial at `position` of `training`'s freshly built stack.

    The caller has checked it (`check_resumes`) and that every trial it resumes in this
    stack stopped at the same epoch: the stack shares one epoch count."""
    model, state = training.model, training.state
    nets = model.trial(position)
    flat = model.flat

    def put(into: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        for tensor, value in zip(into, values, strict=True):
            tensor.copy_(value.to(flat.device, flat.dtype))

    with torch.no_grad():
        put(model.trial_params(position), snapshot.weights)
        put(model.views(state.best, position), snapshot.best_weights)
        for name in PER_NETWORK:
            getattr(state, name)[nets] = snapshot.folds[name].to(flat.device)
        state.curves[: snapshot.epoch, :, nets] = snapshot.curves.to(flat.device, flat.dtype)
        state.epoch.fill_(snapshot.epoch)
    state.epochs_done = snapshot.epoch
    optimizer = training.optimizer
    if isinstance(optimizer, TrialOptimizers):
        _restore_torch_optimizer(optimizer, position, config, snapshot)
    else:
        with torch.no_grad():
            for first, second, (first_value, second_value) in zip(
                model.views(optimizer.first, position),
                model.views(optimizer.second, position),
                snapshot.moments,
                strict=True,
            ):
                put([first, second], [first_value, second_value])
            optimizer.step_count.fill_(snapshot.optimizer_steps)
    training.streams.generators[position].set_state(snapshot.generator)


def _restore_torch_optimizer(
    optimizer: TrialOptimizers, position: int, config: TrainConfig, snapshot: TrialSnapshot
) -> None:
    torch_optimizer = optimizer.optimizers[position]
    params = optimizer.model.trial_params(position)
    names = TORCH_BUFFERS[config.optimizer]
    # torch keeps the step count in the default float type, except fused and capturable
    # optimizers, where `load_state_dict` moves it to the parameter's device as float32.
    scalar = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    state: dict[int, dict[str, torch.Tensor]] = {}
    for i, (param, buffers) in enumerate(zip(params, snapshot.moments, strict=True)):
        # SGD keeps no step count of its own.
        steps = torch.tensor(float(snapshot.optimizer_steps), dtype=scalar)
        entry = {} if config.optimizer == "sgd" else {"step": steps}
        for name, value in zip(names, buffers, strict=True):
            entry[name] = value.to(param.device, param.dtype).clone()
        state[i] = entry
    saved = torch_optimizer.state_dict()
    torch_optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})
    optimizer.steps_done = snapshot.optimizer_steps
