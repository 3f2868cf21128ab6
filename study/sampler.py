"""`GaussianPriorSampler`: random search with the seed report's priors on neuron counts."""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import IntDistribution
from optuna.samplers import BaseSampler, RandomSampler

from model.config import TrainConfig
from study.space import GaussianPrior, SearchSpace

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.study import Study
    from optuna.trial import FrozenTrial

# A redraw loop that never lands inside [low, high] means the prior misses the range.
_MAX_REDRAWS = 10_000


class GaussianPriorSampler(BaseSampler):
    """Independent random sampling; integer parameters with a prior follow it.

    A parameter named in `priors` (an `IntDistribution`) is drawn as round(N(mu, sigma)),
    redrawn until it lies in the distribution's [low, high] — Optuna does not check bounds,
    and an out-of-range value would break a retried trial. Every other parameter is drawn as
    `RandomSampler` draws it: floats uniform (log-uniform when `log`), categories uniform.

    Each draw comes from its own random stream, derived from (seed, trial number, parameter
    name): workers sharing a study never draw the same trial, and a retried trial (Optuna's
    heartbeat retry copies the number of the trial it retries) draws the same values again.
    The sampler holds no other state, so it pickles, and `reseed_rng` keeps the seed.

    Without a `seed`, as Optuna's samplers, it draws one from fresh entropy: two such
    samplers sample differently. (mnist-study's studies always pass the seed they store.)
    """

    def __init__(self, priors: Mapping[str, GaussianPrior], seed: int | None = None) -> None:
        self._priors = dict(priors)
        self._seed = secrets.randbits(63) if seed is None else int(seed)

    @property
    def seed(self) -> int:
        """The seed every stream derives from: the one given, or the one drawn."""
        return self._seed

    def reseed_rng(self) -> None:
        """Keeps the seed, on purpose; Optuna's own `RandomSampler` would draw a new one.

        Optuna calls this as each thread of `optimize(n_jobs > 1)` starts, so that copies
        of one random state do not repeat each other's draws. Here no state is shared to
        repeat: each value's stream is keyed by its trial's number, which no two trials
        share. A new seed would only break what the seed promises: the study's stored seed
        would no longer say what it drew, and a retried trial would draw other values than
        the trial it retries (as `QMCSampler` keeps its seed for the same reason).
        """

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        return {}

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        return {}

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        stream = self.stream_seed(_original_number(trial), param_name)
        prior = self._priors.get(param_name)
        if prior is None or not isinstance(param_distribution, IntDistribution):
            return RandomSampler(seed=stream).sample_independent(
                study, trial, param_name, param_distribution
            )
        return draw_from_prior(prior, param_distribution, np.random.default_rng(stream))

    def stream_seed(self, trial_number: int, param_name: str) -> int:
        """The seed of one parameter's stream in one trial."""
        key = f"{self._seed}/{trial_number}/{param_name}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


def draw_from_prior(
    prior: GaussianPrior, distribution: IntDistribution, rng: np.random.Generator
) -> int:
    """round(N(mu, sigma)) on the distribution's grid, redrawn until inside [low, high]."""
    low, high, step = distribution.low, distribution.high, distribution.step
    for _ in range(_MAX_REDRAWS):
        value = low + step * round((rng.normal(prior.mu, prior.sigma) - low) / step)
        if low <= value <= high:
            return int(value)
    raise ValueError(
        f"prior N({prior.mu:g}, {prior.sigma:g}) gave no value in [{low}, {high}] "
        f"in {_MAX_REDRAWS} draws"
    )


def _original_number(trial: FrozenTrial) -> int:
    """The number of the trial this one retries, else its own."""
    return int(trial.system_attrs.get("failed_trial", trial.number))


def draw_params(
    space: SearchSpace,
    defaults: TrainConfig,
    n: int,
    seed: int,
    *,
    sampler: GaussianPriorSampler | None = None,
) -> list[dict]:
    """n configurations drawn through the real sampler and the real `suggest`, as params.

    Runs an in-memory study whose objective trains nothing: what a study with this seed
    would try first, and a sample to compare against the priors. `sampler` replaces the
    study's own sampler (seeded `seed`) when given.
    """
    import optuna

    if sampler is None:
        sampler = GaussianPriorSampler(space.priors(), seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    drawn: list[dict] = []
    for _ in range(n):
        trial = study.ask()
        config = space.suggest(trial, defaults)
        drawn.append({name: config.params()[name] for name in space.distributions()})
        study.tell(trial, 0.0)
    return drawn
