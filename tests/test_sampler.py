from __future__ import annotations

import dataclasses
import json
import math
import pickle
import statistics
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState, create_trial

from model.config import TrainConfig
from study.presets import PRESETS
from study.sampler import (
    GaussianPriorSampler,
    PriorThenTPESampler,
    draw_from_prior,
    draw_params,
)
from study.space import Condition, GaussianPrior, SearchSpace, compression_priors

optuna.logging.set_verbosity(optuna.logging.WARNING)

ROOT = Path(__file__).resolve().parents[1]
SPACE = SearchSpace()
DEFAULTS = TrainConfig()
SEED = 0
N_DRAWS = 3000  # through the real study and `suggest`: about 4 s
N_DIRECT = 40_000  # straight from `sample_independent`: about 0.5 s per parameter

# How many standard errors a sample mean or sd may stray from the exact value.
N_SE = 5.0
# Kolmogorov–Smirnov: P(sqrt(n) · D_n > 1.9495) ≈ 0.001 under the null (asymptotic,
# c(α) = sqrt(-ln(α/2) / 2) with α = 0.001).
KS_C_0999 = 1.9495
# 0.999 quantiles of the chi-square distribution, by degrees of freedom.
CHI2_0999 = {1: 10.828, 2: 13.816, 3: 16.266, 9: 27.877}


@pytest.fixture(scope="module")
def draws() -> list[dict[str, Any]]:
    """What a study with SEED tries first: N_DRAWS configurations, as params."""
    return draw_params(SPACE, DEFAULTS, N_DRAWS, SEED)


def column(draws: list[dict[str, Any]], name: str) -> np.ndarray:
    return np.array([d[name] for d in draws])


def ks_uniform(x: np.ndarray, low: float, high: float) -> float:
    """Kolmogorov–Smirnov statistic D_n of `x` against the uniform CDF on [low, high]."""
    n = len(x)
    cdf = np.clip((np.sort(x) - low) / (high - low), 0.0, 1.0)
    above = np.arange(1, n + 1) / n - cdf
    below = cdf - np.arange(0, n) / n
    return float(max(above.max(), below.max()))


def ks_critical(n: int) -> float:
    return KS_C_0999 / math.sqrt(n)


def chi_square_uniform(values: Sequence[Any], choices: Sequence[Any]) -> float:
    """Pearson's chi-square of the counts of `values` against equal probabilities."""
    counts = Counter(values)
    assert set(counts) <= set(choices)
    expected = len(values) / len(choices)
    return sum((counts[c] - expected) ** 2 / expected for c in choices)


def trial_numbered(number: int, system_attrs: dict[str, Any] | None = None) -> FrozenTrial:
    return FrozenTrial(
        number=number,
        state=TrialState.RUNNING,
        value=None,
        datetime_start=None,
        datetime_complete=None,
        params={},
        distributions={},
        user_attrs={},
        system_attrs=system_attrs or {},
        intermediate_values={},
        trial_id=number,
    )


def sample_many(
    sampler: GaussianPriorSampler, name: str, distribution: BaseDistribution, n: int
) -> np.ndarray:
    """One draw of `name` from each of trials 0 .. n-1, straight from the sampler."""
    return np.array(
        [
            sampler.sample_independent(None, trial_numbered(i), name, distribution)  # type: ignore[arg-type]
            for i in range(n)
        ]
    )


# The wide presets' space as the code spelled it before the presets became files
# (study/presets/wide.toml must say the same).
WIDE_SPACE = SearchSpace(
    min_layers=1,
    n_layers=4,
    units_low=128,
    units_high=4096,
    units_log=True,
    activations=("relu", "leaky_relu", "hardswish", "silu"),
    optimizers=("adam", "adamw", "adamax", "sgd"),
    dropout=(0.0, 0.6),
    lr=(1e-4, 1e-2),
    sgd_lr=(1e-3, 0.3),
    weight_decay=(1e-6, 1e-2),
    input_dropout=(0.0, 0.3),
    max_norm=(1.0, 5.0),
    schedules=("cosine", "one_cycle"),
    batch_sizes=(64, 128, 256, 512),
    label_smoothing=(0.0, 0.1),
)


def test_every_preset_searches_the_space_tested_here() -> None:
    assert {name: preset.space for name, preset in PRESETS.items()} == {
        "quick": SPACE,
        "seed": SPACE,
        "smoke": SPACE,
        "tiny": SPACE,
        "wide": WIDE_SPACE,
        # The wide space with narrow layers: the same parameters, the same draws otherwise.
        "wide-smoke": dataclasses.replace(WIDE_SPACE, units_low=16, units_high=128),
    }
    assert {name: (p.sampler, p.n_prior_trials) for name, p in PRESETS.items()} == {
        "quick": ("random", 0), "seed": ("random", 0), "smoke": ("random", 0),
        "tiny": ("random", 0), "wide": ("prior_then_tpe", 20), "wide-smoke": ("prior_then_tpe", 4),
    }  # fmt: skip


def test_the_reports_space_is_its_seven_parameters_whatever_the_model_adds() -> None:
    """The model knows adamw, sgd, silu and more; the report's space names its own three
    activations and two optimizers, so a study of it draws what it always drew."""
    assert list(SPACE.distributions()) == [
        "n_units_l0", "n_units_l1", "activation", "optimizer", "dropout", "lr", "weight_decay",
    ]  # fmt: skip
    assert SPACE.distributions()["optimizer"].choices == ("adam", "adamax")
    assert SPACE.conditions() == {}
    assert all("only_when" not in entry for entry in SPACE.describe().values())


@pytest.mark.parametrize("name", ["n_units_l0", "n_units_l1"])
def test_neuron_counts_follow_the_truncated_rounded_prior(
    draws: list[dict[str, Any]], name: str
) -> None:
    prior = SPACE.priors()[name]
    mean, sd = prior.truncated_moments(SPACE.units_low, SPACE.units_high)
    x = column(draws, name)
    n = len(x)
    assert x.mean() == pytest.approx(mean, abs=N_SE * sd / math.sqrt(n))
    assert x.std(ddof=1) == pytest.approx(sd, abs=N_SE * sd / math.sqrt(2 * n))


