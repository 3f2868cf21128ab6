"""The priors the prior sampler draws from, beside what Optuna's random sampler draws.

A prior is a continuous distribution. A parameter's draw is taken from it, put on the
parameter's grid (the Optuna distribution's `step`: W&B's `q`, round(x / q) · q) and
redrawn until it lies in the parameter's [low, high]:
- `GaussianPrior`, N(mu, sigma): W&B's `normal` and `q_normal`, and the report's
  compression priors on the neuron counts;
- `LogNormalPrior`, exp(N(mu, sigma)), mu and sigma of the log: `log_normal` and
  `q_log_normal`;
- `UniformPrior`, U(low, high): `q_uniform`, whose end values are half as likely as the
  others (a plain `uniform` or `int_uniform` Optuna's random sampler draws as it is).

`mass_inside` is the share of a prior that a parameter's range keeps (a range that keeps
almost none is refused: its draws could not land there), and `moments` the mean and
standard deviation of its draws: over the grid from the prior's CDF, and by integration
for a continuous range.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    from optuna.distributions import FloatDistribution, IntDistribution

# Beyond this many standard deviations a normal holds under 1e-32 of its mass: the
# moments leave it out.
_TAILS = 12.0
# A grid with more points than this in a prior's support is as fine as the draw itself
# (its step under 1/800 of the prior's width, so rounding moves the variance by under
# 1e-7 of itself): its moments are those of the continuous draw over the grid's cells.
_MAX_GRID = 20_000
# Simpson's rule on this many points integrates a log-normal over at most 2 · `_TAILS`
# of its log's sds to about 1e-9 of its moments.
_SIMPSON_POINTS = 20_001


def _phi(z: float) -> float:
    return math.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)


def _standard_mass(a: float, b: float) -> float:
    """P(a ≤ Z ≤ b) for Z ~ N(0, 1), through erfc so that a tail far out keeps its digits."""
    if a > 0:
        return 0.5 * (math.erfc(a / math.sqrt(2)) - math.erfc(b / math.sqrt(2)))
    return 0.5 * (math.erfc(-b / math.sqrt(2)) - math.erfc(-a / math.sqrt(2)))


@dataclass(frozen=True)
class GaussianPrior:
    """N(mu, sigma): rounded onto the parameter's grid, redrawn until inside its range."""

    mu: float
    sigma: float

    def raw(self, rng: np.random.Generator) -> float:
        return rng.normal(self.mu, self.sigma)

    def mass(self, low: float, high: float) -> float:
        return _standard_mass((low - self.mu) / self.sigma, (high - self.mu) / self.sigma)

    def support(self) -> tuple[float, float]:
        return self.mu - _TAILS * self.sigma, self.mu + _TAILS * self.sigma

    def continuous_moments(self, low: float, high: float) -> tuple[float, float]:
        """Mean and sd of the normal truncated to [low, high] (the closed form)."""
        a, b = (low - self.mu) / self.sigma, (high - self.mu) / self.sigma
        a, b = max(a, -_TAILS), min(b, _TAILS)
        z = _standard_mass(a, b)
        pa, pb = _phi(a), _phi(b)
        mean = self.mu + self.sigma * (pa - pb) / z
        var = self.sigma**2 * (1 + (a * pa - b * pb) / z - ((pa - pb) / z) ** 2)
        return mean, math.sqrt(max(var, 0.0))

    def text(self) -> str:
        return f"N({self.mu:g}, {self.sigma:g})"

    def describe(self) -> dict[str, Any]:
        return {"distribution": "normal", "mu": self.mu, "sigma": self.sigma}

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


