"""The benchmark's own parts work and its stored data is current. No timing is asserted:
timings are recorded in benchmarks/README.md, never tested."""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

from benchmarks import paths, speed, study_record
from benchmarks.speed import (
    DRAWS_FILE,
    FORWARD,
    INPUT_GRAD,
    REPORT_BEST,
    VALIDATION,
    WEIGHT_GRAD,
    Product,
    epoch_products,
    gemm_floor,
    naive_kfold,
)
from model.config import TrainConfig, parameter_count
from model.data import Mnist, default_root
from study.budget import count_trials
from study.database import open_storage
from study.presets import PRESETS
from study.retrain import retrain_best
from study.sampler import draw_params
from study.studies import create_or_resume, load_study
from study.worker import WorkerOptions, run_worker
from tests.conftest import synthetic_data
from tests.rounding import assert_same_draws


def test_stored_seed_draws_are_what_the_sampler_draws() -> None:
    stored = [json.loads(line) for line in DRAWS_FILE.read_text().splitlines()]
    preset = PRESETS["seed"]
    # Written on another CPU: within its rounding (tests/rounding.py, 5).
    assert_same_draws(draw_params(preset.space, preset.defaults, len(stored), 0), stored)


def test_naive_reference_trains_every_fold() -> None:
    config = TrainConfig(hidden=(32, 16), dropout=0.0, batch_size=50, k=3, lr=3e-3)
    torch.manual_seed(0)  # the naive way draws its initial weights from the global stream
    accuracy = naive_kfold(config, synthetic_data(600), epochs=10)
    assert 0.5 < accuracy <= 1.0  # 10 classes: chance is 0.1


def expected_shapes(
    config: TrainConfig, steps: list[int], n_val: int
) -> dict[str, Counter[tuple[int, int, int]]]:
    """Per kind, the (m, k, n) of each product an epoch needs, worked out from the
    network's layers: x (rows × fan_in) times W (fan_in × fan_out) forward; xᵀ times the
    output's gradient g (rows × fan_out) for W's gradient; g times Wᵀ for the input's
    gradient, which the first layer (the pixels) does not need; the validation forward."""
    sizes = [28 * 28, *config.hidden, 10]
    fans = list(itertools.pairwise(sizes))
    shapes: dict[str, Counter[tuple[int, int, int]]] = {
        kind: Counter() for kind in (FORWARD, WEIGHT_GRAD, INPUT_GRAD, VALIDATION)
    }
    for _ in range(config.k):  # k networks, each doing all of it
        for rows in steps:
            shapes[FORWARD].update((rows, a, b) for a, b in fans)
            shapes[WEIGHT_GRAD].update((a, rows, b) for a, b in fans)
            shapes[INPUT_GRAD].update((rows, b, a) for a, b in fans[1:])
        shapes[VALIDATION].update((n_val, a, b) for a, b in fans)
    return shapes


def shapes_by_kind(products: list[Product]) -> dict[str, Counter[tuple[int, int, int]]]:
    shapes: dict[str, Counter[tuple[int, int, int]]] = {
        kind: Counter() for kind in (FORWARD, WEIGHT_GRAD, INPUT_GRAD, VALIDATION)
    }
    for p in products:
        shapes[p.kind][(p.m, p.k, p.n)] += 1
    return shapes


def test_gemm_floor_lists_the_products_of_an_epoch() -> None:
    config = dataclasses.replace(REPORT_BEST, hidden=(8, 4), batch_size=10, k=2)
    n_train, n_val = 35, 9  # 3 batches of 10 and a short one of 5
    products = epoch_products(config, n_train, n_val)
    # Per kind: one product per network, layer and step (4 steps; 3 layers, the first
    # without an input gradient), and one validation forward per network and layer.
    kinds = Counter(p.kind for p in products)
    assert kinds == {FORWARD: 2 * 4 * 3, WEIGHT_GRAD: 2 * 4 * 3, INPUT_GRAD: 2 * 4 * 2,
                     VALIDATION: 2 * 3}  # fmt: skip
    # Multiply-adds: every training row goes through each layer's fan_in × fan_out
    # forward and weight gradient, and all but the first layer's input gradient; every
    # validation row through the forward; all of it for k = 2 networks.
    per_row = 784 * 8 + 8 * 4 + 4 * 10
    input_grad_per_row = 8 * 4 + 4 * 10
    total = 2 * (n_train * (2 * per_row + input_grad_per_row) + n_val * per_row)
    assert sum(p.multiply_adds for p in products) == total
    # Each network has its own layers, each used once a step.
    assert Counter((p.net, p.layer) for p in products if p.kind == FORWARD) == {
        (net, layer): 4 for net in range(2) for layer in range(3)
    }
    # And the shapes themselves, the short last batch included.
    assert shapes_by_kind(products) == expected_shapes(config, [10, 10, 10, 5], n_val)

    # Full batch: one step of all the training rows; a multiple of the batch size: no
    # empty last step.
    full = epoch_products(dataclasses.replace(config, batch_size=None), n_train, n_val)
    assert shapes_by_kind(full) == expected_shapes(config, [n_train], n_val)
    even = epoch_products(config, 30, n_val)
    assert shapes_by_kind(even) == expected_shapes(config, [10, 10, 10], n_val)


