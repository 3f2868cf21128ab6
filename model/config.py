"""The training configuration: one frozen dataclass, validated once where it is built.

`TrainConfig` is what crosses from `study/` to `model/`. It is plain data — no Optuna
trial, no argparse namespace — so the trainer can be used, tested and benchmarked
alone. Parameter names follow the study's (`n_units_l0`, `activation`, ...), so a JSON
object from the CLI, a preset's defaults and an Optuna trial's params all read the same.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from model.activations import TABLE as ACTIVATION_TABLE
from model.errors import ConfigError

N_INPUTS = 28 * 28
N_CLASSES = 10
N_TRAIN_IMAGES = 60_000
# Far past anything the search space draws (its priors centre near 190 and 40), yet small
# enough that a typo such as 1e11 is refused rather than sent to the allocator.
MAX_UNITS = 8192
# torch.manual_seed takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1
# Adam's and Adamax's steps are about lr in size, so past 10 each step throws the weights
# far past any useful value; and from about 1e38 their float32 arithmetic overflows
# (Adamax raised an error at lr = 1e300). An L2 penalty past 10 likewise only zeroes them.
MAX_LR = 10.0
MAX_WEIGHT_DECAY = 10.0
# A max-norm cap past this leaves every weight the initialisation can draw untouched (a
# unit's 784 incoming weights in ±1/28 have a norm of at most 1), so it only hides typos.
MAX_NORM = 1000.0
# The k fold networks of a trial live side by side in memory, so k is bounded as the
# units are: 100 folds of the report's network hold 400 MB of weights and Adam state;
# 60,000 (leave-one-out) would hold 240 GB.
MAX_FOLDS = 100
# And so is their product: k networks of this many weights and biases in all take 1 GB
# in float32, 4 GB with gradients and Adam's two moments. The report's network on 5 folds
# has 1 M; three layers of 8,192 units on 100 folds would have 13 G.
MAX_STACK_PARAMETERS = 250_000_000
# The trainer books every epoch's curves up front ((max_epochs, 4, k) floats): a typo
# such as 1e12 must be refused, not sent to the allocator. The seed preset runs 2,000.
MAX_EPOCHS = 100_000

ACTIVATIONS = tuple(ACTIVATION_TABLE)
# adam and adamax (L2 penalty added to the gradient) are the report's; adamw decouples
# the penalty from the gradient; sgd is SGD with Nesterov momentum `SGD_MOMENTUM`.
OPTIMIZERS = ("adam", "adamax", "adamw", "sgd")
SGD_MOMENTUM = 0.9
# How the learning rate moves over the `max_epochs` epochs (`model.schedule`): constant
# (the report's), linear warm-up then cosine to zero, or one-cycle.
SCHEDULES = ("constant", "cosine", "one_cycle")
# fp32, tf32 (GPU tensor cores), bf16 (autocast): see model.steps.resolve_precision.
PRECISIONS = ("fp32", "tf32", "bf16")

_UNITS_KEY = re.compile(r"n_units_l(\d+)")


@dataclass(frozen=True)
class TrainConfig:
    """One k-fold cross-validation of one network.

    `hidden` holds the neuron count of each hidden layer (depth = its length).
    `batch_size=None` means full batch: one optimizer step per epoch over a fold's whole
    training part, as the seed report trains. `subset=None` uses all 60,000 training images.
    `fold_seed` fixes the subset and the folds, so every configuration of a study is scored
    on the same folds; `seed` fixes the initial weights, dropout masks and batch order.

    Beyond the report (the `wide` preset): `input_dropout` drops input pixels;
    `max_norm` caps the L2 norm of each unit's incoming weights after every step (None:
    no cap), the dropout paper's companion to dropout; `schedule` shapes the learning rate
    over all `max_epochs` epochs (`warmup`: the fraction of steps cosine's linear warm-up
    takes); `label_smoothing` mixes that much of the uniform distribution into the
    training targets (validation losses stay plain cross-entropy).
    """

    hidden: tuple[int, ...] = (249, 36)
    activation: str = "relu"
    dropout: float = 0.35
    optimizer: str = "adam"
    lr: float = 5.4e-3
    weight_decay: float = 1.2e-4
    input_dropout: float = 0.0
    max_norm: float | None = None
    schedule: str = "constant"
    warmup: float = 0.05
    label_smoothing: float = 0.0
    batch_size: int | None = None
    max_epochs: int = 2000
    patience: int = 50
    k: int = 5
    fold_seed: int = 0
    subset: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.hidden, tuple) or not self.hidden:
            raise ConfigError("hidden: needs at least one hidden layer (n_units_l0)")
        for i, units in enumerate(self.hidden):
            _check_int(f"n_units_l{i}", units, low=1, high=MAX_UNITS)
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"activation = {self.activation!r}: must be one of {', '.join(ACTIVATIONS)}"
            )
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(
                f"optimizer = {self.optimizer!r}: must be one of {', '.join(OPTIMIZERS)}"
            )
        _check_float("dropout", self.dropout, low=0.0, high=1.0, high_open=True)
        _check_float("lr", self.lr, low=0.0, high=MAX_LR, low_open=True)
        _check_float("weight_decay", self.weight_decay, low=0.0, high=MAX_WEIGHT_DECAY)
        _check_float("input_dropout", self.input_dropout, low=0.0, high=1.0, high_open=True)
        if self.max_norm is not None:
            _check_float("max_norm", self.max_norm, low=0.0, high=MAX_NORM, low_open=True)
        if self.schedule not in SCHEDULES:
            raise ConfigError(
                f"schedule = {self.schedule!r}: must be one of {', '.join(SCHEDULES)}"
            )
        _check_float("warmup", self.warmup, low=0.0, high=1.0, high_open=True)
        _check_float("label_smoothing", self.label_smoothing, low=0.0, high=1.0, high_open=True)
        if self.batch_size is not None:
            _check_int("batch_size", self.batch_size, low=1, why="or 0 or null for full batch")
        _check_int("max_epochs", self.max_epochs, low=1, high=MAX_EPOCHS)
        # Past max_epochs patience changes nothing; past int64 torch cannot compare it.
        _check_int("patience", self.patience, low=1, high=MAX_EPOCHS)
        _check_int("k", self.k, low=2, high=MAX_FOLDS)
        _check_int("fold_seed", self.fold_seed, low=0, high=MAX_SEED)
        _check_int("seed", self.seed, low=0, high=MAX_SEED)
        stacked = self.k * parameter_count(self.hidden)
        if stacked > MAX_STACK_PARAMETERS:
            raise ConfigError(
                f"n_units_l0, n_units_l1, ... and k: the k = {self.k} networks of "
                f"{'-'.join(map(str, self.hidden))} hidden units would hold {stacked:,} "
                f"parameters, more than {MAX_STACK_PARAMETERS:,}; use fewer units or folds"
            )
        if self.subset is not None:
            _check_int(
                "subset",
                self.subset,
                low=2 * self.k,
                high=N_TRAIN_IMAGES,
                why=f"at least 2 images for each of the k = {self.k} folds",
            )

    @property
    def full_batch(self) -> bool:
        return self.batch_size is None

    def params(self) -> dict[str, Any]:
        """This configuration in the study's parameter names (the inverse of `with_params`)."""
        out: dict[str, Any] = {"n_layers": len(self.hidden)}
        out.update({f"n_units_l{i}": units for i, units in enumerate(self.hidden)})
        for field in dataclasses.fields(self):
            if field.name != "hidden":
                out[field.name] = getattr(self, field.name)
        return out

    def with_params(self, params: Mapping[str, Any]) -> TrainConfig:
        """A copy with `params` (study names) laid over this configuration.

        `n_units_l{i}` replaces layer i; an index one past the last layer adds a layer,
        so `{"n_units_l2": 20}` over a two-layer default gives three hidden layers.
        `n_layers` then keeps that many layers: `{"n_layers": 1, "n_units_l0": 1024}`
        over a two-layer default gives one hidden layer of 1024 units.
        """
        if not isinstance(params, Mapping):
            raise ConfigError("params: must be a JSON object of parameter names to values")
        hidden = list(self.hidden)
        units: dict[int, Any] = {}
        changes: dict[str, Any] = {}
        n_layers = None
        settable = {f.name for f in dataclasses.fields(self)} - {"hidden"}
        for key, value in params.items():
            match = _UNITS_KEY.fullmatch(str(key))
            if match:
                units[int(match.group(1))] = value
            elif key == "n_layers":
                n_layers = _as_int("n_layers", value)
            elif key in settable:
                changes[key] = value
            else:
                raise ConfigError(
                    f"unknown parameter {key!r}: known are n_units_l0, n_units_l1, ..., "
                    + ", ".join(sorted(settable | {"n_layers"}))
                )
        for index in sorted(units):
            if index < len(hidden):
                hidden[index] = units[index]
            elif index == len(hidden):
                hidden.append(units[index])
            else:
                raise ConfigError(
                    f"n_units_l{index}: layers must be consecutive; "
                    f"the configuration has {len(hidden)} hidden layers, "
                    f"so the next one is n_units_l{len(hidden)}"
                )
        if n_layers is not None:
            if not 1 <= n_layers <= len(hidden):
                raise ConfigError(
                    f"n_layers = {n_layers}: must be in [1, {len(hidden)}], the layers whose "
                    f"units are known; give n_units_l{len(hidden)}, ... for more"
                )
            hidden = hidden[:n_layers]
        for name in ("batch_size", "subset"):
            if name in changes and changes[name] in (0, "full", "all"):
                changes[name] = None
        # 0 or null: no cap, as the off value of the other optional settings reads.
        if "max_norm" in changes and changes["max_norm"] is None:
            pass
        elif "max_norm" in changes and _as_float("max_norm", changes["max_norm"]) == 0:
            changes["max_norm"] = None
        elif "max_norm" in changes:
            changes["max_norm"] = _as_float("max_norm", changes["max_norm"])
        for name in ("max_epochs", "patience", "k", "fold_seed", "seed", "batch_size", "subset"):
            if name in changes:
                changes[name] = _as_int(
                    name, changes[name], null_ok=name in ("batch_size", "subset")
                )
        for name in ("dropout", "lr", "weight_decay", "input_dropout", "warmup", "label_smoothing"):
            if name in changes:
                changes[name] = _as_float(name, changes[name])
        hidden_ints = tuple(_as_int(f"n_units_l{i}", u) for i, u in enumerate(hidden))
        return dataclasses.replace(self, hidden=hidden_ints, **changes)


