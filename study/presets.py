"""Named presets: a study's search space, fixed training settings, pruner and budget.

`seed` is the report's own set-up (all 60,000 training images, full batch, up to 2000
epochs, k = 5, 200 trials, nothing pruned). `quick` keeps the report's network and search
ranges but trains on a 12,000-image subset with mini-batches, few epochs and k = 3, so a
whole study runs on a 2-core CPU in minutes. `smoke` is smaller still — trials of about a
second — for checking that the machinery works (the tests use it), and `tiny` has trials
of a fraction of a second, so that the storage, not training, is the bottleneck (the
fault-injection tests load the database with it). All three search the
same space; the default hyperparameters (what `train` uses without `--params`) are the
report's best network: 784-249-36-10, relu, adam, dropout 0.35, lr 5.4e-3, L2 1.2e-4.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from model.config import ConfigError, TrainConfig
from study.space import SearchSpace

PRUNERS = ("none", "median", "hyperband")


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    defaults: TrainConfig
    n_trials: int
    pruner: str = "none"
    space: SearchSpace = field(default_factory=SearchSpace)
    # Whether `retrain` also measures the best configuration's k fold networks together
    # (it cross-validates the configuration again for them: k more trainings).
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner {self.pruner!r}: must be one of {', '.join(PRUNERS)}")


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
    )
}

DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset {name!r}: must be one of {', '.join(PRESETS)}") from None