def test_gemm_floor_times_exactly_the_listed_products(monkeypatch: pytest.MonkeyPatch) -> None:
    config = dataclasses.replace(REPORT_BEST, hidden=(8, 4), batch_size=10, k=2)
    products = epoch_products(config, 35, 9)
    shapes: list[tuple[tuple[int, ...], ...]] = []
    right_operands: list[int] = []
    mm = torch.mm

    def recording_mm(a: torch.Tensor, b: torch.Tensor, *, out: torch.Tensor) -> torch.Tensor:
        shapes.append((tuple(a.shape), tuple(b.shape), tuple(out.shape)))
        right_operands.append(b.data_ptr())
        return mm(a, b, out=out)

    monkeypatch.setattr(torch, "mm", recording_mm)
    seconds = gemm_floor(config, n_train=35, n_val=9, device=torch.device("cpu"))
    assert isinstance(seconds, float)
    # The timed loop multiplies what the list says, in its order, and nothing else.
    assert shapes == [((p.m, p.k), (p.k, p.n), (p.m, p.n)) for p in products]
    # k distinct networks: a forward product's weights are its own network's layer's,
    # the same at every step, and no other layer's.
    weights: dict[tuple[int, int], set[int]] = {}
    for p, pointer in zip(products, right_operands, strict=True):
        if p.kind == FORWARD:
            weights.setdefault((p.net, p.layer), set()).add(pointer)
    assert all(len(pointers) == 1 for pointers in weights.values())
    assert len(set.union(*weights.values())) == 2 * 3


def test_parameters_counts_weights_and_biases() -> None:
    assert parameter_count((249, 36)) == 784 * 249 + 249 + 249 * 36 + 36 + 36 * 10 + 10


# --- the record of a study run (benchmarks/study_record.py) ---------------------------

STUDY = "mnist-tiny"


def storage_url(folder: Path) -> str:
    return f"sqlite:///{folder / 'optuna.db'}"


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory: pytest.TempPathFactory, mnist: Mnist) -> Path:
    """A real study of the `tiny` preset, three trials run by the study's own worker on the
    CPU, then its best trial retrained; the folder holding its optuna.db and runs/."""
    folder = tmp_path_factory.mktemp("tiny-study")
    url = storage_url(folder)
    create_or_resume(open_storage(url, create=True), STUDY, PRESETS["tiny"], budget=3, seed=1)
    # The worker takes over these signals, as a worker process should; pytest keeps its own.
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        options = WorkerOptions(storage=url, study=STUDY, device="cpu", data_root=default_root())
        assert run_worker(options, log=lambda line: None) == 3
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    study = load_study(open_storage(url, heartbeat=None), STUDY)
    retrain_best(study, out_dir=folder / "runs" / STUDY, device=torch.device("cpu"),
                 data_root=default_root())  # fmt: skip
    return folder


def record_of(folder: Path, out: Path, *args: str) -> dict:
    assert study_record.main(["--storage", storage_url(folder), "--out", str(out), *args]) == 0
    [path] = out.iterdir()
    today = datetime.datetime.now(datetime.timezone.utc).date()
    # The preset, then the device (the trials ran on the CPU), then the UTC date.
    assert path.name == f"tiny-study-cpu-{today.isoformat()}.json"
    return json.loads(path.read_text())


def test_record_of_a_finished_study_holds_its_trials_rate_and_results(
    tiny_study: Path, tmp_path: Path
) -> None:
    record = record_of(tiny_study, tmp_path, "--wall-seconds", "12.5", "--workers", "1")
    study = load_study(open_storage(storage_url(tiny_study), heartbeat=None), STUDY)
    metrics = json.loads((tiny_study / "runs" / STUDY / "metrics.json").read_text())
    assert tuple(record) == study_record.FIELDS
    assert record["trials_finished"] == 3
    assert record["trials_complete"] == count_trials(study).complete
    assert record["budget"] == 3
    assert record["partial"] is False
    assert record["wall_seconds"] == 12.5
    assert record["trials_per_minute"] == 3 / 12.5 * 60
    assert record["best_cv_accuracy"] == study.best_value
    assert record["best_trial"] == {
        "number": study.best_trial.number,
        "params": study.best_trial.params,
    }
    assert record["test_accuracy"] == metrics["test_accuracy"]
    assert record["retrain_epochs"] == metrics["epochs"]
    # `tiny` trains at most 3 epochs a fold; each trial's folds averaged, then the trials.
    per_trial = [statistics.fmean(t.user_attrs["epochs_run"]) for t in study.trials]
    assert record["mean_epochs"] == statistics.fmean(per_trial)
    assert 1 <= record["mean_epochs"] <= 3
    assert record["precision"] == "fp32"  # the CPU's default
    assert record["torch"] == torch.__version__
    assert (record["workers"], record["trials_per_worker"]) == (1, 1)
    assert record["cuda_graphs"] is False
    assert re.fullmatch(r".+, \d+ cores", record["device"])


def test_record_of_a_study_stopped_before_its_budget_says_partial_and_does_not_extrapolate(
    tiny_study: Path, tmp_path: Path
) -> None:
    # The same three trials in a study resumed with a budget of 10: a run that stopped
    # early. The folder is moved, as the check's tar of it is: the metrics still resolve.
    moved = tmp_path / "moved"
    shutil.copytree(tiny_study, moved)
    create_or_resume(open_storage(storage_url(moved)), STUDY, PRESETS["tiny"], budget=10)
    record = record_of(
        moved, tmp_path / "out", "--wall-seconds", "30", "--workers", "2",
        "--trials-per-worker", "4", "--cuda-graphs", "1",
    )  # fmt: skip
    assert record["partial"] is True
    assert (record["budget"], record["trials_finished"]) == (10, 3)
    assert record["trials_per_minute"] == 3 / 30 * 60
    assert (record["workers"], record["trials_per_worker"]) == (2, 4)
    assert record["cuda_graphs"] is True
    metrics = json.loads((tiny_study / "runs" / STUDY / "metrics.json").read_text())
    assert record["test_accuracy"] == metrics["test_accuracy"]