def parameter_count(hidden: tuple[int, ...]) -> int:
    """Weights and biases of one network with these hidden layers."""
    sizes = [N_INPUTS, *hidden, N_CLASSES]
    return sum((fan_in + 1) * fan_out for fan_in, fan_out in itertools.pairwise(sizes))


def _as_int(name: str, value: Any, *, null_ok: bool = False) -> Any:
    if value is None and null_ok:
        return None
    # (Infinity has no integer to compare with: int() would raise, not refuse.)
    whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if isinstance(value, bool) or not whole:
        accepted = "a whole number" + (" or null" if null_ok else "")
        raise ConfigError(f"{name} = {value!r}: must be {accepted}")
    return int(value)


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{name} = {value!r}: must be a number")
    return float(value)


def _check_int(name: str, value: Any, *, low: int, high: int | None = None, why: str = "") -> None:
    """`why`, if given, follows the accepted range in the message: what it is for."""
    _as_int(name, value)
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ConfigError(
            f"{name} = {value!r}: must be a whole number {bound}" + (f", {why}" if why else "")
        )


def _check_float(
    name: str,
    value: Any,
    *,
    low: float,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    _as_float(name, value)
    too_low = value <= low if low_open else value < low
    too_high = high is not None and (value >= high if high_open else value > high)
    if not math.isfinite(value) or too_low or too_high:
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        bound = (
            f"in {left}{low}, {high}{right}"
            if high is not None
            else f"{'>' if low_open else '>='} {low}"
        )
        raise ConfigError(f"{name} = {value!r}: must be a number {bound}")
