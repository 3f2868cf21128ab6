"""`GaussianPriorSampler`: random search with the seed report's priors on neuron counts,
and the priors a study file gives its parameters; `PriorThenTPESampler`: those priors
first, then Optuna's TPE."""

from __future__ import annotations

import hashlib
import math
import secrets
from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import TYPE_CHECKING, Any

import numpy as np
from optuna.distributions import FloatDistribution, IntDistribution
from optuna.samplers import BaseSampler, RandomSampler, TPESampler

from model.config import TrainConfig
from study.experimental import experimental_optuna
from study.priors import Prior
from study.space import SearchSpace

if TYPE_CHECKING:
    from optuna.distributions import BaseDistribution
    from optuna.study import Study
    from optuna.trial import FrozenTrial, TrialState

# A redraw loop that never lands inside [low, high] means the prior misses the range.
_MAX_REDRAWS = 10_000


class GaussianPriorSampler(BaseSampler):
    """Independent random sampling; parameters with a prior follow it.

    A parameter named in `priors` is drawn from its prior (`study.priors`: the report's
    round(N(mu, sigma)) on a neuron count, or a study file's normal, log-normal or
    q_uniform), put on the distribution's grid and redrawn until it lies in its
    [low, high] — Optuna does not check bounds, and an out-of-range value would break a
    retried trial. Every other parameter is drawn as `RandomSampler` draws it: numbers
    uniform (log-uniform when `log`), categories uniform.

    Each draw comes from its own random stream, derived from (seed, trial number, parameter
    name): workers sharing a study never draw the same trial, and a retried trial (Optuna's
    heartbeat retry copies the number of the trial it retries) draws the same values again.
    The sampler holds no other state, so it pickles, and `reseed_rng` keeps the seed.

    Without a `seed`, as Optuna's samplers, it draws one from fresh entropy: two such
    samplers sample differently. (mnist-study's studies always pass the seed they store.)
    """

    def __init__(self, priors: Mapping[str, Prior], seed: int | None = None) -> None:
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
        numeric = isinstance(param_distribution, (IntDistribution, FloatDistribution))
        if prior is None or not numeric:
            return RandomSampler(seed=stream).sample_independent(
                study, trial, param_name, param_distribution
            )
        return draw_from_prior(prior, param_distribution, np.random.default_rng(stream))

    def stream_seed(self, trial_number: int, param_name: str) -> int:
        """The seed of one parameter's stream in one trial."""
        key = f"{self._seed}/{trial_number}/{param_name}".encode()
        return int.from_bytes(hashlib.sha256(key).digest()[:4], "little")