def test_a_study_resumed_run_after_run_is_recorded_per_run_and_adds_up_its_runs(
    tiny_study: Path, tmp_path: Path
) -> None:
    """The seed study crosses device leases: each run's record counts its own trials
    against its own wall time, logs itself in the study (so the next lease's database has
    it), adds up every run's wall time, and counts the work its interrupted trials lost."""
    moved = tmp_path / "moved"
    shutil.copytree(tiny_study, moved)
    url = storage_url(moved)
    create_or_resume(open_storage(url), STUDY, PRESETS["tiny"], budget=10)
    first_started = datetime.datetime(2026, 12, 1, 10, 0, 0).timestamp()
    first = record_of(
        moved, tmp_path / "first", "--wall-seconds", "40", "--workers", "2",
        "--finished-before", "1", "--run-started", str(first_started),
    )  # fmt: skip
    assert (first["trials_before"], first["trials_this_run"]) == (1, 2)
    assert first["trials_per_minute"] == 2 / 40 * 60
    assert first["wall_seconds_all_runs"] == 40
    assert [r["trials_after"] for r in first["runs"]] == [3]

    # The second run: one trial interrupted after 7.5 s of training (failed, queued
    # again), and one more finished.
    study = load_study(open_storage(url), STUDY)
    start = datetime.datetime.now().replace(microsecond=0)
    study.add_trial(
        optuna.trial.FrozenTrial(
            number=0, state=TrialState.FAIL, value=None, values=None,
            datetime_start=start, datetime_complete=start + datetime.timedelta(seconds=7.5),
            params={}, distributions={}, user_attrs={}, system_attrs={},
            intermediate_values={}, trial_id=0,
        )
    )  # fmt: skip
    second = record_of(
        moved, tmp_path / "second", "--wall-seconds", "25", "--workers", "2",
        "--finished-before", "3", "--run-started", str(start.timestamp() - 1),
    )  # fmt: skip
    assert (second["trials_before"], second["trials_this_run"]) == (3, 1)
    assert second["trial_seconds_lost"] == 7.5
    assert second["wall_seconds_all_runs"] == 65
    assert [(r["trials_before"], r["trials_after"]) for r in second["runs"]] == [(1, 3), (3, 4)]
    # The first run's log entry is its own: the later failure is not counted in it.
    assert second["runs"][0]["trial_seconds_lost"] == 0
    assert tuple(second) == study_record.FIELDS
    # A count of trials the study never had is refused in one line, nothing written.
    assert study_record.main(["--storage", url, "--out", str(tmp_path / "x"),
                              "--wall-seconds", "1", "--workers", "1",
                              "--finished-before", "9"]) == 2  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_record_refuses_a_wall_time_that_is_not_positive_in_one_line(
    tiny_study: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["--storage", storage_url(tiny_study), "--out", str(tmp_path / "out")]
    assert study_record.main([*args, "--wall-seconds", "0", "--workers", "1"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "python -m benchmarks.study_record: error: --wall-seconds 0: must be greater than 0"
    ]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H100 80GB HBM3", "h100"),
        ("NVIDIA H200", "h200"),
        ("NVIDIA A100-SXM4-80GB", "a100"),
        ("NVIDIA L40S", "l40s"),
        ("NVIDIA GeForce RTX 4090", "geforce-rtx-4090"),
    ],
)
def test_gpu_slug_is_the_model_of_the_gpu(name: str, slug: str) -> None:
    assert study_record.gpu_slug(name) == slug