@pytest.mark.parametrize("name", ["n_units_l0", "n_units_l1"])
def test_many_direct_draws_match_the_truncated_moments_not_mu_and_sigma(name: str) -> None:
    # N_DRAWS through draw_params cannot tell 187.47 from 183.18 at 5 standard errors
    # (5 · 83.9 / sqrt(3000) ≈ 7.7); N_DIRECT draws of the same sampler can (≈ 2.1).
    prior = SPACE.priors()[name]
    distribution = SPACE.distributions()[name]
    assert isinstance(distribution, IntDistribution)
    mean, sd = prior.truncated_moments(distribution.low, distribution.high)
    sampler = GaussianPriorSampler(SPACE.priors(), seed=SEED)
    x = sample_many(sampler, name, distribution, N_DIRECT)
    tolerance = N_SE * sd / math.sqrt(N_DIRECT)
    assert x.mean() == pytest.approx(mean, abs=tolerance)
    assert x.std(ddof=1) == pytest.approx(sd, abs=N_SE * sd / math.sqrt(2 * N_DIRECT))
    if name == "n_units_l0":
        # Truncation at 1 moves layer 1's mean from 183.18 up to about 187.47.
        assert prior.mu == pytest.approx(183.18, abs=0.01)
        assert mean == pytest.approx(187.47, abs=0.01)
        assert abs(mean - prior.mu) > tolerance
        assert abs(x.mean() - prior.mu) > tolerance


def test_every_draw_lies_in_its_distribution(draws: list[dict[str, Any]]) -> None:
    distributions = SPACE.distributions()
    for params in draws:
        assert set(params) == set(distributions)
        for name, value in params.items():
            distribution = distributions[name]
            assert distribution._contains(distribution.to_internal_repr(value)), (name, value)
            if isinstance(distribution, IntDistribution):
                assert type(value) is int, (name, value)
            if isinstance(distribution, FloatDistribution):
                assert type(value) is float, (name, value)
                assert distribution.low <= value <= distribution.high


def test_dropout_is_uniform_on_its_range(draws: list[dict[str, Any]]) -> None:
    x = column(draws, "dropout")
    assert x.min() >= 0.3 and x.max() <= 0.5
    assert x.min() < 0.301 and x.max() > 0.499  # the whole range is reached
    assert ks_uniform(x, 0.3, 0.5) < ks_critical(len(x))
    # The test has power: the same draws are far from uniform on a narrower range.
    assert ks_uniform(x, 0.3, 0.45) > ks_critical(len(x))


@pytest.mark.parametrize(("name", "low", "high"), [("lr", -4, -2), ("weight_decay", -5, -3)])
def test_learning_rate_and_weight_decay_are_log_uniform(
    draws: list[dict[str, Any]], name: str, low: int, high: int
) -> None:
    x = column(draws, name)
    log_x = np.log10(x)
    assert low <= log_x.min() and log_x.max() <= high
    assert ks_uniform(log_x, low, high) < ks_critical(len(x))
    # Uniform on the linear scale would be rejected by a wide margin.
    assert ks_uniform(x, 10.0**low, 10.0**high) > 10 * ks_critical(len(x))


@pytest.mark.parametrize(
    ("name", "choices"),
    [("activation", ("relu", "leaky_relu", "hardswish")), ("optimizer", ("adam", "adamax"))],
)
def test_categories_are_drawn_equally_often(
    draws: list[dict[str, Any]], name: str, choices: tuple[str, ...]
) -> None:
    values = [d[name] for d in draws]
    assert set(values) == set(choices)
    assert chi_square_uniform(values, choices) < CHI2_0999[len(choices) - 1]


