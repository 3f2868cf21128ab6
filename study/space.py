"""The search space: its parameters, their Optuna distributions, the neuron-count priors,
and `suggest`, which turns an Optuna trial into the core's `TrainConfig`.

The seed report draws the neurons of hidden layer n (1-based) of L from a Gaussian whose
mean keeps a constant compression rate between 784 inputs and 10 outputs:
μ_n = 784 · r^(n/(L+1)) and σ_n = 784 · r^(n/L), with r = 10/784. For L = 2 that is
μ = (183.18, 42.80), σ = (88.54, 10.00). A draw is rounded and redrawn until it lies in
[units_low, units_high]. Everything else is drawn plainly: dropout uniform, learning rate
and L2 penalty log-uniform, activation and optimizer uniformly among their choices.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from model.config import N_CLASSES, N_INPUTS, TrainConfig

if TYPE_CHECKING:
    import optuna
    from optuna.distributions import BaseDistribution


@dataclass(frozen=True)
class GaussianPrior:
    """round(N(mu, sigma)), redrawn until inside the parameter's [low, high]."""

    mu: float
    sigma: float

    def truncated_moments(self, low: int, high: int) -> tuple[float, float]:
        """Exact mean and standard deviation of the rounded, truncated draw.

        Truncation moves the mean: layer 1's prior (183 ± 89) loses its left tail below 1.
        """
        weights = [self.bin_mass(n) for n in range(low, high + 1)]
        total = sum(weights)
        mean = sum(n * w for n, w in zip(range(low, high + 1), weights, strict=True)) / total
        var = sum((n - mean) ** 2 * w for n, w in zip(range(low, high + 1), weights, strict=True))
        return mean, math.sqrt(var / total)

    def bin_mass(self, n: int) -> float:
        """P(round(X) = n) for X ~ N(mu, sigma)."""
        lo = (n - 0.5 - self.mu) / (self.sigma * math.sqrt(2))
        hi = (n + 0.5 - self.mu) / (self.sigma * math.sqrt(2))
        return 0.5 * (math.erf(hi) - math.erf(lo))


def compression_priors(n_layers: int) -> list[GaussianPrior]:
    """The report's priors for each of `n_layers` hidden layers."""
    r = N_CLASSES / N_INPUTS
    return [
        GaussianPrior(mu=N_INPUTS * r ** (n / (n_layers + 1)), sigma=N_INPUTS * r ** (n / n_layers))
        for n in range(1, n_layers + 1)
    ]


@dataclass(frozen=True)
class PriorMoments:
    """What a parameter's prior is, and the mean and standard deviation of its draws."""

    kind: str
    mean: float
    sd: float


@dataclass(frozen=True)
class SearchSpace:
    """What a study searches; the preset's `TrainConfig` supplies everything else."""

    n_layers: int = 2
    units_low: int = 1
    units_high: int = N_INPUTS
    # The report's three, named here: an activation added to the model is not searched.
    activations: tuple[str, ...] = ("relu", "leaky_relu", "hardswish")
    # The report's two, likewise: adamw and sgd, added for the wide preset, are searched
    # only where a preset names them.
    optimizers: tuple[str, ...] = ("adam", "adamax")
    dropout: tuple[float, float] = (0.3, 0.5)
    lr: tuple[float, float] = (1e-4, 1e-2)
    weight_decay: tuple[float, float] = (1e-5, 1e-3)

    def distributions(self) -> dict[str, BaseDistribution]:
        from optuna.distributions import (
            CategoricalDistribution,
            FloatDistribution,
            IntDistribution,
        )

        units = {
            f"n_units_l{i}": IntDistribution(self.units_low, self.units_high)
            for i in range(self.n_layers)
        }
        return {
            **units,
            "activation": CategoricalDistribution(self.activations),
            "optimizer": CategoricalDistribution(self.optimizers),
            "dropout": FloatDistribution(*self.dropout),
            "lr": FloatDistribution(*self.lr, log=True),
            "weight_decay": FloatDistribution(*self.weight_decay, log=True),
        }

    def priors(self) -> dict[str, GaussianPrior]:
        """The Gaussian prior of each neuron-count parameter, by name."""
        return {f"n_units_l{i}": prior for i, prior in enumerate(compression_priors(self.n_layers))}

    def suggest(self, trial: optuna.trial.BaseTrial, defaults: TrainConfig) -> TrainConfig:
        """Ask `trial` for every parameter and lay them over `defaults`."""
        params = {name: _suggest(trial, name, d) for name, d in self.distributions().items()}
        return self.configure(params, defaults)

    def configure(self, params: dict[str, Any], defaults: TrainConfig) -> TrainConfig:
        """The configuration a trial with these `params` trained: how a finished trial is
        rebuilt without Optuna's trial object."""
        return _with_hidden(defaults, self.n_layers).with_params(params)

    def prior_moments(self) -> dict[str, PriorMoments]:
        """Each numeric parameter's prior, with the mean and standard deviation of a draw."""
        priors = self.priors()
        out = {}
        for name, distribution in self.distributions().items():
            if not hasattr(distribution, "low"):
                continue
            low, high = distribution.low, distribution.high
            if name in priors:
                prior = priors[name]
                mean, sd = prior.truncated_moments(low, high)
                kind = f"N({prior.mu:.2f}, {prior.sigma:.2f}) rounded, in [{low}, {high}]"
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
        for name, distribution in self.distributions().items():
            entry: dict[str, Any] = {"distribution": type(distribution).__name__}
            entry.update({k: v for k, v in vars(distribution).items() if not k.startswith("_")})
            if "choices" in entry:
                entry["choices"] = list(entry["choices"])
            if name in priors:
                prior = priors[name]
                mean, sd = prior.truncated_moments(self.units_low, self.units_high)
                entry["prior"] = {
                    "kind": "gaussian, rounded, redrawn until in [low, high]",
                    "mu": round(prior.mu, 4),
                    "sigma": round(prior.sigma, 4),
                    "truncated_mean": round(mean, 4),
                    "truncated_sd": round(sd, 4),
                }
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