def test_stacking_benchmark_times_each_way_and_counts_only_unpadded_flops(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The stacking rows on tiny protocols: every way present, the rates and useful FLOPs
    derived from the trials' own widths (the stack pads them to the widest)."""
    monkeypatch.setattr(
        speed,
        "STACK_PROTOCOLS",
        {
            "tiny full batch": TrainConfig(subset=300, batch_size=None, k=3),
            "tiny mini-batch": TrainConfig(subset=300, batch_size=50, k=3),
        },
    )
    data = synthetic_data(600)
    rows = speed.run_stacking(torch.device("cpu"), data, [1, 3], epochs=2, rounds=1, graphs=True)
    assert [(r["protocol"], r["trials"]) for r in rows] == [
        ("tiny full batch", 1), ("tiny full batch", 3),
        ("tiny mini-batch", 1), ("tiny mini-batch", 3),
    ]  # fmt: skip
    draws = speed.seed_draws(3)
    for row in rows:
        b = row["trials"]
        ways = {"stacked", "one at a time"} | ({"naive (first trial)"} if b == 1 else set())
        assert {k for k, v in row.items() if isinstance(v, dict)} == ways  # no graphs on CPU
        n_train = 200  # 300 images, k = 3
        useful = sum(
            6 * n_train * parameter_count((p["n_units_l0"], p["n_units_l1"])) * 3 * 2
            for p in draws[:b]
        )
        for way in ("stacked", "one at a time"):
            r = row[way]
            assert r["trials_per_s"] == pytest.approx(b / r["seconds"])
            assert r["useful_flop_per_s"] == pytest.approx(useful / r["seconds"])
        assert row["stacked_vs_one_at_a_time"] == pytest.approx(
            row["one at a time"]["seconds"] / row["stacked"]["seconds"]
        )


def test_the_benchmarks_file_keeps_every_finished_case_when_a_later_one_is_cut_short(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mnist: Mnist
) -> None:
    """The GPU check stops the benchmarks at their time limit: what was measured by then
    must be in the file, not lost with the rest."""
    monkeypatch.setattr(
        speed, "STACK_PROTOCOLS", {"tiny full batch": TrainConfig(subset=300, batch_size=None, k=3)}
    )
    timed = speed._alternate
    calls = []

    def cut_short(*args: object, **kwargs: object) -> dict[str, float]:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # as the time limit's signal would
        return timed(*args, **kwargs)

    monkeypatch.setattr(speed, "_alternate", cut_short)
    out = tmp_path / "benchmarks.json"
    args = ["stacking", "--device", "cpu", "--stack-sizes", "1,2", "--stack-epochs", "1",
            "--rounds", "1", "--json", str(out)]  # fmt: skip
    with pytest.raises(KeyboardInterrupt):
        speed.main(args)
    written = json.loads(out.read_text())
    assert [(r["protocol"], r["trials"]) for r in written["stacking"]] == [("tiny full batch", 1)]
    assert written["stacking"][0]["stacked"]["seconds"] > 0
    assert [p.name for p in tmp_path.iterdir()] == ["benchmarks.json"]  # no partial left


def test_a_result_record_keeps_the_metrics_and_names_its_file_by_what_device_and_date(
    tmp_path: Path,
) -> None:
    from benchmarks.result_record import main

    metrics = {"params": {"lr": 0.001}, "test_accuracy": 0.9861, "device": "cpu", "epochs": 40}
    source = tmp_path / "metrics.json"
    source.write_text(json.dumps(metrics))
    assert main([str(source), "--what", "single-2x1024", "--out", str(tmp_path / "results")]) == 0
    today = datetime.datetime.now(datetime.timezone.utc).date().isoformat()
    written = tmp_path / "results" / f"single-2x1024-cpu-{today}.json"
    record = json.loads(written.read_text())
    assert next(iter(record)) == "test_accuracy" and record["test_accuracy"] == 0.9861
    assert {k: record[k] for k in metrics} == metrics
    assert "cores" in record["machine"] and record["torch"]
    source.write_text(json.dumps({"epochs": 3}))
    assert main([str(source), "--what", "x", "--out", str(tmp_path / "other")]) == 2
    assert main([str(source), "--what", "Bad Name", "--out", str(tmp_path / "other")]) == 2
    assert not (tmp_path / "other").exists()


REPO = Path(__file__).resolve().parent.parent
GPU_CHECK = REPO / "benchmarks" / "gpu_check.sh"


def _gpu_check(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(GPU_CHECK), str(out)],
        env={**os.environ, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Today's trainer as the device gets it, made by the Makefile's own target from this
    clone's history (`make gpu-baseline`), in a tmp folder."""
    if not (REPO / ".git").exists():
        pytest.skip("not a git clone: the baseline is made from its history")
    folder = tmp_path_factory.mktemp("baseline") / ".baseline"
    done = subprocess.run(
        ["make", "-s", "-C", str(REPO), "gpu-baseline", f"GPU_BASELINE_DIR={folder}"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (folder / "model" / "kfold.py").is_file() and (folder / "tests").is_dir()
    assert not (folder / ".git").exists() and not (folder / "study").exists()
    return folder


def test_gpu_check_carries_a_study_across_calls_and_retrains_it_once_it_is_whole(
    tmp_path: Path, mnist: Mnist, baseline: Path
) -> None:
    """Three calls, as three device leases would make them: each resumes the database the
    last one handed back (the session commits it between them), adds up the trials with
    none repeated and says how many the call before had finished; the call that finds the
    study whole retrains its best trial and brings back the report's pictures. The first
    begins with the side-by-side of today's trainer and the checkout's, at a CPU's sizes,
    and runs the study on the path it chose; the second runs on today's, the third on the
    new one, each as named."""
    committed = tmp_path / "results" / "optuna.db"
    committed.parent.mkdir()
    env = {"GPU_CHECK_STUDIES": "seed", "SEED_STUDY_PRESET": "tiny", "SEED_STUDY_WORKERS": "1",
           "SEED_STUDY_TRIALS_PER_WORKER": "2", "SEED_STUDY_DB": str(committed),
           "GPU_CHECK_BASELINE": str(baseline)}  # fmt: skip
    records, summaries = [], []
    # 155 s: a run's call then leaves less than the 150 s that a retrain is given (the
    # set-up, the workers' start and six trials take more than 5 s), so the retrain waits
    # for the third call, as it does when a lease's call ends with the study whole.
    calls = (("6", "155", "auto"), ("12", "155", "baseline"), ("", "200", "new"))
    for call, (budget, seconds, path) in enumerate(calls):
        out = tmp_path / f"call{call}"
        done = _gpu_check(
            out, SEED_STUDY_BUDGET=budget, GPU_CHECK_SECONDS=seconds, GPU_CHECK_PATH=path, **env
        )  # fmt: skip
        assert done.returncode == 0, done.stdout + (out / "studies.txt").read_text()
        shutil.copy(out / "seed-study.db", committed)  # what the session commits
        records += [json.loads(p.read_text()) for p in out.glob("tiny-study-*.json")]
        summaries.append(done.stdout)
    first = tmp_path / "call0"
    side = json.loads((first / "paths.json").read_text())
    assert side["small"] and side["commit_of_baseline"] and side["torch"] == torch.__version__
    for label, root in (("baseline", baseline), ("new", REPO)):
        record = side["paths"][label]
        assert record["status"] == "ok", record
        assert Path(record["model"]) == (root / "model").resolve()  # each its own trainer
        assert record["stack"]["trials"] == 8 and record["stack"]["networks"] == 40
        for way in ("eager_epoch", "eager"):
            assert record[way]["ms_per_epoch"] > 0 and record[way]["useful_flop_per_s"] > 0
        assert record["graphs"] is None  # CUDA graphs are a GPU's
        assert record["ceilings"]["gemm"]["fp32"] > 0
        assert record["ceilings"]["copy"]["gb_per_s"] > 0
    for way in ("eager_epoch", "eager"):
        assert side["speedup"][way] == pytest.approx(
            side["paths"]["baseline"][way]["ms_per_epoch"]
            / side["paths"]["new"][way]["ms_per_epoch"]
        )
    verdict = side["agreement"]
    assert verdict["checked"] and verdict["agreed"] and verdict["differ"] == []
    assert verdict["folds"] == 40
    assert verdict["same_best_epoch"] + verdict["within_a_tie"] == 40
    assert 0 < verdict["stopped_early"]["baseline"] < 40  # early stopping was reached
    assert 0 <= verdict["max_relative_loss_difference"] < 1e-3
    chosen = {"new": REPO, "baseline": baseline}
    assert side["choice"] in chosen
    # The summary repeats the table's lines, the verdict and the choice.
    assert "agreement (fp32" in summaries[0] and f"choice: {side['why']}\n" in summaries[0]
    assert re.search(r"^  eager, as trained +[\d.]+ +[\d.]+ +[\d.]+×$", summaries[0], re.M)
    for call, path in enumerate((side["choice"], "baseline", "new")):
        line = f"the studies run on the {path} path: model/ from {chosen[path] / 'model'}\n"
        assert line in summaries[call]
        assert ("side by side: 8 seed draws" in summaries[call]) == (call == 0)
    # The side-by-side's file counts in the 8 that come back: 5 here.
    *names, record_file = sorted(p.name for p in first.iterdir())
    assert names == ["check.txt", "paths.json", "seed-study.db", "studies.txt"]
    assert re.fullmatch(r"tiny-study-cpu-\d{4}-\d\d-\d\d\.json", record_file)
    assert [(r["trials_before"], r["trials_this_run"], r["budget"]) for r in records] == [
        (0, 6, 6), (6, 6, 12),
    ]  # fmt: skip
    assert [(r["trials_before"], r["trials_after"]) for r in records[1]["runs"]] == [
        (0, 6), (6, 12),
    ]  # fmt: skip
    assert records[1]["wall_seconds_all_runs"] == pytest.approx(
        records[0]["wall_seconds"] + records[1]["wall_seconds"]
    )
    assert all(r["trial_seconds_lost"] == 0 for r in records)
    study = load_study(open_storage(f"sqlite:///{committed}", heartbeat=None), "mnist-tiny")
    finished = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert sorted(t.number for t in finished) == list(range(12))
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 12
    # The third call found it whole: a retrain of the best trial, and no run to record.
    assert study.user_attrs["retrained_trial"] == study.best_trial.number
    third = tmp_path / "call2"
    assert sorted(p.name for p in third.iterdir()) == [
        "check.txt", "seed-study.db", "seed-study.tar", "studies.txt",
    ]  # fmt: skip
    studies = (third / "studies.txt").read_text()
    assert "resumed from" in studies and "12/12 trials finished" in studies
    assert "$ mnist-study run" not in studies
    with tarfile.open(third / "seed-study.tar") as tar:
        names = set(tar.getnames())
    assert {"runs/mnist-tiny/metrics.json", "reports/mnist-tiny/receptive_fields.png",
            "reports/mnist-tiny/gradient_ascent.png"} <= names  # fmt: skip


def test_gpu_check_starts_the_wide_study_only_after_the_seed_study_is_whole(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    done = _gpu_check(
        out, SEED_STUDY_DB=str(tmp_path / "none.db"), GPU_CHECK_SECONDS="30"
    )  # fmt: skip
    assert done.returncode == 1  # the seed study had no time to run
    studies = (out / "studies.txt").read_text()
    assert re.search(r"^seed study not run: \d+ s left, it needs 90$", studies, re.M), studies
    # Nor the side-by-side, which leaves the seed study the 90 s it needs at the least.
    assert re.search(r"^side-by-side not run: \d+ s left; the studies run on", studies, re.M)
    assert "wide study not run: the seed study is not yet whole and retrained" in studies
    assert "$ mnist-study" not in studies
    assert sorted(p.name for p in out.iterdir()) == ["check.txt", "studies.txt"]
    assert "wide study not run" in done.stdout  # the summary repeats it


def test_gpu_check_refuses_an_unknown_study_or_call_before_anything_runs(tmp_path: Path) -> None:
    done = _gpu_check(tmp_path / "out", GPU_CHECK_STUDIES="seed huge")
    assert done.returncode == 2
    assert done.stderr.strip() == "GPU_CHECK_STUDIES: no study 'huge' (seed, wide)"
    done = _gpu_check(tmp_path / "out", GPU_CHECK_CALL="everything")
    assert done.returncode == 2
    assert done.stderr.strip() == "GPU_CHECK_CALL: no call 'everything' (studies, tests)"
    done = _gpu_check(tmp_path / "out", GPU_CHECK_PATH="fastest")
    assert done.returncode == 2
    assert done.stderr.strip() == "GPU_CHECK_PATH: no path 'fastest' (auto, new, baseline)"
    done = _gpu_check(
        tmp_path / "out", GPU_CHECK_PATH="baseline", GPU_CHECK_BASELINE=str(tmp_path / "none")
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.strip() == (
        f"GPU_CHECK_PATH=baseline: no model/ in {tmp_path / 'none'} (make gpu-baseline)"
    )
    assert not (tmp_path / "out").exists()


# --- the side-by-side of today's trainer and the new one (benchmarks/paths.py) --------


def agreement_record(best: list[int], run: list[int], val_loss: list[list[float]]) -> dict:
    """A path's record with one trial's agreement run (k = len(best)), capped at 20 epochs."""
    losses = [curve[b - 1] for curve, b in zip(val_loss, best, strict=True)]
    trial = {"best_epochs": best, "epochs_run": run, "diverged": None, "val_loss": val_loss,
             "fold_losses": losses}  # fmt: skip
    run_record = {"images": 100, "max_epochs": 20, "patience": 2, "trials": [trial]}
    return {"status": "ok", "agreement_run": run_record, "eager": {"ms_per_epoch": 10.0}}


TODAY_LOSSES = [[2.0, 1.5, 1.2, 1.20001, 1.3, 1.4], [2.0, 1.0, 1.1, 1.2, 1.3, 1.4]]


def test_side_by_side_agreement_allows_a_best_epoch_moved_only_by_a_tie_of_today_s_losses() -> None:
    today = agreement_record([3, 2], [5, 4], TODAY_LOSSES)
    # Fold 0 broke the tie of epochs 3 and 4 the other way (1.2 against 1.20001).
    new = agreement_record([4, 2], [6, 4], [[0.0] * 6, [2.0, 1.0]])
    verdict = paths.agreement(today, new)
    assert verdict["agreed"] and verdict["within_a_tie"] == 1 and verdict["same_best_epoch"] == 1
    assert verdict["stopped_early"] == {"baseline": 2, "new": 2}
    # Epochs 2 and 3 of fold 1 are no tie; nor is the same best epoch stopped elsewhere.
    for best, run in (([3, 3], [5, 5]), ([3, 2], [5, 9])):
        verdict = paths.agreement(today, agreement_record(best, run, TODAY_LOSSES))
        assert not verdict["agreed"] and len(verdict["differ"]) == 1, verdict
    assert not paths.agreement(today, {"status": "failed (exit 1)"})["checked"]


def test_side_by_side_chooses_the_faster_path_that_agreed_and_today_s_otherwise() -> None:
    agreed = {"checked": True, "agreed": True}
    today = agreement_record([3], [5], TODAY_LOSSES[:1])

    def new(ms: float, status: str = "ok") -> dict:
        return {"status": status, "eager": {"ms_per_epoch": ms}, "graphs": {"ms_per_epoch": None}}

    assert paths.choose({"new": new(5.0)}, None)[0] == "new"  # alone
    assert paths.choose({"baseline": today, "new": new(5.0)}, agreed)[0] == "new"
    assert paths.choose({"baseline": today, "new": new(10.05)}, agreed)[0] == "new"  # noise
    assert paths.choose({"baseline": today, "new": new(12.0)}, agreed)[0] == "baseline"
    disagreed = {"checked": True, "agreed": False, "differ": [{}]}
    assert paths.choose({"baseline": today, "new": new(5.0)}, disagreed) == (
        "baseline", "the new path disagrees in 1 fold(s)",
    )  # fmt: skip
    failed = new(5.0, "timed out after 40 s")
    assert paths.choose({"baseline": today, "new": failed}, None)[0] == "baseline"
    # The graph replays count where they are the faster.
    graphed = {**new(12.0), "graphs": {"ms_per_epoch": 4.0}}
    assert paths.choose({"baseline": today, "new": graphed}, agreed)[0] == "new"


def fake_path(label: str, root: Path, work: Path, flags: list[str], seconds: float) -> dict:
    """`run_path` without its process: a measured path whose agreement run is today's,
    but for a new path under a root named `disagrees`."""
    best = [4] if label == "new" and root.name == "disagrees" else [2]
    record = agreement_record(best, [4 if best == [2] else 6], [[2.0, 1.0, 1.1, 1.2, 1.3, 1.4]])
    return {**record, "label": label, "root": str(root), "machine": "a CPU", "torch": "x",
            "precision": "fp32", "stack": {"trials": 8, "networks": 40, "images": 100,
                                           "first_layers": [120, 438]}}  # fmt: skip


def test_side_by_side_alone_says_so_and_a_disagreeing_new_path_leaves_the_study_on_today_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(paths, "run_path", fake_path)
    choice = tmp_path / "choice"
    assert paths.main(["compare", str(tmp_path / "alone"), "--small", "--choice", str(choice)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("the new path alone") == 1 and choice.read_text() == "new\n"
    assert list(json.loads((tmp_path / "alone" / "paths.json").read_text())["paths"]) == ["new"]
    today = tmp_path / ".baseline"
    (today / "model").mkdir(parents=True)
    (tmp_path / "disagrees" / "model").mkdir(parents=True)
    argv = ["compare", str(tmp_path / "both"), "--small", "--choice", str(choice),
            "--baseline", str(today), "--new", str(tmp_path / "disagrees")]  # fmt: skip
    assert paths.main(argv) == 1
    printed = capsys.readouterr().out
    assert "DISAGREED" in printed and "choice: baseline: the new path disagrees" in printed
    assert choice.read_text() == "baseline\n"


def test_side_by_side_refuses_a_baseline_without_model_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert paths.main(["compare", str(tmp_path / "out"), "--baseline", str(tmp_path)]) == 2
    said = capsys.readouterr().err
    assert said == f"--baseline {tmp_path}: no model/ in it (make gpu-baseline)\n"
    assert paths.main(["compare", str(tmp_path / "out"), "--seconds", "3"]) == 2
    assert not (tmp_path / "out").exists()


# --- pruners for the wide preset (benchmarks/pruners.py) ------------------------------


def test_pruner_benchmark_runs_the_same_study_under_each_pruner_and_its_record_adds_up(
    mnist: Mnist, tmp_path: Path
) -> None:
    from benchmarks import pruners

    out = tmp_path / "pruners.json"
    assert pruners.main(["--quick", "--seeds", "3", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    protocol = pruners.QUICK
    assert record["protocol"] == dataclasses.asdict(protocol)
    assert "threads" in record["machine"] and record["torch"] == torch.__version__
    assert [(r["pruner"], r["seed"]) for r in record["runs"]] == [
        ("none", 3), ("median", 3), ("hyperband", 3),
    ]  # fmt: skip
    cap = protocol.k * protocol.max_epochs
    for run in record["runs"]:
        ends = run["trials_by_end"]
        # The same budget for each, and every trial's end accounted for once.
        assert run["trials"] == protocol.n_trials
        assert [e["number"] for e in ends] == list(range(protocol.n_trials))
        assert run["complete"] + run["pruned"] + run["diverged"] == protocol.n_trials
        assert Counter(e["state"] for e in ends) == {
            s: n for s in ("complete", "pruned", "diverged") if (n := run[s])
        }
        assert run["fold_epoch_cap"] == protocol.n_trials * cap
        assert run["fold_epochs"] == sum(e["fold_epochs"] for e in ends) <= run["fold_epoch_cap"]
        assert [e["fold_epochs_so_far"] for e in ends] == list(
            itertools.accumulate(e["fold_epochs"] for e in ends)
        )
        assert all(0 < e["fold_epochs"] <= cap for e in ends)
        elapsed = [e["elapsed_s"] for e in ends]
        assert elapsed == sorted(elapsed) and 0 < elapsed[-1] <= run["wall_seconds"]
        # The best is the best complete trial's value, and best-so-far climbs to it.
        values = {e["number"]: e["value"] for e in ends if e["state"] == "complete"}
        assert run["best_value"] == max(values.values())
        assert values[run["best_trial"]] == run["best_value"]
        running = [e["best_so_far"] for e in ends if e["best_so_far"] is not None]
        assert running == sorted(running) and running[-1] == run["best_value"]
        assert run["fold_epochs_to_best"] <= run["fold_epochs"]
        # A trial that ran to its end (patience 6 of 6 epochs: none stops early) trained
        # every fold for every epoch.
        for e in ends:
            if e["state"] == "complete":
                assert (e["stopped_at_epoch"], e["fold_epochs"]) == (protocol.max_epochs, cap)
    by_pruner = {r["pruner"]: r for r in record["runs"]}
    assert by_pruner["none"]["pruned"] == 0
    # The pruners act where their settings (study.studies.make_pruner) let them: the
    # median one after 4 complete trials, from epoch 4; Hyperband at its rungs, 2 · 3^r
    # epochs; a pruned trial trained no fold past the epoch it was stopped at.
    median_pruned = [e for e in by_pruner["median"]["trials_by_end"] if e["state"] == "pruned"]
    assert all(e["number"] >= 4 and e["stopped_at_epoch"] >= 4 for e in median_pruned)
    hyperband_pruned = [
        e for e in by_pruner["hyperband"]["trials_by_end"] if e["state"] == "pruned"
    ]
    assert all(e["stopped_at_epoch"] in (2, 6) for e in hyperband_pruned)
    for e in median_pruned + hyperband_pruned:
        assert e["fold_epochs"] <= protocol.k * e["stopped_at_epoch"]
    assert median_pruned or hyperband_pruned, "neither pruner pruned a trial of the quick study"
    # Same sampler and seed: the first trials (drawn from the priors, judged by no pruner
    # yet) are the same configurations with the same results under every pruner.
    firsts = {r["pruner"]: r["trials_by_end"][0] for r in record["runs"]}
    assert len({(e["state"], e["value"]) for e in firsts.values()}) == 1
    # The comparison at common points is read off those same trajectories.
    [comparison] = record["comparisons"]
    assert comparison["at_seconds"] == min(r["wall_seconds"] for r in record["runs"])
    assert comparison["target"] == min(r["best_value"] for r in record["runs"])
    for pruner, c in comparison["pruners"].items():
        run = by_pruner[pruner]
        assert c["seconds_to_target"] <= run["seconds_to_best"]
        assert c["fold_epochs_to_target"] <= run["fold_epochs_to_best"]
        assert c["best_at_seconds"] is None or c["best_at_seconds"] <= run["best_value"]
    fastest = min(record["runs"], key=lambda r: r["wall_seconds"])
    assert comparison["pruners"][fastest["pruner"]]["best_at_seconds"] == fastest["best_value"]


def test_pruner_benchmark_help_names_its_knobs(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import pruners

    with pytest.raises(SystemExit) as exit_:
        pruners.main(["--help"])
    assert exit_.value.code == 0
    usage = capsys.readouterr().out
    assert all(flag in usage for flag in ("--seeds", "--trials", "--quick", "--json"))


# --- a study of many trials (benchmarks/scale.py) -------------------------------------


def test_scale_benchmark_fills_studies_whose_two_counting_rules_agree(tmp_path: Path) -> None:
    from benchmarks import scale

    out = tmp_path / "scale.json"
    assert scale.main(["--quick", "--json", str(out)]) == 0
    record = json.loads(out.read_text())

    assert record["backend"] == "sqlite"
    assert record["machine"] and datetime.datetime.fromisoformat(record["date"])
    assert record["sizes"] == list(scale.QUICK_SIZES)
    assert [r["trials"] for r in record["results"]] == list(scale.QUICK_SIZES)
    joining = {
        "open_storage", "load_study", "study_preset", "recent_stack_seconds",
        "fail_stale_trials", "count_trials", "claim", "first_claim", "steady_claim",
    }  # fmt: skip
    for result in record["results"]:
        n = result["trials"]
        every, tally = result["counts"]["count_every_trial"], result["counts"]["count_trials"]
        assert result["counts_equal"] and every == tally
        # All n trials were written and finished; some of the failed ones were retried.
        assert every["finished"] + every["retried"] == n
        assert every["complete"] > every["pruned"] > every["failed"] > 0
        assert every["retried"] > 0 and every["best"] is not None
        assert every["budget"] == n + 1000
        assert set(result["seconds"]) == {key for key, _ in scale.ROWS}
        assert all(s is None or s > 0 for s in result["seconds"].values())
        assert joining <= set(result["join"])
        assert result["not_run"] == {}
        assert result["report_page_bytes"] > 0  # the report ran and wrote its page
    assert set(record["growth_per_tenfold"]) == {key for key, _ in scale.ROWS}
    assert record["targets"] == []  # neither 1,000 nor 100,000 trials was run


def test_the_checkpoint_benchmark_measures_a_checkpoint_of_four_copies_of_the_weights() -> None:
    """A checkpoint of an Adam trial holds its parameters four times in float32 (weights,
    best weights, two moments): 16 bytes a parameter, plus pickling's few kB."""
    from benchmarks.checkpoints import measure
    from model.config import TrainConfig

    figures = measure(TrainConfig(hidden=(32, 16), k=2), torch.device("cpu"))
    parameters = 2 * (784 * 32 + 32 + 32 * 16 + 16 + 16 * 10 + 10)
    assert figures["parameters_per_trial"] == parameters
    assert 16 * parameters < figures["bytes"] < 16 * parameters + 64_000
    assert all(figures[name] > 0 for name in ("take_s", "write_s", "read_s"))


def test_seconds_lost_counts_a_failed_trial_s_training_since_its_last_checkpoint() -> None:
    """An interrupted trial loses what it trained since its last checkpoint: its time,
    less what its checkpoint kept beyond the point it had itself resumed from."""
    study = optuna.create_study()
    start = datetime.datetime(2026, 12, 4, 12, 0, 0)

    def failed(seconds: float, system_attrs: dict, user_attrs: dict) -> None:  # type: ignore[type-arg]
        study.add_trial(
            optuna.trial.FrozenTrial(
                number=0, state=TrialState.FAIL, value=None, values=None, datetime_start=start,
                datetime_complete=start + datetime.timedelta(seconds=seconds), params={},
                distributions={}, user_attrs=user_attrs, system_attrs=system_attrs,
                intermediate_values={}, trial_id=0,
            )
        )  # fmt: skip

    # No checkpoint: all 7.5 s lost. A checkpoint at 4 s of a trial resumed at 1 s, failed
    # after 6 s: 6 − (4 − 1) = 3 s lost. A retry that failed before its own checkpoint
    # (its attribute names its predecessor's, at the point it resumed from): all 2 s.
    for seconds, system, user in [
        (7.5, {}, {}),
        (6.0, {"checkpoint": {"epoch": 10, "seconds": 4.0}}, {"resumed_from": {"seconds": 1.0}}),
        (2.0, {"checkpoint": {"epoch": 3, "seconds": 1.0}}, {"resumed_from": {"seconds": 1.0}}),
    ]:
        failed(seconds, system, user)
    assert study_record.seconds_lost(study, None) == 7.5 + 3.0 + 2.0


def test_load_benchmark_loses_no_trial_with_a_quarter_killed_and_never_imports_torch(
    tmp_path: Path,
) -> None:
    out = tmp_path / "load.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.load", "--backend", "sqlite", "--workers", "4",
         "--budget", "40", "--heartbeat", "1", "--kill-quarter", "--json", str(out)],
        cwd=GPU_CHECK.parent.parent, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    runs = json.loads(out.read_text())["runs"]
    assert [(r["workers"], r["killed"] and r["killed"]["workers"]) for r in runs] == [
        (4, None),
        (4, 1),
    ]
    for run in runs:
        assert (run["complete"], run["overshoot"], run["lost"]) == (40, 0, 0)
        assert set(run["states"]) <= {"COMPLETE", "FAIL"}
        assert run["failed_not_retried"] == 0
        assert run["torch_imported_by_a_worker"] is False
        # Every surviving worker wrote its record; without a kill they made every claim.
        assert run["worker_records"] == 4 - (run["killed"] or {}).get("workers", 0)
    assert runs[0]["claim_seconds"]["n"] >= 40