def test_the_same_seed_draws_the_same_configurations_in_another_process() -> None:
    script = (
        "import json, optuna\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "from model.config import TrainConfig\n"
        "from study.sampler import draw_params\n"
        "from study.space import SearchSpace\n"
        "print(json.dumps(draw_params(SearchSpace(), TrainConfig(), 20, 7)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    there = json.loads(done.stdout)
    here = draw_params(SPACE, DEFAULTS, 20, 7)
    # Exactly: both processes run this machine's numpy, on the same kernels (a stored
    # draw from another CPU compares within rounding: tests/rounding.py, 5 and 6).
    assert there == here
    assert here != draw_params(SPACE, DEFAULTS, 20, 8)


def test_a_different_seed_draws_different_values() -> None:
    a = draw_params(SPACE, DEFAULTS, 10, 1)
    b = draw_params(SPACE, DEFAULTS, 10, 2)
    assert all(x["dropout"] != y["dropout"] for x, y in zip(a, b, strict=True))
    assert [x["n_units_l0"] for x in a] != [y["n_units_l0"] for y in b]


def test_trials_of_one_study_draw_different_configurations(draws: list[dict[str, Any]]) -> None:
    configs = [tuple(sorted(d.items())) for d in draws[:200]]
    assert len(set(configs)) == len(configs)
    # Not even one float value repeats across the whole sample.
    for name in ("dropout", "lr", "weight_decay"):
        assert len(set(column(draws, name))) == len(draws)


def study_with_retry_of(failed: int, number: int) -> optuna.Study:
    """An in-memory study whose trial `number` is a retry of trial `failed`."""
    study = optuna.create_study(sampler=GaussianPriorSampler(SPACE.priors(), seed=SEED))
    for _ in range(number):
        study.add_trial(create_trial(state=TrialState.COMPLETE, value=0.0))
    study.add_trial(create_trial(state=TrialState.WAITING, system_attrs={"failed_trial": failed}))
    return study


def test_a_retried_trial_draws_the_values_of_the_trial_it_retries() -> None:
    study = study_with_retry_of(failed=3, number=9)
    study.ask()  # takes the waiting trial: number 9, retrying 3
    sampler = study.sampler
    retry, original = study.trials[9], study.trials[3]
    assert retry.number == 9 and retry.system_attrs["failed_trial"] == 3
    assert original.number == 3 and "failed_trial" not in original.system_attrs
    distributions = SPACE.distributions()

    def draw(trial: FrozenTrial, name: str) -> Any:
        return sampler.sample_independent(study, trial, name, distributions[name])

    def configuration(trial: FrozenTrial) -> list[Any]:
        return [draw(trial, name) for name in distributions]

    assert draw(retry, "n_units_l0") == draw(original, "n_units_l0")  # a prior parameter
    assert draw(retry, "dropout") == draw(original, "dropout")  # a plain one
    assert configuration(retry) == configuration(original)
    assert configuration(trial_numbered(9, {"failed_trial": 3})) == configuration(original)
    # Without the attribute, trial 9 draws values of its own (dropout: never equal).
    assert draw(trial_numbered(9), "dropout") != draw(original, "dropout")
    assert configuration(trial_numbered(9)) != configuration(original)


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_optunas_retry_callback_gives_a_trial_the_configuration_it_retries() -> None:
    # The callback the project's storage runs on a stale trial, called here by hand.
    seed = 5
    expected = draw_params(SPACE, DEFAULTS, 4, seed)[3]
    study = optuna.create_study(sampler=GaussianPriorSampler(SPACE.priors(), seed=seed))
    for _ in range(3):
        study.tell(study.ask(), 0.0)
    dying = study.ask()
    assert dying.number == 3
    dying.suggest_int("n_units_l0", SPACE.units_low, SPACE.units_high)  # then it dies
    study.tell(dying, state=TrialState.FAIL)
    RetryHeartbeatStaleTrialCallback()(study, study.trials[3])
    retry = study.ask()
    assert retry.number == 4
    assert study.trials[4].system_attrs["failed_trial"] == 3
    config = SPACE.suggest(retry, DEFAULTS)
    assert {name: config.params()[name] for name in SPACE.distributions()} == expected


def test_a_pickled_sampler_draws_the_same_values() -> None:
    sampler = GaussianPriorSampler(SPACE.priors(), seed=11)
    draw_params(
        SPACE, DEFAULTS, 5, 11, sampler=sampler
    )  # used before pickling, as a running study's sampler is
    clone = pickle.loads(pickle.dumps(sampler))
    assert clone is not sampler and clone.seed == 11
    ours = draw_params(SPACE, DEFAULTS, 30, 11, sampler=sampler)
    assert draw_params(SPACE, DEFAULTS, 30, 11, sampler=clone) == ours
    assert ours == draw_params(SPACE, DEFAULTS, 30, 11)


def test_a_sampler_given_no_seed_draws_one_from_fresh_entropy() -> None:
    """As Optuna's samplers do: two studies built without a seed sample differently."""
    a, b = GaussianPriorSampler(SPACE.priors()), GaussianPriorSampler(SPACE.priors())
    assert a.seed != b.seed
    first = draw_params(SPACE, DEFAULTS, 5, 0, sampler=a)
    assert first != draw_params(SPACE, DEFAULTS, 5, 0, sampler=b)
    # The seed it drew is its seed: a sampler given it draws the same.
    assert first == draw_params(SPACE, DEFAULTS, 5, a.seed)


def test_reseeding_keeps_the_seed_and_what_it_draws() -> None:
    sampler = GaussianPriorSampler(SPACE.priors(), seed=5)
    before = draw_params(SPACE, DEFAULTS, 10, 5, sampler=sampler)
    sampler.reseed_rng()
    assert sampler.seed == 5
    assert draw_params(SPACE, DEFAULTS, 10, 5, sampler=sampler) == before


def test_threads_of_one_optimize_draw_each_trial_as_one_thread_would() -> None:
    """`optimize(n_jobs=2)` reseeds the sampler as each thread starts; the trials still
    draw what their numbers and the seed say, none twice."""

    def objective(trial: optuna.Trial) -> float:
        SPACE.suggest(trial, DEFAULTS)
        return 0.0

    study = optuna.create_study(sampler=GaussianPriorSampler(SPACE.priors(), seed=5))
    study.optimize(objective, n_trials=12, n_jobs=2)
    by_number = sorted((t.number, t.params) for t in study.trials)
    alone = draw_params(SPACE, DEFAULTS, 12, 5)
    assert [params for _, params in by_number] == [
        {name: drawn[name] for name in params}
        for (_, params), drawn in zip(by_number, alone, strict=True)
    ]
    assert len({tuple(sorted(p.items())) for _, p in by_number}) == 12


def test_a_parameter_without_a_prior_is_drawn_uniformly() -> None:
    sampler = GaussianPriorSampler(SPACE.priors(), seed=SEED)
    distribution = IntDistribution(0, 9)
    x = sample_many(sampler, "other", distribution, 5000)
    assert all(type(v) is int for v in x.tolist())
    assert set(x.tolist()) == set(range(10))
    assert chi_square_uniform(x.tolist(), range(10)) < CHI2_0999[9]
    # A categorical parameter named like a prior has no grid to put a draw on: it is
    # drawn plainly. (A float one follows its prior: a study file's normal dropout.)
    y = sample_many(sampler, "n_units_l0", CategoricalDistribution(("a", "b", "c")), 3000)
    assert chi_square_uniform(y.tolist(), ("a", "b", "c")) < CHI2_0999[2]


def test_the_sampler_has_no_relative_search_space() -> None:
    sampler = GaussianPriorSampler(SPACE.priors(), seed=SEED)
    study = optuna.create_study(sampler=sampler)
    trial = study.ask()
    SPACE.suggest(trial, DEFAULTS)
    study.tell(trial, 0.0)
    frozen = study.trials[0]
    assert sampler.infer_relative_search_space(study, frozen) == {}
    assert sampler.sample_relative(study, frozen, SPACE.distributions()) == {}


def test_a_prior_partly_outside_the_range_is_redrawn_inside_it() -> None:
    rng = np.random.default_rng(0)
    low_prior, high_prior = GaussianPrior(mu=0, sigma=5), GaussianPrior(mu=784, sigma=50)
    distribution = IntDistribution(1, 784)
    low_side = np.array([draw_from_prior(low_prior, distribution, rng) for _ in range(4000)])
    high_side = np.array([draw_from_prior(high_prior, distribution, rng) for _ in range(4000)])
    assert low_side.min() == 1 and high_side.max() == 784
    assert low_side.max() <= 784 and high_side.min() >= 1
    # Redrawn, not clipped: the draws have the truncated distribution's mean.
    for prior, x in ((low_prior, low_side), (high_prior, high_side)):
        mean, sd = prior.truncated_moments(1, 784)
        assert x.mean() == pytest.approx(mean, abs=N_SE * sd / math.sqrt(len(x)))
    # P(round(X) = 1 | round(X) >= 1) for X ~ N(0, 5) is (Φ(0.3) − Φ(0.1)) / (1 − Φ(0.1));
    # clipping would instead put Φ(0.3) ≈ 0.62 of the draws on 1.
    phi = [0.5 * (1 + math.erf(z / math.sqrt(2))) for z in (0.1, 0.3)]
    p_one = (phi[1] - phi[0]) / (1 - phi[0])
    assert p_one == pytest.approx(0.1697, abs=1e-4)
    se = math.sqrt(p_one * (1 - p_one) / len(low_side))
    assert np.mean(low_side == 1) == pytest.approx(p_one, abs=N_SE * se)


def test_a_prior_with_a_step_lands_on_the_grid() -> None:
    rng = np.random.default_rng(1)
    distribution = IntDistribution(2, 98, step=4)
    prior = GaussianPrior(mu=50, sigma=30)
    values = [draw_from_prior(prior, distribution, rng) for _ in range(500)]
    assert all(type(v) is int and 2 <= v <= 98 and (v - 2) % 4 == 0 for v in values)


def test_a_prior_that_never_lands_in_the_range_raises() -> None:
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="no value in"):
        draw_from_prior(GaussianPrior(mu=-1e6, sigma=1), IntDistribution(1, 784), rng)