@dataclass(frozen=True)
class LogNormalPrior:
    """exp(N(mu, sigma)), mu and sigma those of the log, as W&B's `log_normal`."""

    mu: float
    sigma: float

    def raw(self, rng: np.random.Generator) -> float:
        # Past e^709 a float overflows; every range here ends far below it, so such a
        # draw is redrawn either way.
        return math.exp(min(rng.normal(self.mu, self.sigma), 709.0))

    def mass(self, low: float, high: float) -> float:
        if high <= 0:
            return 0.0
        a = -math.inf if low <= 0 else (math.log(low) - self.mu) / self.sigma
        return _standard_mass(a, (math.log(high) - self.mu) / self.sigma)

    def support(self) -> tuple[float, float]:
        return (
            math.exp(max(self.mu - _TAILS * self.sigma, -745.0)),
            math.exp(min(self.mu + _TAILS * self.sigma, 709.0)),
        )

    def continuous_moments(self, low: float, high: float) -> tuple[float, float]:
        """Mean and sd of the log-normal truncated to [low, high], by Simpson's rule in
        the log, where the density is a smooth bell (the closed form overflows for a wide
        sigma long before the truncated moments do)."""
        import numpy as np

        y_low, y_high = self.mu - _TAILS * self.sigma, self.mu + _TAILS * self.sigma
        if low > 0:
            y_low = max(y_low, math.log(low))
        y_high = min(y_high, math.log(high))
        y = np.linspace(y_low, y_high, _SIMPSON_POINTS)
        weights = np.ones(_SIMPSON_POINTS)
        weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
        density = weights * np.exp(-0.5 * ((y - self.mu) / self.sigma) ** 2)
        x = np.exp(y)
        total = float(density.sum())
        mean = float((density * x).sum()) / total
        var = float((density * (x - mean) ** 2).sum()) / total
        return mean, math.sqrt(var)

    def text(self) -> str:
        return f"exp(N({self.mu:g}, {self.sigma:g}))"

    def describe(self) -> dict[str, Any]:
        return {"distribution": "log_normal", "mu": self.mu, "sigma": self.sigma}


@dataclass(frozen=True)
class UniformPrior:
    """U(low, high), before its grid: W&B's `q_uniform`."""

    low: float
    high: float

    def raw(self, rng: np.random.Generator) -> float:
        return rng.uniform(self.low, self.high)

    def mass(self, low: float, high: float) -> float:
        if self.high == self.low:
            return 1.0 if low <= self.low <= high else 0.0
        inside = min(high, self.high) - max(low, self.low)
        return max(inside, 0.0) / (self.high - self.low)

    def support(self) -> tuple[float, float]:
        return self.low, self.high

    def continuous_moments(self, low: float, high: float) -> tuple[float, float]:
        a, b = max(low, self.low), min(high, self.high)
        return (a + b) / 2, (b - a) / math.sqrt(12)

    def text(self) -> str:
        return f"U({self.low:g}, {self.high:g})"

    def describe(self) -> dict[str, Any]:
        return {"distribution": "uniform", "min": self.low, "max": self.high}


Prior = GaussianPrior | LogNormalPrior | UniformPrior


def mass_inside(prior: Prior, distribution: IntDistribution | FloatDistribution) -> float:
    """The share of the prior's draws that land in the distribution's range, on its grid
    (each grid value takes the draws that round to it)."""
    low, high, step = distribution.low, distribution.high, distribution.step
    if step is None:
        return prior.mass(low, high)
    return prior.mass(low - step / 2, high + step / 2)


def grid_masses(
    prior: Prior, distribution: IntDistribution | FloatDistribution
) -> dict[float, float] | None:
    """P(value) for each grid value of the distribution that the prior reaches, as the
    sampler draws (rounded, redrawn until inside); None for a continuous range, or a grid
    too fine to list (`_MAX_GRID`)."""
    low, high, step = distribution.low, distribution.high, distribution.step
    if step is None:
        return None
    reach_low, reach_high = prior.support()
    last = round((high - low) / step)
    first_j = max(0, math.floor((reach_low - low) / step))
    last_j = min(last, math.ceil((reach_high - low) / step))
    if last_j - first_j + 1 > _MAX_GRID:
        return None
    masses = {}
    for j in range(first_j, last_j + 1):
        value = low + step * j  # as `draw_from_prior` puts a draw on the grid
        masses[value] = prior.mass(value - step / 2, value + step / 2)
    total = sum(masses.values())
    return {value: m / total for value, m in masses.items()}


def moments(prior: Prior, distribution: IntDistribution | FloatDistribution) -> tuple[float, float]:
    """Mean and standard deviation of the parameter's draws."""
    masses = grid_masses(prior, distribution)
    if masses is not None:
        mean = sum(v * p for v, p in masses.items())
        return mean, math.sqrt(sum((v - mean) ** 2 * p for v, p in masses.items()))
    low, high, step = distribution.low, distribution.high, distribution.step
    if step is not None:  # a grid as fine as the draw: the draw over the grid's cells
        low, high = low - step / 2, high + step / 2
    return prior.continuous_moments(low, high)
