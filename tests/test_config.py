from __future__ import annotations

import dataclasses

import pytest

from model.config import ConfigError, TrainConfig
from model.kfold import train_kfold
from study.presets import PRESETS, get_preset
from tests.conftest import synthetic_data


def test_params_lay_over_the_defaults_by_study_name() -> None:
    config = TrainConfig().with_params(
        {"n_units_l1": 50, "activation": "hardswish", "lr": 1e-3, "batch_size": 128}
    )
    assert config.hidden == (249, 50)
    assert config.activation == "hardswish"
    assert config.lr == 1e-3
    assert config.batch_size == 128
    assert config.optimizer == "adam"


def test_a_units_index_one_past_the_last_layer_adds_a_layer() -> None:
    assert TrainConfig().with_params({"n_units_l2": 20}).hidden == (249, 36, 20)


def test_params_round_trip_through_their_study_names() -> None:
    config = TrainConfig(hidden=(100, 50, 25), batch_size=64, subset=1000, k=4)
    assert TrainConfig().with_params(config.params()) == config


def test_null_or_zero_batch_size_means_full_batch() -> None:
    config = TrainConfig(batch_size=32)
    assert config.with_params({"batch_size": None}).full_batch
    assert config.with_params({"batch_size": 0}).full_batch


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n_units_l0": 0}, r"n_units_l0 = 0: must be a whole number in \[1, 8192\]"),
        ({"n_units_l0": 2.5}, r"n_units_l0 = 2.5: must be a whole number"),
        ({"n_units_l3": 10}, r"n_units_l3: layers must be consecutive"),
        ({"dropout": 1.5}, r"dropout = 1.5: must be a number in \[0.0, 1.0\)"),
        ({"dropout": "high"}, r"dropout = 'high': must be a number"),
        (
            {"activation": "tanh"},
            r"activation = 'tanh': must be one of relu, leaky_relu, hardswish, silu",
        ),
        (
            {"optimizer": "rmsprop"},
            r"optimizer = 'rmsprop': must be one of adam, adamax, adamw, sgd",
        ),
        ({"lr": 0}, r"lr = 0.0: must be a number in \(0.0, 10.0\]"),
        ({"lr": float("nan")}, r"lr = nan: must be a number in \(0.0, 10.0\]"),
        ({"lr": 10.5}, r"lr = 10.5: must be a number in \(0.0, 10.0\]"),
        ({"weight_decay": -1}, r"weight_decay = -1.0: must be a number in \[0.0, 10.0\]"),
        ({"weight_decay": 1e300}, r"weight_decay = 1e\+300: must be a number in \[0.0, 10.0\]"),
        ({"k": True}, r"k = True: must be a whole number"),
        ({"subset": 70000}, r"subset = 70000: must be a whole number in \[10, 60000\]"),
        # The open and closed ends of every range.
        ({"dropout": 1.0}, r"dropout = 1.0: must be a number in \[0.0, 1.0\)"),
        ({"dropout": -1e-9}, r"dropout = -1e-09: must be a number in \[0.0, 1.0\)"),
        ({"lr": -0.0}, r"lr = -0.0: must be a number in \(0.0, 10.0\]"),
        ({"weight_decay": -1e-12}, r"weight_decay = -1e-12: must be a number in \[0.0,"),
        ({"k": 1}, r"k = 1: must be a whole number in \[2, 100\]"),
        ({"k": 101}, r"k = 101: must be a whole number in \[2, 100\]"),
        ({"k": 60_001}, r"k = 60001: must be a whole number in \[2, 100\]"),
        (
            {"k": 5, "subset": 9},
            r"subset = 9: must be a whole number in \[10, 60000\], at least 2 images for each "
            r"of the k = 5 folds",
        ),
        ({"k": 5, "subset": 4}, r"subset = 4: must be a whole number in \[10, 60000\]"),
        (
            {"batch_size": -1},
            r"batch_size = -1: must be a whole number >= 1, or 0 or null for full batch",
        ),
        ({"max_epochs": 0}, r"max_epochs = 0: must be a whole number in \[1, 100000\]"),
        ({"max_epochs": 10**12}, r"max_epochs = 1000000000000: must be a whole number in \[1,"),
        ({"patience": 0}, r"patience = 0: must be a whole number in \[1, 100000\]"),
        ({"patience": 10**300}, r"patience = 1000\d+: must be a whole number in \[1, 100000\]"),
        (
            {"n_units_l0": 8192, "n_units_l1": 8192, "k": 5},
            r"n_units_l0, n_units_l1, ... and k: the k = 5 networks of 8192-8192 hidden units "
            r"would hold 368,\d{3},\d{3} parameters, more than 250,000,000; use fewer units",
        ),
        ({"epochs": 3}, r"unknown parameter 'epochs': known are n_units_l0"),
    ],
)
def test_a_wrong_parameter_is_named_with_what_it_accepts(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        TrainConfig().with_params(params)


@pytest.mark.parametrize(
    "params",
    [
        {"dropout": 0.0},
        {"dropout": 0.99999},  # kept probability 2^-15, not 0: the scale stays finite
        {"dropout": 1e-7},  # kept probability 1 − 2^-15, which int16 can hold
        {"lr": 5e-324},
        {"lr": 10.0, "optimizer": "adamax"},
        {"weight_decay": 10.0},
        {"weight_decay": 0},
        {"k": 2, "subset": 4},
        {"k": 100},
        {"n_units_l0": 8192, "k": 5},  # one layer of the most units: 33 M parameters
        {"batch_size": 1},
        {"batch_size": 10**300},  # past the training rows: full batch
        {"max_epochs": 1, "patience": 1},
    ],
    ids=str,
)
def test_the_ends_of_every_range_are_accepted_and_train(params: dict) -> None:
    config = TrainConfig(hidden=(8, 4), k=3, subset=None, max_epochs=2).with_params(params)
    result = train_kfold(config, synthetic_data(max(2 * config.k, 20)))
    assert len(result.fold_accuracies) == config.k
    assert all(0.0 <= a <= 1.0 for a in result.fold_accuracies)
    assert result.epochs_run == [config.max_epochs] * config.k or result.diverged


def test_config_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0  # type: ignore[misc]


def test_presets_hold_the_designs_settings() -> None:
    quick, seed = PRESETS["quick"].defaults, PRESETS["seed"].defaults
    assert (quick.subset, quick.k, quick.full_batch) == (12_000, 3, False)
    assert (seed.subset, seed.k, seed.full_batch, seed.max_epochs) == (None, 5, True, 2000)
    assert PRESETS["seed"].n_trials == 200
    with pytest.raises(ConfigError, match="preset 'huge': must be one of quick, seed"):
        get_preset("huge")