def test_compression_priors_for_two_layers_are_the_reports() -> None:
    priors = compression_priors(2)
    assert [p.mu for p in priors] == pytest.approx([183.18, 42.80], abs=0.005)
    assert [p.sigma for p in priors] == pytest.approx([88.54, 10.00], abs=0.005)
    assert SPACE.priors() == {"n_units_l0": priors[0], "n_units_l1": priors[1]}


def test_compression_priors_for_three_layers_follow_the_formula() -> None:
    r = 10 / 784
    priors = compression_priors(3)
    assert [p.mu for p in priors] == pytest.approx([784 * r ** (n / 4) for n in (1, 2, 3)])
    assert [p.sigma for p in priors] == pytest.approx([784 * r ** (n / 3) for n in (1, 2, 3)])
    # By hand: μ = 784 · 0.01276^(n/4), σ_3 = 10 (the output width).
    assert [p.mu for p in priors] == pytest.approx([263.47, 88.54, 29.76], abs=0.01)
    assert priors[2].sigma == pytest.approx(10.0)
    assert list(SearchSpace(n_layers=3).priors()) == ["n_units_l0", "n_units_l1", "n_units_l2"]


# --- prior, then TPE -------------------------------------------------------------------

N_PRIOR = 8


def lr_target(trial: optuna.Trial) -> float:
    """A cheap objective with a clear optimum: a learning rate near 3e-3 and a wide first
    layer, so TPE has somewhere to go."""
    config = SPACE.suggest(trial, DEFAULTS)
    return -abs(math.log(config.lr / 3e-3)) - abs(config.hidden[0] - 400) / 400


def prior_then_tpe_study(seed: int = SEED, n: int = 30) -> optuna.Study:
    sampler = PriorThenTPESampler(SPACE.priors(), seed=seed, n_prior_trials=N_PRIOR)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(lr_target, n_trials=n)
    return study


def test_prior_then_tpe_draws_its_first_trials_from_the_priors_then_learns() -> None:
    study = prior_then_tpe_study()
    params = [t.params for t in study.trials]
    # The first N_PRIOR are exactly what the prior sampler with this seed draws.
    assert params[:N_PRIOR] == draw_params(SPACE, DEFAULTS, N_PRIOR, SEED)
    assert params[N_PRIOR:] != draw_params(SPACE, DEFAULTS, 30, SEED)[N_PRIOR:]
    # Then TPE: the last ten trials sit far closer to the optimum than the prior's.
    first, last = study.trials[:N_PRIOR], study.trials[-10:]
    assert statistics.fmean(t.value for t in last) > statistics.fmean(t.value for t in first)
    # Random search's typical distance from the optimum's learning rate, against TPE's.
    prior_distance = statistics.median(
        abs(math.log(p["lr"] / 3e-3)) for p in draw_params(SPACE, DEFAULTS, 200, SEED)
    )
    tpe_distance = statistics.median(abs(math.log(t.params["lr"] / 3e-3)) for t in last)
    assert tpe_distance < 0.6 * prior_distance


def test_prior_then_tpe_draws_the_same_in_another_process_and_pickled() -> None:
    script = (
        "import json, optuna\n"
        "optuna.logging.set_verbosity(optuna.logging.WARNING)\n"
        "from tests.test_sampler import prior_then_tpe_study\n"
        "print(json.dumps([t.params for t in prior_then_tpe_study(n=16).trials]))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True,
        timeout=120, check=True,
    )  # fmt: skip
    here = prior_then_tpe_study(n=16)
    # Exactly, as both processes sort and round on this CPU's numpy kernels.
    assert json.loads(done.stdout) == [t.params for t in here.trials]
    # A pickled copy goes on exactly as the original would.
    copy = pickle.loads(pickle.dumps(here.sampler))
    assert copy.seed == SEED and copy.n_prior_trials == N_PRIOR
    twin = optuna.create_study(direction="maximize", sampler=copy)
    for trial in here.trials:
        twin.add_trial(trial)
    here.optimize(lr_target, n_trials=3)
    twin.optimize(lr_target, n_trials=3)
    assert [t.params for t in twin.trials[-3:]] == [t.params for t in here.trials[-3:]]
    assert prior_then_tpe_study(seed=SEED + 1, n=16).trials[-1].params != here.trials[15].params


