"""The benchmark's own parts work and its stored data is current. No timing is asserted:
timings are recorded in benchmarks/README.md, never tested."""

from __future__ import annotations

import dataclasses
import json

import torch

from benchmarks.speed import DRAWS_FILE, REPORT_BEST, gemm_floor, naive_kfold, parameters
from model.config import TrainConfig
from study.presets import PRESETS
from study.sampler import draw_params
from tests.conftest import synthetic_data


def test_stored_seed_draws_are_what_the_sampler_draws() -> None:
    stored = [json.loads(line) for line in DRAWS_FILE.read_text().splitlines()]
    preset = PRESETS["seed"]
    assert stored == draw_params(preset.space, preset.defaults, len(stored), 0)


def test_naive_reference_trains_every_fold() -> None:
    config = TrainConfig(hidden=(32, 16), dropout=0.0, batch_size=50, k=3, lr=3e-3)
    torch.manual_seed(0)  # the naive way draws its initial weights from the global stream
    accuracy = naive_kfold(config, synthetic_data(600), epochs=10)
    assert 0.5 < accuracy <= 1.0  # 10 classes: chance is 0.1


def test_gemm_floor_runs_the_products_of_an_epoch() -> None:
    config = dataclasses.replace(REPORT_BEST, hidden=(8, 4), batch_size=10, k=2)
    assert gemm_floor(config, n_train=35, n_val=9, device=torch.device("cpu")) > 0
    assert parameters((249, 36)) == 784 * 249 + 249 + 249 * 36 + 36 + 36 * 10 + 10
