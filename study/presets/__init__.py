"""The shipped presets: study files (`study.study_file`), one per preset, in this folder.

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

from pathlib import Path

from model.config import ConfigError
from study.study_file import PRUNERS, SAMPLERS, Preset, read_study_file

__all__ = ["DEFAULT_PRESET", "PRESETS", "PRUNERS", "SAMPLERS", "Preset", "get_preset"]

FOLDER = Path(__file__).parent
# The order `--help` lists them in.
ORDER = ("quick", "seed", "smoke", "tiny", "wide", "wide-smoke")

PRESETS: dict[str, Preset] = {name: read_study_file(FOLDER / f"{name}.toml") for name in ORDER}

DEFAULT_PRESET = "quick"


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset {name!r}: must be one of {', '.join(PRESETS)}") from None