def test_two_workers_asking_at_once_with_one_history_draw_different_trials() -> None:
    """Two workers (each its own sampler, as two processes have) share a storage; both
    ask before either tells, so both see the same finished trials."""
    storage = optuna.storages.InMemoryStorage()
    workers = [
        optuna.create_study(
            study_name="shared", storage=storage, direction="maximize", load_if_exists=True,
            sampler=PriorThenTPESampler(SPACE.priors(), seed=SEED, n_prior_trials=N_PRIOR),
        )
        for _ in range(2)
    ]  # fmt: skip
    workers[0].optimize(lr_target, n_trials=N_PRIOR + 4)
    asked = [worker.ask() for worker in workers]
    for trial in asked:
        SPACE.suggest(trial, DEFAULTS)
    a, b = (trial.params for trial in asked)
    assert a != b
    assert all(a[name] != b[name] for name in ("dropout", "lr", "weight_decay"))


def test_a_retried_trial_after_the_prior_phase_draws_nothing_new() -> None:
    """A retry keeps the failed trial's parameters (fixed by Optuna's retry), whichever
    phase it falls in."""
    study = prior_then_tpe_study(n=N_PRIOR + 3)
    failed = study.trials[-1]
    study.enqueue_trial(failed.params)
    retry = study.ask()
    SPACE.suggest(retry, DEFAULTS)
    assert retry.params == failed.params


# --- the wide space: depth, conditional parameters, log-uniform widths ----------------

WIDE = PRESETS["wide"]
WIDE_DRAWS = 2000  # through the real study and `suggest`: about 6 s


@pytest.fixture(scope="module")
def wide_draws() -> list[dict[str, Any]]:
    return draw_params(WIDE.space, WIDE.defaults, WIDE_DRAWS, SEED)


def test_a_wide_draw_asks_only_for_the_parameters_its_earlier_answers_call_for(
    wide_draws: list[dict[str, Any]],
) -> None:
    distributions = WIDE.space.distributions()
    always = {
        "n_layers", "n_units_l0", "activation", "optimizer", "dropout", "input_dropout",
        "use_max_norm", "weight_decay", "schedule", "batch_size", "label_smoothing",
    }  # fmt: skip
    for params in wide_draws:
        depth = params["n_layers"]
        expected = always | {f"n_units_l{i}" for i in range(depth)}
        expected |= {"max_norm"} if params["use_max_norm"] else set()
        expected |= {"sgd_lr"} if params["optimizer"] == "sgd" else {"lr"}
        assert set(params) == expected, params
        for name, value in params.items():
            assert distributions[name]._contains(distributions[name].to_internal_repr(value))
    # Every branch is taken: each depth, max-norm on and off, SGD and the Adam family.
    assert {p["n_layers"] for p in wide_draws} == {1, 2, 3, 4}
    assert {p["use_max_norm"] for p in wide_draws} == {False, True}
    assert {p["optimizer"] for p in wide_draws} == {"adam", "adamw", "adamax", "sgd"}


def test_every_wide_draw_configures_into_the_configuration_it_names(
    wide_draws: list[dict[str, Any]],
) -> None:
    for params in wide_draws[:300]:
        config = WIDE.space.configure(params, WIDE.defaults)
        depth = params["n_layers"]
        assert config.hidden == tuple(params[f"n_units_l{i}"] for i in range(depth))
        assert config.max_norm == (params["max_norm"] if params["use_max_norm"] else None)
        assert config.lr == params["sgd_lr" if params["optimizer"] == "sgd" else "lr"]
        for name in ("activation", "optimizer", "dropout", "input_dropout", "weight_decay",
                     "schedule", "batch_size", "label_smoothing"):  # fmt: skip
            assert getattr(config, name) == params[name], name
        # What the preset fixes stays fixed.
        assert (config.subset, config.k, config.max_epochs, config.patience) == (None, 3, 30, 10)


def test_configure_rebuilds_a_finished_wide_trial_whatever_depth_the_defaults_have() -> None:
    two_deep = TrainConfig(hidden=(249, 36), max_epochs=30, k=3)
    deep = {"n_layers": 4, "n_units_l0": 4096, "n_units_l1": 2048, "n_units_l2": 1024,
            "n_units_l3": 128, "activation": "silu", "optimizer": "sgd", "dropout": 0.5,
            "input_dropout": 0.2, "use_max_norm": True, "max_norm": 3.5, "sgd_lr": 0.05,
            "weight_decay": 1e-4, "schedule": "one_cycle", "batch_size": 128,
            "label_smoothing": 0.1}  # fmt: skip
    config = WIDE.space.configure(deep, two_deep)
    assert config.hidden == (4096, 2048, 1024, 128)
    assert (config.optimizer, config.lr, config.max_norm) == ("sgd", 0.05, 3.5)
    assert (config.schedule, config.batch_size, config.label_smoothing) == ("one_cycle", 128, 0.1)
    shallow = {"n_layers": 1, "n_units_l0": 1500, "activation": "relu", "optimizer": "adamw",
               "dropout": 0.1, "input_dropout": 0.0, "use_max_norm": False, "lr": 2e-3,
               "weight_decay": 1e-2, "schedule": "cosine", "batch_size": 512,
               "label_smoothing": 0.0}  # fmt: skip
    config = WIDE.space.configure(shallow, two_deep)
    assert config.hidden == (1500,)
    assert (config.optimizer, config.lr, config.max_norm, config.weight_decay) == (
        "adamw", 2e-3, None, 1e-2,
    )  # fmt: skip
    # The report's space still fills exactly its two layers.
    assert SPACE.configure({"n_units_l0": 10, "n_units_l1": 5}, TrainConfig()).hidden == (10, 5)