class PriorThenTPESampler(BaseSampler):
    """The first `n_prior_trials` trials drawn from the priors, as `GaussianPriorSampler`
    draws them; every later trial by Optuna's `TPESampler`, multivariate, grouped (so a
    conditional depth's parameters are modelled together) and with `constant_liar` (so
    workers running at once do not crowd the same point).

    Which sampler a trial gets depends on its number alone — the one it retries, for a
    retry — not on how many trials have finished, so a study draws the same way however
    many workers share it. TPE's draws are seeded per trial, from (seed, trial number):
    two workers asking at the same moment, with the same history, still draw different
    points, and a study replayed with the same history draws the same ones. No other
    state: it pickles, and `reseed_rng` keeps the seed, as `GaussianPriorSampler` does.
    """

    def __init__(
        self,
        priors: Mapping[str, Prior],
        seed: int | None = None,
        *,
        n_prior_trials: int = 20,
    ) -> None:
        if n_prior_trials < 0:
            raise ValueError(f"n_prior_trials = {n_prior_trials}: must be at least 0")
        self._prior = GaussianPriorSampler(priors, seed)
        self._n_prior_trials = int(n_prior_trials)
        # Each trial's TPE sampler, from its relative search space to its end: with
        # `group`, TPE keeps what `infer_relative_search_space` found for `sample_relative`.
        self._tpe_of: dict[int, TPESampler] = {}

    @property
    def seed(self) -> int:
        return self._prior.seed

    @property
    def n_prior_trials(self) -> int:
        return self._n_prior_trials

    def reseed_rng(self) -> None:
        """Keeps the seed: every draw is keyed by its trial's number (see the class)."""

    def uses_prior(self, trial: FrozenTrial) -> bool:
        return _original_number(trial) < self._n_prior_trials

    def _tpe(self, trial: FrozenTrial) -> TPESampler:
        sampler = self._tpe_of.get(trial.number)
        if sampler is None:
            seed = self._prior.stream_seed(_original_number(trial), "tpe")
            with experimental_optuna():  # `multivariate`, `group`, `constant_liar`: on purpose
                sampler = TPESampler(
                    multivariate=True, group=True, constant_liar=True, n_startup_trials=0,
                    seed=seed,
                )  # fmt: skip
            self._tpe_of[trial.number] = sampler
        return sampler

    def after_trial(
        self,
        study: Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._tpe_of.pop(trial.number, None)

    def infer_relative_search_space(
        self, study: Study, trial: FrozenTrial
    ) -> dict[str, BaseDistribution]:
        if self.uses_prior(trial):
            return {}
        return self._tpe(trial).infer_relative_search_space(study, trial)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        if self.uses_prior(trial) or not search_space:
            return {}
        return self._tpe(trial).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: BaseDistribution,
    ) -> Any:
        if self.uses_prior(trial):
            return self._prior.sample_independent(study, trial, param_name, param_distribution)
        return self._tpe(trial).sample_independent(study, trial, param_name, param_distribution)


def draw_from_prior(
    prior: Prior, distribution: IntDistribution | FloatDistribution, rng: np.random.Generator
) -> int | float:
    """A draw of the prior on the distribution's grid (none for a continuous float),
    redrawn until inside [low, high]; an int for an `IntDistribution`."""
    low, high, step = distribution.low, distribution.high, distribution.step
    # A float grid's values to q's decimals: low + k·q in floats may pass max by an ulp
    # (0.05 · 19 is 0.9500000000000001) and print so; the decimal multiple of q does not.
    decimals = None
    if step is not None and isinstance(distribution, FloatDistribution):
        decimals = max(0, -int(Decimal(repr(step)).normalize().as_tuple().exponent))
    for _ in range(_MAX_REDRAWS):
        value = prior.raw(rng)
        if not math.isfinite(value):
            continue  # a log-normal past any float: outside every range
        if step is not None:
            value = low + step * round((value - low) / step)
        if decimals is not None:
            value = round(value, decimals)
        if low <= value <= high:
            return int(value) if isinstance(distribution, IntDistribution) else float(value)
    raise ValueError(
        f"prior {prior.text()} gave no value in [{low}, {high}] in {_MAX_REDRAWS} draws"
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
    sampler: BaseSampler | None = None,
) -> list[dict]:
    """n configurations drawn through the real sampler and the real `suggest`, as params.

    Runs an in-memory study whose objective trains nothing: what a study with this seed
    would try first, and a sample to compare against the priors. The study's sampler is
    `GaussianPriorSampler` (seeded `seed`): what a random-search study draws, and what a
    `PriorThenTPESampler` draws in its prior trials. `sampler` replaces it when given.

    A draw holds the parameters its trial asked for, in the order it asked: in a space with
    conditional parameters, only those whose conditions held.
    """
    import optuna

    if sampler is None:
        sampler = GaussianPriorSampler(space.priors(), seed=seed)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    drawn: list[dict] = []
    for _ in range(n):
        trial = study.ask()
        space.suggest(trial, defaults)  # refuses a draw that makes no valid configuration
        drawn.append(dict(trial.params))
        study.tell(trial, 0.0)
    return drawn
