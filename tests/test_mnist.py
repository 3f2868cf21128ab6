"""Integration: the trainer and the CLI on real MNIST (fetched by `make test`)."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch

from model.data import Mnist, default_root, to_device
from model.kfold import train_kfold
from study.presets import DEFAULT_PRESET, PRESETS
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
    passed = {"subset": 1200, "max_epochs": 2, "n_units_l0": 32, "n_units_l1": 16}
    proc = run_cli(
        "train",
        "--device",
        "cpu",
        "--json",
        "--root",
        str(default_root().resolve()),
        "--params",
        json.dumps(passed),
    )
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()  # one JSON object and nothing else on stdout
    out = json.loads(line)
    # Exactly the fields docs/training.md's "Parameters" section lists for `--json`.
    assert set(out) == {
        "fold_accuracies", "mean_accuracy", "std_accuracy", "fold_losses", "best_epochs",
        "epochs_run", "seconds", "device", "diverged", "halted", "params",
    }  # fmt: skip

    # params: the default preset's defaults (train's, without --preset) with what was
    # passed laid over them, in the study's names.
    expected_params = PRESETS[DEFAULT_PRESET].defaults.params() | passed
    assert out["params"] == expected_params
    k = expected_params["k"]
    assert expected_params["patience"] > passed["max_epochs"]  # so no fold may stop early
    fold_size = passed["subset"] // k  # every fold validates on as many images

    accuracies = out["fold_accuracies"]
    assert len(accuracies) == k
    for accuracy in accuracies:
        assert 0.0 <= accuracy <= 1.0
        # A share of the fold's images: a whole number of them were right.
        assert accuracy * fold_size == pytest.approx(round(accuracy * fold_size), abs=1e-3)
    assert out["mean_accuracy"] == pytest.approx(statistics.fmean(accuracies))
    assert out["std_accuracy"] == pytest.approx(statistics.pstdev(accuracies), abs=1e-12)
    # Two epochs of mini-batches on 800 real digits already beat chance (0.1) clearly; the
    # margin leaves room for other seeds and kernels, and still catches no learning at all.
    assert out["mean_accuracy"] > 0.2

    losses = out["fold_losses"]
    assert len(losses) == k
    assert all(isinstance(x, float) and math.isfinite(x) and x > 0 for x in losses)

    # Every fold runs all its epochs, and its best epoch is one it ran (1-based).
    assert out["epochs_run"] == [passed["max_epochs"]] * k
    assert len(out["best_epochs"]) == k
    for best, ran in zip(out["best_epochs"], out["epochs_run"], strict=True):
        assert isinstance(best, int) and 1 <= best <= ran

    assert isinstance(out["seconds"], float) and out["seconds"] > 0
    assert out["device"] == "cpu"
    assert out["diverged"] is None
    assert out["halted"] is False