def test_wide_widths_are_log_uniform_integers_with_the_moments_the_space_states() -> None:
    distribution = WIDE.space.distributions()["n_units_l0"]
    assert isinstance(distribution, IntDistribution) and distribution.log
    assert WIDE.space.priors() == {}
    sampler = GaussianPriorSampler(WIDE.space.priors(), seed=SEED)
    x = sample_many(sampler, "n_units_l0", distribution, N_DIRECT)
    assert x.min() == 128 and x.max() == 4096
    # Log-uniform on [127.5, 4096.5] before rounding; uniform on the linear scale is far off.
    log_x = np.log(x)
    assert ks_uniform(log_x, math.log(127.5), math.log(4096.5)) < ks_critical(len(x))
    assert ks_uniform(x, 128, 4096) > 10 * ks_critical(len(x))
    moments = WIDE.space.prior_moments()["n_units_l0"]
    assert moments.kind == "log-uniform integers [128, 4096]"
    # By integration, the continuous log-uniform on [127.5, 4096.5] has mean 1143.6.
    assert moments.mean == pytest.approx(3969 / math.log(4096.5 / 127.5), abs=0.5)
    assert x.mean() == pytest.approx(moments.mean, abs=N_SE * moments.sd / math.sqrt(len(x)))
    assert x.std(ddof=1) == pytest.approx(moments.sd, abs=N_SE * moments.sd / math.sqrt(len(x)))
    # A first layer of 1,000 units or more: P = ln(4096.5 / 999.5) / ln(4096.5 / 127.5).
    p_wide = math.log(4096.5 / 999.5) / math.log(4096.5 / 127.5)
    assert np.mean(x >= 1000) == pytest.approx(
        p_wide, abs=N_SE * math.sqrt(p_wide * (1 - p_wide) / len(x))
    )


def test_depth_is_drawn_uniformly_and_deeper_layers_only_as_often_as_their_depth(
    wide_draws: list[dict[str, Any]],
) -> None:
    depths = [p["n_layers"] for p in wide_draws]
    assert chi_square_uniform(depths, (1, 2, 3, 4)) < CHI2_0999[3]
    for i in range(4):
        asked = sum(f"n_units_l{i}" in p for p in wide_draws)
        assert asked == sum(d > i for d in depths)
    assert WIDE.space.conditions()["n_units_l2"] == Condition("n_layers", (3, 4))
    assert "n_units_l0" not in WIDE.space.conditions()
    described = WIDE.space.describe()
    assert described["n_units_l3"]["only_when"] == {"parent": "n_layers", "values": [4]}
    assert described["sgd_lr"]["only_when"] == {"parent": "optimizer", "values": ["sgd"]}
    assert described["max_norm"]["only_when"] == {"parent": "use_max_norm", "values": [True]}
    assert described["n_units_l0"]["log"] is True and "prior" not in described["n_units_l0"]


def test_prior_then_tpe_keeps_to_the_conditional_wide_space_after_its_prior_trials() -> None:
    """TPE, grouped, models each depth's parameters together: its draws keep to the same
    rules as the prior's (units only below the depth, lr or sgd_lr by optimizer)."""
    space, defaults = PRESETS["wide-smoke"].space, PRESETS["wide-smoke"].defaults

    def wide_target(trial: optuna.Trial) -> float:
        config = space.suggest(trial, defaults)
        return -abs(len(config.hidden) - 3) - abs(math.log(config.lr / 3e-3))

    sampler = PriorThenTPESampler(space.priors(), seed=SEED, n_prior_trials=N_PRIOR)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(wide_target, n_trials=N_PRIOR + 16)
    params = [t.params for t in study.trials]
    assert params[:N_PRIOR] == draw_params(space, defaults, N_PRIOR, SEED)
    later = params[N_PRIOR:]
    assert later != draw_params(space, defaults, N_PRIOR + 16, SEED)[N_PRIOR:]
    for p in later:
        assert {k for k in p if k.startswith("n_units_l")} == {
            f"n_units_l{i}" for i in range(p["n_layers"])
        }
        assert ("sgd_lr" in p) == (p["optimizer"] == "sgd") != ("lr" in p)
        assert ("max_norm" in p) == p["use_max_norm"]
    # It learnt: three layers, the optimum's depth, more often than the prior's one in four.
    assert sum(p["n_layers"] == 3 for p in later[-8:]) >= 4


# --- a study file's own distributions: each draws what W&B says it does -----------------

N_OWN = 10_000  # straight from `sample_independent`, per distribution: about 0.2 s each
_erfc = np.frompyfunc(math.erfc, 1, 1)


def normal_cdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return 0.5 * _erfc(-(np.asarray(x, dtype=float) - mu) / (sigma * math.sqrt(2))).astype(float)


