"""Named presets: a study's search space, fixed training settings, pruner and budget.

`seed` is the report's own set-up (all 60,000 training images, full batch, up to 2000
epochs, k = 5, 200 trials, nothing pruned). `quick` keeps the report's network and search
ranges but trains on a 12,000-image subset with mini-batches, few epochs and k = 3, so a
whole study runs on a 2-core CPU in minutes. `smoke` is smaller still — trials of about a
second — for checking that the machinery works (the tests use it), and `tiny` has trials
of a fraction of a second, so that the storage, not training, is the bottleneck (the
fault-injection tests load the database with it). All four search the report's
space by random search on its priors; the default hyperparameters (what `train` uses
without `--params`) are the report's best network: 784-249-36-10, relu, adam, dropout
0.35, lr 5.4e-3, L2 1.2e-4.

`wide` goes past the report: 1 to 4 hidden layers of 128 to 4,096 units, the settings the
report did not have (input dropout, max-norm, AdamW and SGD, a learning-rate schedule,
label smoothing, the batch size), on all 60,000 images with k = 3, searched first at
random and then by TPE. `wide-smoke` is the same space with narrow layers on a small
subset, for the tests.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from model.config import ConfigError, TrainConfig
from study.space import SearchSpace

PRUNERS = ("none", "median", "hyperband")
# random: `GaussianPriorSampler`, the report's random search on its priors;
# prior_then_tpe: `PriorThenTPESampler`, `n_prior_trials` of those, then TPE.
SAMPLERS = ("random", "prior_then_tpe")


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    defaults: TrainConfig
    n_trials: int
    pruner: str = "none"
    space: SearchSpace = field(default_factory=SearchSpace)
    sampler: str = "random"
    n_prior_trials: int = 0
    # Whether `retrain` also measures the best configuration's k fold networks together
    # (it cross-validates the configuration again for them: k more trainings).
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner {self.pruner!r}: must be one of {', '.join(PRUNERS)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r}: must be one of {', '.join(SAMPLERS)}")
        if self.n_prior_trials < 0:
            raise ConfigError(f"n_prior_trials = {self.n_prior_trials}: must be at least 0")


# Widths log-uniform on [128, 4096]: a first layer of 1,000 units or more in about 41 % of
# draws (ln 4.1 / ln 32), where the report's prior gives one in [1, 784] never.
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


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="quick",
            summary="12,000-image subset, batches of 256, up to 30 epochs, k = 3, "
            "12 trials, median pruner",
            defaults=TrainConfig(subset=12_000, batch_size=256, max_epochs=30, patience=5, k=3),
            n_trials=12,
            pruner="median",
        ),
        Preset(
            name="seed",
            summary="the report's set-up: 60,000 images, full batch, up to 2000 epochs, "
            "k = 5, 200 trials, no pruning",
            defaults=TrainConfig(subset=None, batch_size=None, max_epochs=2000, patience=50, k=5),
            n_trials=200,
        ),
        Preset(
            name="smoke",
            summary="4,000-image subset, batches of 100, 5 epochs, k = 2, 6 trials: "
            "about a second a trial, to check the machinery",
            defaults=TrainConfig(subset=4_000, batch_size=100, max_epochs=5, patience=5, k=2),
            n_trials=6,
        ),
        Preset(
            name="tiny",
            summary="1,000-image subset, full batch, 3 epochs, k = 2, 24 trials: "
            "a fraction of a second a trial, to load the storage",
            defaults=TrainConfig(subset=1_000, batch_size=None, max_epochs=3, patience=3, k=2),
            n_trials=24,
        ),
        Preset(
            name="wide",
            summary="deeper and wider: 1-4 layers of 128-4096 units, input dropout, max-norm, "
            "adamw and sgd, lr schedules, label smoothing; 60,000 images, up to 30 epochs, "
            "k = 3, 60 trials (20 random, then TPE), median pruner",
            # 30 epochs is what the schedules anneal over; patience only stops a run that
            # has stopped learning well before the schedule ends.
            defaults=TrainConfig(
                subset=None, batch_size=256, max_epochs=30, patience=10, k=3, schedule="cosine"
            ),
            n_trials=60,
            # Chosen by measurement: benchmarks/results-pruners-cpu-2026-11-27.json (README).
            pruner="median",
            space=WIDE_SPACE,
            sampler="prior_then_tpe",
            n_prior_trials=20,
            ensemble=True,
        ),
        Preset(
            name="wide-smoke",
            summary="the wide space with layers of 16-128 units on a 2,000-image subset, "
            "3 epochs, k = 2, 8 trials (4 random, then TPE): about a second a trial",
            defaults=TrainConfig(
                subset=2_000, batch_size=256, max_epochs=3, patience=3, k=2, schedule="cosine"
            ),
            n_trials=8,
            space=dataclasses.replace(WIDE_SPACE, units_low=16, units_high=128),
            sampler="prior_then_tpe",
            n_prior_trials=4,
            ensemble=True,
        ),
    )
}

DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset {name!r}: must be one of {', '.join(PRESETS)}") from None
