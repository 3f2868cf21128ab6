"""Named presets: a study's fixed training settings and default hyperparameters.

`seed` is the report's own set-up (all 60,000 training images, full batch, up to 2000
epochs, k = 5, 200 trials). `quick` keeps the report's network and search ranges but
trains on a 12,000-image subset with mini-batches, few epochs and k = 3, so a whole
study runs on a 2-core CPU in minutes. The default hyperparameters of both are the
report's best network (784-249-36-10, relu, adam, dropout 0.35, lr 5.4e-3, L2 1.2e-4).
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ConfigError, TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    defaults: TrainConfig
    n_trials: int


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            name="quick",
            summary="12,000-image subset, batches of 256, up to 30 epochs, k = 3, 12 trials",
            defaults=TrainConfig(subset=12_000, batch_size=256, max_epochs=30, patience=5, k=3),
            n_trials=12,
        ),
        Preset(
            name="seed",
            summary="the report's set-up: 60,000 images, full batch, up to 2000 epochs, "
            "k = 5, 200 trials",
            defaults=TrainConfig(subset=None, batch_size=None, max_epochs=2000, patience=50, k=5),
            n_trials=200,
        ),
    )
}

DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset {name!r}: must be one of {', '.join(PRESETS)}") from None
