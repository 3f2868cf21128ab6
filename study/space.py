"""The search space: its parameters, their Optuna distributions, the neuron-count priors,
and `suggest`, which turns an Optuna trial into the core's `TrainConfig`.

The seed report draws the neurons of hidden layer n (1-based) of L from a Gaussian whose
mean keeps a constant compression rate between 784 inputs and 10 outputs:
μ_n = 784 · r^(n/(L+1)) and σ_n = 784 · r^(n/L), with r = 10/784. For L = 2 that is
μ = (183.18, 42.80), σ = (88.54, 10.00). A draw is rounded and redrawn until it lies in
[units_low, units_high]. Everything else is drawn plainly: dropout uniform, learning rate
and L2 penalty log-uniform, activation and optimizer uniformly among their choices.

A space may also search its depth and the settings beyond the report (the `wide`
preset). Some parameters then exist only in some trials — a layer's units only below the
drawn depth, the max-norm cap only when it is on, SGD's own learning rate only for SGD —
and each such parameter names the earlier one it depends on (`Condition`). Optuna's
conditional spaces work this way: a trial simply never asks for a parameter it lacks.

A study file may also give a parameter a W&B distribution of its own (`own`): each
layer's units by the layer's name, with a prior of its choosing (a `q_normal` of its own
mu and sigma, a `q_log_normal`, ...), or a continuous parameter drawn from a normal,
a log-normal or a grid (`study.distributions`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model.config import N_CLASSES, N_INPUTS, TrainConfig
from study.priors import GaussianPrior, Prior, moments

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution

    from study.distributions import Drawn

__all__ = ["Condition", "GaussianPrior", "PriorMoments", "SearchSpace", "compression_priors"]


def compression_priors(n_layers: int, r: float = N_CLASSES / N_INPUTS) -> list[GaussianPrior]:
    """The report's priors for each of `n_layers` hidden layers, at compression rate `r`
    (the report's: outputs over inputs)."""
    return [
        GaussianPrior(mu=N_INPUTS * r ** (n / (n_layers + 1)), sigma=N_INPUTS * r ** (n / n_layers))
        for n in range(1, n_layers + 1)
    ]


@dataclass(frozen=True)
class Condition:
    """A parameter asked for only when the earlier parameter `parent` took one of `values`."""

    parent: str
    values: tuple[Any, ...]

    def holds(self, drawn: Mapping[str, Any]) -> bool:
        return self.parent in drawn and drawn[self.parent] in self.values

    def describe(self) -> dict[str, Any]:
        return {"parent": self.parent, "values": list(self.values)}

    def text(self) -> str:
        if len(self.values) == 1:
            return f"{self.parent} = {self.values[0]}"
        return f"{self.parent} in {{{', '.join(map(str, self.values))}}}"


@dataclass(frozen=True)
class PriorMoments:
    """What a parameter's prior is, and the mean and standard deviation of its draws."""

    kind: str
    mean: float
    sd: float


@dataclass(frozen=True)
class SearchSpace:
    """What a study searches; the preset's `TrainConfig` supplies everything else.

    The defaults are the seed report's space: two hidden layers on the compression priors,
    and the report's five other parameters. Every field past `weight_decay` is off by
    default (None or empty: not searched, the preset's setting stands), so the report's
    space, its parameter names and so its seeded draws stay as they were.
    """

    # The depth: fixed at `n_layers`, or with `min_layers` searched as the parameter
    # `n_layers` in [min_layers, n_layers], layer i's units asked only below the depth.
    n_layers: int = 2
    min_layers: int | None = None
    units_low: int = 1
    units_high: int = N_INPUTS
    # Log-uniform widths instead of the compression priors: the priors shrink every
    # layer towards the 10 outputs, the opposite of what a search for wide layers wants.
    units_log: bool = False
    # The compression priors' rate (the report's: 10 outputs over 784 inputs).
    compression_r: float = N_CLASSES / N_INPUTS
    # The report's three and two, named here: an activation or optimizer added to the
    # model is not searched until a space names it. Empty (or None, below): not searched,
    # the preset's setting stands.
    activations: tuple[str, ...] = ("relu", "leaky_relu", "hardswish")
    optimizers: tuple[str, ...] = ("adam", "adamax")
    dropout: tuple[float, float] | None = (0.3, 0.5)
    lr: tuple[float, float] | None = (1e-4, 1e-2)
    weight_decay: tuple[float, float] | None = (1e-5, 1e-3)
    # SGD's steps are lr times the gradient, not about lr as Adam's are, so it wants
    # larger rates: with this range set, an SGD trial draws `sgd_lr` instead of `lr`.
    sgd_lr: tuple[float, float] | None = None
    input_dropout: tuple[float, float] | None = None
    # Searched as `use_max_norm` (on or off), then `max_norm` in this range when on.
    max_norm: tuple[float, float] | None = None
    schedules: tuple[str, ...] = ()
    batch_sizes: tuple[int, ...] = ()
    label_smoothing: tuple[float, float] | None = None
    # Parameters that the study file gives a distribution of their own
    # (`study.distributions`): a layer's units by the layer's name, or a continuous
    # parameter drawn otherwise than its field above says (a normal dropout, a uniform lr).
    # Each replaces what the fields would search for it; a continuous one's field still
    # says that it is searched, and in which range. Empty for every shipped preset, so
    # their spaces, and so their draws, stay as they were.
    own: tuple[tuple[str, Drawn], ...] = ()
    # Layers whose width the file fixes (`value`), by index: never asked for, set in
    # every trial deep enough to have them.
    fixed_units: tuple[tuple[int, int], ...] = ()

    def __post_init__(self) -> None:
        if self.min_layers is not None and not 1 <= self.min_layers <= self.n_layers:
            raise ValueError(
                f"min_layers = {self.min_layers}: must be in [1, n_layers = {self.n_layers}]"
            )
        if self.sgd_lr is not None and "sgd" not in self.optimizers:
            raise ValueError("sgd_lr: only a space that searches sgd can give it a range")

    def distributions(self) -> dict[str, BaseDistribution]:
        """Every parameter a trial may ask for, in the order a trial asks; a conditional
        one (see `conditions`) is asked only when its condition holds."""
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        out: dict[str, BaseDistribution] = {}
        own = {name: drawn.distribution for name, drawn in self.own}
        fixed = dict(self.fixed_units)

        def ranged(name: str, bounds: tuple[float, float], log: bool = False) -> None:
            out[name] = own[name] if name in own else FloatDistribution(*bounds, log=log)

        if self.min_layers is not None:
            out["n_layers"] = IntDistribution(self.min_layers, self.n_layers)
        for i in range(self.n_layers):
            name = f"n_units_l{i}"
            if i not in fixed:
                shorthand = IntDistribution(self.units_low, self.units_high, log=self.units_log)
                out[name] = own.get(name, shorthand)
        if self.activations:
            out["activation"] = CategoricalDistribution(self.activations)
        if self.optimizers:
            out["optimizer"] = CategoricalDistribution(self.optimizers)
        if self.dropout is not None:
            ranged("dropout", self.dropout)
        if self.input_dropout is not None:
            ranged("input_dropout", self.input_dropout)
        if self.max_norm is not None:
            out["use_max_norm"] = CategoricalDistribution((False, True))
            ranged("max_norm", self.max_norm)
        if self.lr is not None:
            ranged("lr", self.lr, log=True)
        if self.sgd_lr is not None:
            ranged("sgd_lr", self.sgd_lr, log=True)
        if self.weight_decay is not None:
            ranged("weight_decay", self.weight_decay, log=True)
        if self.schedules:
            out["schedule"] = CategoricalDistribution(self.schedules)
        if self.batch_sizes:
            out["batch_size"] = CategoricalDistribution(self.batch_sizes)
        if self.label_smoothing is not None:
            ranged("label_smoothing", self.label_smoothing)
        return out

    def conditions(self) -> dict[str, Condition]:
        """The parameters a trial asks for only sometimes, each with when it does."""
        out: dict[str, Condition] = {}
        if self.min_layers is not None:
            for i in range(self.min_layers, self.n_layers):
                out[f"n_units_l{i}"] = Condition("n_layers", tuple(range(i + 1, self.n_layers + 1)))
        if self.max_norm is not None:
            out["max_norm"] = Condition("use_max_norm", (True,))
        if self.sgd_lr is not None and self.lr is not None:
            out["lr"] = Condition("optimizer", tuple(o for o in self.optimizers if o != "sgd"))
            out["sgd_lr"] = Condition("optimizer", ("sgd",))
        return out

    def priors(self) -> dict[str, Prior]:
        """Each parameter's prior, by name, for the prior sampler: the compression rule's
        Gaussian on each layer that [parameters.units] gives (none for log-uniform
        widths), and the prior of each parameter with a distribution of its own that
        Optuna's random sampler would not draw as it is."""
        own = dict(self.own)
        fixed = dict(self.fixed_units)
        out: dict[str, Prior] = {}
        if not self.units_log:
            for i, prior in enumerate(compression_priors(self.n_layers, self.compression_r)):
                if f"n_units_l{i}" not in own and i not in fixed:
                    out[f"n_units_l{i}"] = prior
        out.update({name: drawn.prior for name, drawn in own.items() if drawn.prior})
        return out

    def widest(self) -> tuple[int, ...]:
        """The widest each layer can be drawn."""
        own = dict(self.own)
        fixed = dict(self.fixed_units)
        return tuple(
            fixed[i] if i in fixed
            else int(own[f"n_units_l{i}"].distribution.high) if f"n_units_l{i}" in own
            else self.units_high
            for i in range(self.n_layers)
        )  # fmt: skip

    def suggest(self, trial: optuna.trial.BaseTrial, defaults: TrainConfig) -> TrainConfig:
        """Ask `trial` for every parameter its earlier answers call for, and lay them over
        `defaults`."""
        conditions = self.conditions()
        params: dict[str, Any] = {}
        for name, distribution in self.distributions().items():
            condition = conditions.get(name)
            if condition is None or condition.holds(params):
                params[name] = _suggest(trial, name, distribution)
        return self.configure(params, defaults)

    def configure(self, params: Mapping[str, Any], defaults: TrainConfig) -> TrainConfig:
        """The configuration a trial with these `params` trained: how a finished trial is
        rebuilt without Optuna's trial object."""
        settings = dict(params)
        # The space's own names for settings the configuration holds otherwise.
        if settings.pop("use_max_norm", True) is False:
            settings["max_norm"] = None
        if "sgd_lr" in settings:
            settings["lr"] = settings.pop("sgd_lr")
        depth = settings.get("n_layers", self.n_layers)
        for i, units in self.fixed_units:
            if i < depth:
                settings.setdefault(f"n_units_l{i}", units)
        return _with_hidden(defaults, depth).with_params(settings)

    def prior_moments(self) -> dict[str, PriorMoments]:
        """Each numeric parameter's prior, with the mean and standard deviation of a draw
        (of a conditional parameter: of a draw in the trials that ask for it)."""
        priors = self.priors()
        own = dict(self.own)
        out = {}
        for name, distribution in self.distributions().items():
            if not hasattr(distribution, "low"):
                continue
            low, high = distribution.low, distribution.high
            drawn = own.get(name)
            if drawn is not None and drawn.prior is not None:
                mean, sd = moments(drawn.prior, distribution)
                kind = drawn.text()
            elif name in priors:
                prior = priors[name]
                assert isinstance(prior, GaussianPrior)  # the compression rule's
                mean, sd = prior.truncated_moments(low, high)
                kind = f"N({prior.mu:.2f}, {prior.sigma:.2f}) rounded, in [{low}, {high}]"
            elif _is_int(distribution):
                mean, sd = _discrete_moments(int_masses(low, high, log=distribution.log))
                scale = "log-uniform" if distribution.log else "uniform"
                kind = f"{scale} integers [{low}, {high}]"
            elif distribution.log:
                # X = exp(U), U uniform on [ln low, ln high]: E[X] and E[X²] by integration.
                log_width = math.log(high / low)
                mean = (high - low) / log_width
                sd = math.sqrt((high**2 - low**2) / (2 * log_width) - mean**2)
                kind = f"log-uniform [{low:g}, {high:g}]"
            else:
                mean, sd = (low + high) / 2, (high - low) / 12**0.5
                kind = f"uniform [{low:g}, {high:g}]"
            out[name] = PriorMoments(kind, mean, sd)
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-ready description (stored in the study's user attributes)."""
        out: dict[str, Any] = {}
        priors = self.priors()
        own = dict(self.own)
        conditions = self.conditions()
        for name, distribution in self.distributions().items():
            entry: dict[str, Any] = {"distribution": type(distribution).__name__}
            entry.update({k: v for k, v in vars(distribution).items() if not k.startswith("_")})
            if "choices" in entry:
                entry["choices"] = list(entry["choices"])
            drawn = own.get(name)
            if drawn is not None:
                entry["given"] = drawn.given
            if drawn is not None and drawn.prior is not None:
                mean, sd = moments(drawn.prior, distribution)  # type: ignore[arg-type]
                entry["prior"] = {**drawn.prior.describe(), "kind": drawn.text(),
                                  "mean": mean, "sd": sd}  # fmt: skip
            elif name in priors:
                prior = priors[name]
                assert isinstance(prior, GaussianPrior)  # the compression rule's
                mean, sd = prior.truncated_moments(self.units_low, self.units_high)
                entry["prior"] = {
                    "kind": "gaussian, rounded, redrawn until in [low, high]",
                    "mu": round(prior.mu, 4),
                    "sigma": round(prior.sigma, 4),
                    "truncated_mean": round(mean, 4),
                    "truncated_sd": round(sd, 4),
                }
            if name in conditions:
                entry["only_when"] = conditions[name].describe()
            out[name] = entry
        return out


def _suggest(trial: optuna.trial.BaseTrial, name: str, distribution: BaseDistribution) -> Any:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, step=distribution.step, log=distribution.log
        )
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, distribution.choices)
    raise TypeError(f"{name}: no suggest for {type(distribution).__name__}")


def _with_hidden(defaults: TrainConfig, n_layers: int) -> TrainConfig:
    """`defaults` with exactly `n_layers` hidden layers, so the trial's units fill them all."""
    hidden = (defaults.hidden + (1,) * n_layers)[:n_layers]
    return dataclasses.replace(defaults, hidden=hidden)


def _is_int(distribution: BaseDistribution) -> bool:
    from optuna.distributions import IntDistribution

    return isinstance(distribution, IntDistribution)


def int_masses(low: int, high: int, *, log: bool) -> dict[int, float]:
    """P(n) for each integer of [low, high] as Optuna's random sampling draws it: uniform,
    or (log) a log-uniform draw on [low − 0.5, high + 0.5] rounded to the nearest integer."""
    if not log:
        return {n: 1 / (high - low + 1) for n in range(low, high + 1)}
    total = math.log((high + 0.5) / (low - 0.5))
    return {n: math.log((n + 0.5) / (n - 0.5)) / total for n in range(low, high + 1)}


def _discrete_moments(masses: Mapping[int, float]) -> tuple[float, float]:
    mean = sum(n * p for n, p in masses.items())
    return mean, math.sqrt(sum((n - mean) ** 2 * p for n, p in masses.items()))
