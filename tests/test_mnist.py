"""Integration: the trainer and the CLI on real MNIST (fetched by `make test`)."""

from __future__ import annotations

import dataclasses
import json

import torch

from model.data import Mnist, default_root, to_device
from model.kfold import train_kfold
from study.presets import PRESETS
from tests.test_cli import run_cli


def test_mnist_is_the_official_split(mnist: Mnist) -> None:
    assert mnist.train_images.shape == (60_000, 28, 28)
    assert mnist.test_images.shape == (10_000, 28, 28)
    assert mnist.train_images.dtype == torch.uint8
    assert mnist.test_labels.bincount().tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert mnist.train_labels.bincount().tolist() == [
        5923,
        6742,
        5958,
        6131,
        5842,
        5421,
        5918,
        6265,
        5851,
        5949,
    ]


def test_quick_preset_reaches_90_percent_mean_validation_accuracy(mnist: Mnist) -> None:
    data = to_device(mnist.train_images, mnist.train_labels, "cpu")
    result = train_kfold(PRESETS["quick"].defaults, data)
    assert result.diverged is None
    assert len(result.fold_accuracies) == 3
    assert result.mean_accuracy >= 0.90, result.summary()


def test_full_batch_training_on_real_images_improves_every_fold(mnist: Mnist) -> None:
    data = to_device(mnist.train_images, mnist.train_labels, "cpu")
    config = dataclasses.replace(PRESETS["seed"].defaults, subset=3000, max_epochs=15)
    result = train_kfold(config, data)
    for curve in result.curves["val_loss"]:
        assert min(curve) < curve[0]
    assert result.mean_accuracy > 0.8


def test_train_json_prints_the_documented_fields(mnist: Mnist) -> None:
    proc = run_cli(
        "train",
        "--device",
        "cpu",
        "--json",
        "--root",
        str(default_root().resolve()),
        "--params",
        '{"subset": 1200, "max_epochs": 2, "n_units_l0": 32, "n_units_l1": 16}',
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert len(out["fold_accuracies"]) == 3
    assert out["epochs_run"] == [2, 2, 2]
    assert 0.0 < out["mean_accuracy"] <= 1.0
    assert set(out) >= {"fold_accuracies", "mean_accuracy", "best_epochs", "epochs_run", "seconds"}
    assert out["params"]["n_units_l0"] == 32