def log_normal_cdf(x: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    x = np.asarray(x, dtype=float)
    logs = np.log(np.where(x > 0, x, 1.0))
    return np.where(x > 0, normal_cdf(logs, mu, sigma), 0.0)


def uniform_cdf(x: np.ndarray, low: float, high: float) -> np.ndarray:
    return np.clip((np.asarray(x, dtype=float) - low) / (high - low), 0.0, 1.0)


def log_uniform_cdf(x: np.ndarray, low: float, high: float) -> np.ndarray:
    x = np.clip(np.asarray(x, dtype=float), low, high)
    return np.log(x / low) / math.log(high / low)


def on_grid(cdf: Any, grid: np.ndarray, q: float) -> tuple[np.ndarray, np.ndarray]:
    """W&B's round(x / q) · q, redrawn until in range: each grid value takes the mass of
    its cell, renormalised over the grid."""
    return grid, cdf(grid + q / 2) - cdf(grid - q / 2)


def continuous(cdf: Any, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The draw truncated to [edges[0], edges[-1]], as 200,000 cells of the CDF."""
    return (edges[1:] + edges[:-1]) / 2, cdf(edges[1:]) - cdf(edges[:-1])


def reference_moments(values: np.ndarray, masses: np.ndarray) -> tuple[float, float, float, float]:
    """(mean, sd, the standard error of a sample mean of N_OWN, and of its sd), from the
    masses alone. The sd's by the delta method, Var(s) ≈ (m4 − m2²) / (4 m2 n): for a
    skewed log-normal about three times the normal's sd / sqrt(2n)."""
    p = masses / masses.sum()
    mean = float((p * values).sum())
    m2 = float((p * (values - mean) ** 2).sum())
    m4 = float((p * (values - mean) ** 4).sum())
    return mean, math.sqrt(m2), math.sqrt(m2 / N_OWN), math.sqrt((m4 - m2**2) / (4 * m2 * N_OWN))


LN = math.log
CELLS = 200_001
# (parameter, its table, the range every draw keeps to, its grid step (None: continuous),
# and the distribution as its own CDF says it: values and their masses.)
OWN_CASES: dict[str, tuple[str, str, tuple[float, float], float | None, Any]] = {
    "units-q_normal": (
        "n_units_l0", 'distribution = "q_normal"\nmu = 256\nsigma = 64\nq = 1\nmin = 1\nmax = 784',
        (1, 784), 1, lambda: on_grid(lambda x: normal_cdf(x, 256, 64), np.arange(1, 785), 1),
    ),
    "units-q_normal-q8-truncated": (
        "n_units_l0", 'distribution = "q_normal"\nmu = 100\nsigma = 120\nq = 8\nmin = 8\nmax = 784',
        (8, 784), 8,
        lambda: on_grid(lambda x: normal_cdf(x, 100, 120), np.arange(8, 785, 8), 8),
    ),
    "units-int_uniform": (
        "n_units_l0", 'distribution = "int_uniform"\nmin = 16\nmax = 64', (16, 64), 1,
        lambda: on_grid(lambda x: uniform_cdf(x, 15.5, 64.5), np.arange(16, 65), 1),
    ),
    "units-q_uniform": (
        "n_units_l0", 'distribution = "q_uniform"\nmin = 16\nmax = 64\nq = 4', (16, 64), 4,
        lambda: on_grid(lambda x: uniform_cdf(x, 16, 64), np.arange(16, 65, 4), 4),
    ),
    "units-q_log_uniform_values": (
        "n_units_l0", 'distribution = "q_log_uniform_values"\nmin = 16\nmax = 256\nq = 1',
        (16, 256), 1,
        lambda: on_grid(lambda x: log_uniform_cdf(x, 15.5, 256.5), np.arange(16, 257), 1),
    ),
    "units-q_log_normal-whole-range": (
        "n_units_l0", 'distribution = "q_log_normal"\nmu = 4.6\nsigma = 0.5\nq = 1',
        (1, 8192), 1,
        lambda: on_grid(lambda x: log_normal_cdf(x, 4.6, 0.5), np.arange(1, 8193), 1),
    ),
    "dropout-uniform": (
        "dropout", 'distribution = "uniform"\nmin = 0.1\nmax = 0.5', (0.1, 0.5), None,
        lambda: continuous(lambda x: uniform_cdf(x, 0.1, 0.5), np.linspace(0.1, 0.5, CELLS)),
    ),
    "dropout-q_uniform": (
        "dropout", 'distribution = "q_uniform"\nmin = 0.0\nmax = 0.5\nq = 0.05', (0, 0.5), 0.05,
        lambda: on_grid(lambda x: uniform_cdf(x, 0, 0.5), np.arange(11) * 0.05, 0.05),
    ),
    "dropout-normal": (
        "dropout", 'distribution = "normal"\nmu = 0.3\nsigma = 0.15\nmin = 0.0\nmax = 0.5',
        (0, 0.5), None,
        lambda: continuous(lambda x: normal_cdf(x, 0.3, 0.15), np.linspace(0, 0.5, CELLS)),
    ),
    "dropout-q_normal": (
        "dropout",
        'distribution = "q_normal"\nmu = 0.3\nsigma = 0.15\nq = 0.05\nmin = 0.0\nmax = 0.5',
        (0, 0.5), 0.05,
        lambda: on_grid(lambda x: normal_cdf(x, 0.3, 0.15), np.arange(11) * 0.05, 0.05),
    ),
    "lr-log_uniform_values": (
        "lr", 'distribution = "log_uniform_values"\nmin = 1e-4\nmax = 1e-2', (1e-4, 1e-2), None,
        lambda: continuous(lambda x: log_uniform_cdf(x, 1e-4, 1e-2),
                           np.geomspace(1e-4, 1e-2, CELLS)),
    ),
    "lr-uniform": (
        "lr", 'distribution = "uniform"\nmin = 1e-4\nmax = 1e-2', (1e-4, 1e-2), None,
        lambda: continuous(lambda x: uniform_cdf(x, 1e-4, 1e-2), np.linspace(1e-4, 1e-2, CELLS)),
    ),
    "lr-log_normal-whole-range": (
        "lr", f'distribution = "log_normal"\nmu = {LN(1e-3)}\nsigma = 1.0', (0, 10), None,
        lambda: continuous(lambda x: log_normal_cdf(x, LN(1e-3), 1.0),
                           np.geomspace(1e-3 * math.exp(-12), 10, CELLS)),
    ),
    "weight_decay-q_log_normal": (
        "weight_decay",
        f'distribution = "q_log_normal"\nmu = {LN(1e-4)}\nsigma = 0.5\nq = 1e-5\nmin = 0.0\n'
        "max = 1e-3",
        (0, 1e-3), 1e-5,
        lambda: on_grid(lambda x: log_normal_cdf(x, LN(1e-4), 0.5), np.arange(101) * 1e-5, 1e-5),
    ),
    "label_smoothing-log_uniform_values": (
        "label_smoothing", 'distribution = "log_uniform_values"\nmin = 0.01\nmax = 0.1',
        (0.01, 0.1), None,
        lambda: continuous(lambda x: log_uniform_cdf(x, 0.01, 0.1), np.geomspace(0.01, 0.1, CELLS)),
    ),
}  # fmt: skip


def own_space(parameter: str, table: str) -> SearchSpace:
    """The space of a file that gives `parameter` the table `table` (one layer of its
    own, or [parameters.units] beside a continuous parameter)."""
    from study.study_file import parse_study

    units = '[parameters.units]\ndistribution = "q_log_uniform_values"\nmin = 16\nmax = 64\n'
    text = "[study]\nn_trials = 2\n" + (
        f"[parameters.{parameter}]\n{table}\n"
        if parameter.startswith("n_units_l")
        else f"{units}[parameters.{parameter}]\n{table}\n"
    )
    return parse_study(text, "own").space


@pytest.mark.parametrize("case", sorted(OWN_CASES))
def test_each_distribution_a_file_gives_draws_its_moments_in_its_range(case: str) -> None:
    name, table, (low, high), q, reference = OWN_CASES[case]
    space = own_space(name, table)
    distribution = space.distributions()[name]
    x = sample_many(GaussianPriorSampler(space.priors(), seed=SEED), name, distribution, N_OWN)
    # The range exactly: the ends given, or the trainer's whole range, (0, 10] for lr.
    assert x.min() >= low and x.max() <= high and (low > 0 or name != "lr" or x.min() > 0)
    if q is not None:
        steps = x / q
        assert np.abs(steps - np.round(steps)).max() < 1e-9, "off W&B's grid of multiples of q"
    if name.startswith("n_units_l"):
        assert {type(v) for v in x.tolist()} == {int}
    mean, sd, se_mean, se_sd = reference_moments(*reference())
    assert x.mean() == pytest.approx(mean, abs=N_SE * se_mean)
    assert x.std(ddof=1) == pytest.approx(sd, abs=N_SE * se_sd)
    # What `space --sample` prints beside the draws is that distribution's, exactly.
    stated = space.prior_moments()[name]
    assert stated.mean == pytest.approx(mean, rel=1e-6)
    assert stated.sd == pytest.approx(sd, rel=1e-5)


def test_q_uniform_draws_its_end_values_half_as_often_as_w_and_b_rounds() -> None:
    """round(U(16, 64) / 4) · 4: 16 takes the draws in [16, 18), its inner neighbours
    whole cells of 4; not 13 values equally likely (Optuna's stepped uniform)."""
    space = own_space("n_units_l0", OWN_CASES["units-q_uniform"][1])
    distribution = space.distributions()["n_units_l0"]
    x = sample_many(GaussianPriorSampler(space.priors(), seed=SEED), "n_units_l0", distribution,
                    N_OWN)  # fmt: skip
    for value, p in ((16, 1 / 24), (64, 1 / 24), (40, 1 / 12)):
        se = math.sqrt(p * (1 - p) / N_OWN)
        assert np.mean(x == value) == pytest.approx(p, abs=N_SE * se)
    assert abs(np.mean(x == 16) - 1 / 13) > N_SE * math.sqrt(1 / 13 * 12 / 13 / N_OWN)


def test_a_file_s_own_priors_draw_per_seed_trial_and_parameter_as_the_report_s_do() -> None:
    space = own_space("dropout", OWN_CASES["dropout-q_normal"][1])
    distribution = space.distributions()["dropout"]
    a, b = (GaussianPriorSampler(space.priors(), seed=3) for _ in range(2))
    assert (
        sample_many(a, "dropout", distribution, 50).tolist()
        == sample_many(b, "dropout", distribution, 50).tolist()
    )
    other = GaussianPriorSampler(space.priors(), seed=4)
    assert (
        sample_many(a, "dropout", distribution, 50).tolist()
        != sample_many(other, "dropout", distribution, 50).tolist()
    )
    # A retried trial draws the value of the trial it retries; another trial its own.
    retry = trial_numbered(9, {"failed_trial": 3})
    assert a.sample_independent(None, retry, "dropout", distribution) == a.sample_independent(  # type: ignore[arg-type]
        None,
        trial_numbered(3),
        "dropout",
        distribution,  # type: ignore[arg-type]
    )
    assert pickle.loads(pickle.dumps(a)).sample_independent(
        None,
        trial_numbered(3),
        "dropout",
        distribution,  # type: ignore[arg-type]
    ) == a.sample_independent(None, trial_numbered(3), "dropout", distribution)  # type: ignore[arg-type]


def test_prior_then_tpe_hands_a_file_s_own_priors_to_tpe_as_their_min_max_range() -> None:
    from study.study_file import parse_study

    text = (
        '[study]\nn_trials = 2\nsampler = "prior_then_tpe"\nn_prior_trials = 6\n'
        f"[parameters.n_units_l0]\n{OWN_CASES['units-q_normal-q8-truncated'][1]}\n"
        '[parameters.n_units_l1]\ndistribution = "q_log_normal"\nmu = 3.5\nsigma = 0.4\n'
        "q = 1\nmin = 8\nmax = 128\n"
        f"[parameters.dropout]\n{OWN_CASES['dropout-q_normal'][1]}\n"
        f'[parameters.lr]\ndistribution = "log_normal"\nmu = {LN(1e-3)}\nsigma = 1.0\n'
        "min = 1e-4\nmax = 1e-2\n"
    )
    preset = parse_study(text, "tpe")
    space = preset.space
    distributions = space.distributions()
    assert distributions["n_units_l0"] == IntDistribution(8, 784, step=8)
    assert distributions["n_units_l1"] == IntDistribution(8, 128, log=True)
    assert distributions["dropout"] == FloatDistribution(0.0, 0.5, step=0.05)
    assert distributions["lr"] == FloatDistribution(1e-4, 1e-2, log=True)

    def target(trial: optuna.Trial) -> float:
        config = space.suggest(trial, preset.defaults)
        return -abs(config.hidden[0] - 600) / 600 - abs(config.dropout - 0.1)

    sampler = PriorThenTPESampler(space.priors(), seed=SEED, n_prior_trials=6)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    study.optimize(target, n_trials=20)
    params = [t.params for t in study.trials]
    assert params[:6] == draw_params(space, preset.defaults, 6, SEED)
    for p in params[6:]:  # TPE: inside each range and on its grid
        assert 8 <= p["n_units_l0"] <= 784 and p["n_units_l0"] % 8 == 0
        assert 8 <= p["n_units_l1"] <= 128
        assert (
            0 <= p["dropout"] <= 0.5
            and abs(p["dropout"] / 0.05 - round(p["dropout"] / 0.05)) < 1e-9
        )
        assert 1e-4 <= p["lr"] <= 1e-2
    assert params[6:] != draw_params(space, preset.defaults, 20, SEED)[6:]
