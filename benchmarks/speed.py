"""Speed of the k-fold trainer, side by side with the naive way, in one run.

    python -m benchmarks.speed cases     [--device D] [--rounds R] [--json FILE]
    python -m benchmarks.speed estimate  [--device D] [--trials N] [--max-minutes M]
    python -m benchmarks.speed scaling   [--device D]
    python -m benchmarks.speed stacking  [--device D] [--stack-sizes 1,2,4] [--graphs]
    python -m benchmarks.speed all       [--device D] [--json FILE]

`cases` trains the report's best network (784-249-36-10, relu, dropout 0.35, Adam,
lr 5.4e-3, L2 1.2e-4) on 48,000 images per fold, k = 5, early stopping off, two ways
— mnist-study's stacked trainer and `naive_kfold` below — alternating after a warm-up:
(1) full batch, (2) mini-batches of 256. It prints seconds per model-epoch (one fold
model over its training part once), model-epochs per second, FLOP/s (6 · samples ·
parameters per model-epoch), the ratio, and on the CPU the GEMM floor: the same matrix
products the trainer performs in an epoch, alone, timed in the same run (efficiency =
floor / trainer). On CUDA it prints the fraction of the dense TF32 peak instead.

`estimate` times whole trials of the `seed` preset (drawn by the study's real sampler,
early stopping on) and extrapolates to the preset's 200 trials. `scaling` times a trial
against the training-set size and against k. `stacking` times B trials trained as one
stack against the same trials one after another, and against the naive way.

Needs only torch (and the project's `model/`): it runs where Optuna is not installed;
`estimate` then reads its configurations from `seed_draws.json` beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.machine import cpu_model
from model.config import TrainConfig, parameter_count
from model.data import DeviceData, default_root, load_mnist, to_device
from model.kfold import GRAPH_WARMUP_EPOCHS, split_folds, train_kfold, train_trials
from model.network import layer_sizes

# Dense TF32 tensor-core peak of an H100 SXM, without sparsity; an H200 has the same
# tensor cores and clocks (more and faster memory), so the same peak.
H100_TF32_PEAK = 495e12
REPORT_BEST = TrainConfig(
    hidden=(249, 36), activation="relu", dropout=0.35, optimizer="adam", lr=5.4e-3,
    weight_decay=1.2e-4, k=5, subset=60_000,
)  # fmt: skip
# `mnist-study space --preset seed --sample 12 --seed 0 --json`: the seed study's first
# trials, for machines without Optuna (a test checks the file against the sampler).
DRAWS_FILE = Path(__file__).with_name("seed_draws.jsonl")
SEED_TRIALS = 200


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


# --- the naive way --------------------------------------------------------------------


def naive_kfold(config: TrainConfig, data: DeviceData, epochs: int) -> float:
    """k-fold as the Optuna PyTorch example and the report train: one fold after another,
    a fresh model per fold, a DataLoader over a TensorDataset on the host, `.item()` on
    every step's loss, evaluation through a DataLoader every epoch, default precision.
    Returns the last fold's final validation accuracy (so the work cannot be skipped)."""
    device = data.device
    x, y = data.x.cpu(), data.y.cpu()
    train_idx, val_idx = split_folds(len(x), config)
    accuracy = 0.0
    for j in range(config.k):
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(layer_sizes(config.hidden)[:-1]):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU(), nn.Dropout(config.dropout)]
        model = nn.Sequential(*layers, nn.Linear(config.hidden[-1], 10)).to(device)
        optimizer = torch.optim.Adam(
            model.parameters(), lr=config.lr, weight_decay=config.weight_decay
        )
        train_set = TensorDataset(x[train_idx[j]], y[train_idx[j]])
        val_set = TensorDataset(x[val_idx[j]], y[val_idx[j]])
        batch = config.batch_size or len(train_set)
        train_loader = DataLoader(train_set, batch_size=batch, shuffle=True)
        val_loader = DataLoader(val_set, batch_size=config.batch_size or len(val_set))
        for _ in range(epochs):
            model.train()
            running = 0.0
            for xb, yb in train_loader:
                xb, yb = xb.to(device), yb.to(device)
                optimizer.zero_grad()
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                optimizer.step()
                running += loss.item()
            model.eval()
            correct = 0
            val_loss = 0.0
            with torch.no_grad():
                for xb, yb in val_loader:
                    xb, yb = xb.to(device), yb.to(device)
                    logits = model(xb)
                    val_loss += F.cross_entropy(logits, yb).item()
                    correct += (logits.argmax(1) == yb).sum().item()
            accuracy = correct / len(val_set)
    return accuracy


# --- the GEMM floor -------------------------------------------------------------------


FORWARD = "forward"
WEIGHT_GRAD = "weight gradient"
INPUT_GRAD = "input gradient"
VALIDATION = "validation forward"


@dataclasses.dataclass(frozen=True)
class Product:
    """One matrix product of the floor, (m × k) · (k × n), for network `net`'s layer
    `layer` (0 is the first, from the pixels); weights are held fan_in × fan_out."""

    kind: str
    net: int
    layer: int
    m: int
    k: int
    n: int

    @property
    def multiply_adds(self) -> int:
        return self.m * self.k * self.n


def epoch_products(config: TrainConfig, n_train: int, n_val: int) -> list[Product]:
    """The matrix products one epoch of the stacked trainer performs, in its order.

    Steps of `batch_size` rows (the last one short when n_train is no multiple of it;
    full batch: one step of all n_train rows); per step, network and layer the forward
    product x·W (rows × fan_in by fan_in × fan_out), the weight gradient xᵀ·g
    (fan_in × rows by rows × fan_out) and, but for the first layer (nothing needs the
    pixels' gradient), the input gradient g·Wᵀ (rows × fan_out by fan_out × fan_in); then
    each network's validation forward over n_val rows. k distinct networks, as the trainer
    has."""
    sizes = layer_sizes(config.hidden)
    layers = list(enumerate(itertools.pairwise(sizes)))
    batch = config.batch_size or n_train
    steps = [batch] * (n_train // batch) + ([n_train % batch] if n_train % batch else [])
    products = []
    for rows in steps:
        for net in range(config.k):
            for layer, (fan_in, fan_out) in layers:
                products.append(Product(FORWARD, net, layer, rows, fan_in, fan_out))
                products.append(Product(WEIGHT_GRAD, net, layer, fan_in, rows, fan_out))
                if layer > 0:
                    products.append(Product(INPUT_GRAD, net, layer, rows, fan_out, fan_in))
    for net in range(config.k):
        for layer, (fan_in, fan_out) in layers:
            products.append(Product(VALIDATION, net, layer, n_val, fan_in, fan_out))
    return products


def gemm_floor(config: TrainConfig, n_train: int, n_val: int, device: torch.device) -> float:
    """Seconds for one epoch's matrix products of all k networks, alone
    (`epoch_products`, timed by `time_products`)."""
    return time_products(epoch_products(config, n_train, n_val), device)


def time_products(products: list[Product], device: torch.device) -> float:
    """Seconds to run `products` in their order, nothing else timed. Each network's layer
    has its own weights and inputs, and every product is written into a preallocated
    output, as a best implementation would (a fresh 48 MB output per product costs page
    faults that are not the GEMM's); the outputs are touched before the clock starts."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device)

    # Each (network, layer)'s fans and the most rows any of its products takes.
    fans: dict[tuple[int, int], tuple[int, int]] = {}
    train_rows: dict[tuple[int, int], int] = {}
    val_rows: dict[tuple[int, int], int] = {}
    for p in products:
        if p.kind == WEIGHT_GRAD:
            fan_in, rows, fan_out = p.m, p.k, p.n
        elif p.kind == INPUT_GRAD:
            rows, fan_out, fan_in = p.m, p.k, p.n
        else:
            rows, fan_in, fan_out = p.m, p.k, p.n
        key = (p.net, p.layer)
        fans[key] = (fan_in, fan_out)
        most = val_rows if p.kind == VALIDATION else train_rows
        most[key] = max(most.get(key, 0), rows)
    buffers: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    for key, (fan_in, fan_out) in fans.items():
        rows, n_val = train_rows.get(key, 0), val_rows.get(key, 0)
        buffers[key] = {
            "w": rand(fan_in, fan_out),
            "x": rand(rows, fan_in),
            "g": rand(rows, fan_out),
            "out": torch.empty(rows, fan_out, device=device),
            "dw": torch.empty(fan_in, fan_out, device=device),
            "dx": torch.empty(rows, fan_in, device=device),
            "val_x": rand(n_val, fan_in),
            "val_out": torch.empty(n_val, fan_out, device=device),
        }
    # Every product's operands and output, as views into those buffers.
    operands = []
    for p in products:
        b = buffers[(p.net, p.layer)]
        if p.kind == FORWARD:
            operands.append((b["x"][: p.m], b["w"], b["out"][: p.m]))
        elif p.kind == WEIGHT_GRAD:
            operands.append((b["x"][: p.k].T, b["g"][: p.k], b["dw"]))
        elif p.kind == INPUT_GRAD:
            operands.append((b["g"][: p.m], b["w"].T, b["dx"][: p.m]))
        else:
            operands.append((b["val_x"][: p.m], b["w"], b["val_out"][: p.m]))
    # Touch every output once, so no page is first faulted in during the timing.
    for b in buffers.values():
        for name in ("out", "dw", "dx", "val_out"):
            b[name].zero_()
    sync(device)
    started = time.perf_counter()
    for a, w, out in operands:
        torch.mm(a, w, out=out)
    sync(device)
    return time.perf_counter() - started


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the cases ------------------------------------------------------------------------


def run_cases(
    device: torch.device,
    data: DeviceData,
    rounds: int,
    epochs: dict[str, int],
    on_row: Callable[[dict[str, Any]], None] = lambda row: None,
) -> list[dict[str, Any]]:
    results = []
    for name, batch_size in (("full batch", None), ("mini-batch 256", 256)):
        e = epochs[name]
        config = dataclasses.replace(
            REPORT_BEST, batch_size=batch_size, max_epochs=e, patience=e + 1
        )
        train_idx, val_idx = split_folds(len(data), config)
        n_train, n_val = train_idx.shape[1], val_idx.shape[1]

        ways: dict[str, Callable[[], Any]] = {
            "mnist-study": functools.partial(_ours, config, data),
            "naive": functools.partial(naive_kfold, config, data, e),
        }
        if device.type == "cpu":
            ways["gemm floor"] = functools.partial(_repeat_floor, config, n_train, n_val, device, e)
        times = _alternate(
            ways, rounds, warmup=dataclasses.replace(config, max_epochs=1), data=data
        )
        model_epochs = config.k * e
        flops = 6 * n_train * parameter_count(config.hidden)
        row: dict[str, Any] = {
            "case": name,
            "device": str(device),
            "machine": machine(),
            "epochs": e,
            "k": config.k,
            "train_images_per_fold": n_train,
            "rounds": rounds,
        }
        for way, seconds in times.items():
            per = seconds / model_epochs
            row[way] = {
                "seconds_per_model_epoch": per,
                "model_epochs_per_s": 1 / per,
                "flop_per_s": flops / per,
            }
        row["speedup_vs_naive"] = times["naive"] / times["mnist-study"]
        if "gemm floor" in times:
            row["efficiency_vs_gemm_floor"] = times["gemm floor"] / times["mnist-study"]
        if device.type == "cuda":
            row["fraction_of_tf32_peak"] = row["mnist-study"]["flop_per_s"] / H100_TF32_PEAK
        results.append(row)
        on_row(row)
        _print_case(row)
    return results


def _ours(config: TrainConfig, data: DeviceData) -> None:
    result = train_kfold(config, data)
    assert result.epochs_run == [config.max_epochs] * config.k  # early stopping is off


@dataclasses.dataclass(frozen=True)
class SelfTimed:
    """Seconds a way measured itself, leaving its set-up out."""

    seconds: float


def _repeat_floor(
    config: TrainConfig, n_train: int, n_val: int, device: torch.device, epochs: int
) -> SelfTimed:
    """The floor's own timing of `epochs` epochs (its inputs' set-up is not timed)."""
    return SelfTimed(sum(gemm_floor(config, n_train, n_val, device) for _ in range(epochs)))


def _alternate(
    ways: dict[str, Callable[[], Any]], rounds: int, warmup: TrainConfig, data: DeviceData
) -> dict[str, float]:
    """Median seconds of each way over `rounds`, run in turn (A, B, C, A, B, C, ...)
    after one warm-up of each, so drifts in the machine's speed hit all ways alike.
    A way that returns `SelfTimed` has timed itself (the GEMM floor, whose set-up is
    excluded); the others are timed whole."""
    train_kfold(warmup, data)
    for fn in ways.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            sync(data.device)
            started = time.perf_counter()
            returned = fn()
            sync(data.device)
            elapsed = time.perf_counter() - started
            samples[name].append(returned.seconds if isinstance(returned, SelfTimed) else elapsed)
    return {name: statistics.median(values) for name, values in samples.items()}


def _print_case(row: dict[str, Any]) -> None:
    print(
        f"\n{row['case']}: k = {row['k']}, {row['train_images_per_fold']} images per fold, "
        f"{row['epochs']} epochs, median of {row['rounds']} rounds, {row['machine']}"
    )
    for way in ("mnist-study", "naive", "gemm floor"):
        if way in row:
            r = row[way]
            print(f"  {way:12s} {r['seconds_per_model_epoch']:8.3f} s/model-epoch  "
                  f"{r['model_epochs_per_s']:7.2f} model-epochs/s  "
                  f"{r['flop_per_s'] / 1e9:8.1f} GFLOP/s")  # fmt: skip
    line = f"  speed-up over naive {row['speedup_vs_naive']:.2f}x"
    if "efficiency_vs_gemm_floor" in row:
        line += f", efficiency vs GEMM floor {row['efficiency_vs_gemm_floor']:.2f}"
    if "fraction_of_tf32_peak" in row:
        line += f", {100 * row['fraction_of_tf32_peak']:.1f} % of dense TF32 peak"
    print(line)


# --- the seed preset, estimated ------------------------------------------------------


def seed_draws(n: int) -> list[dict[str, Any]]:
    """The first n configurations of a seed study with sampler seed 0."""
    try:
        import optuna

        from study.presets import PRESETS
        from study.sampler import draw_params

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # no Optuna here: the same draws, made where it is
        lines = DRAWS_FILE.read_text().splitlines()
        return [json.loads(line) for line in lines[:n]]
    preset = PRESETS["seed"]
    return draw_params(preset.space, preset.defaults, n, 0)


def run_estimate(
    device: torch.device, data: DeviceData, trials: int, max_minutes: float
) -> dict[str, Any]:
    """Time whole `seed` trials (early stopping on) and extrapolate to 200 trials.

    A trial still running after `max_minutes` is stopped there; the estimate then says
    what it assumes about the epochs left (see the printed note) and is a lower bound.
    """
    seed = TrainConfig(subset=None, batch_size=None, max_epochs=2000, patience=50, k=5)
    rows = []
    for params in seed_draws(trials):
        config = seed.with_params(params)
        deadline = time.perf_counter() + 60 * max_minutes
        result = train_kfold(
            config, data, on_progress=lambda _, end=deadline: time.perf_counter() > end
        )
        epochs = max(result.epochs_run)
        rows.append(
            {
                "params": params,
                "seconds": result.seconds,
                "epochs": epochs,
                "seconds_per_epoch": result.seconds / epochs,
                "stopped_early": not result.halted,
                "mean_accuracy": result.mean_accuracy,
            }
        )
        r = rows[-1]
        how = "early stopping" if r["stopped_early"] else f"the {max_minutes:g}-minute cap"
        print(
            f"  trial {len(rows) - 1}: {config.hidden} {config.activation} {config.optimizer}: "
            f"{r['seconds']:.1f} s, {epochs} epochs (ended by {how}), "
            f"{r['seconds_per_epoch']:.3f} s/epoch, CV accuracy {r['mean_accuracy']:.4f}"
        )
    finished = [r for r in rows if r["stopped_early"]]
    per_trial = statistics.fmean(r["seconds"] for r in rows)
    out: dict[str, Any] = {
        "device": str(device),
        "machine": machine(),
        "trials": rows,
        "minutes_for_200_trials": per_trial * SEED_TRIALS / 60,
        "all_trials_finished": len(finished) == len(rows),
    }
    if finished:
        out["mean_epochs_of_finished_trials"] = statistics.fmean(r["epochs"] for r in finished)
    note = "" if out["all_trials_finished"] else " (a lower bound: some trials hit the cap)"
    print(
        f"  seed preset, {SEED_TRIALS} trials on {machine()}: "
        f"{out['minutes_for_200_trials']:.1f} minutes{note}"
    )
    if not out["all_trials_finished"]:
        # Without knowing where early stopping would have ended them: the rate.
        per_epoch = statistics.fmean(r["seconds_per_epoch"] for r in rows)
        out["minutes_per_100_epochs_per_trial"] = per_epoch * 100 * SEED_TRIALS / 60
        print(
            f"  at {per_epoch:.3f} s per epoch (all 5 folds), every 100 epochs a trial runs "
            f"add {out['minutes_per_100_epochs_per_trial']:.0f} minutes to {SEED_TRIALS} trials"
        )
    return out


# --- trials stacked -------------------------------------------------------------------

# The two protocols the study runs: the seed report's (full batch over 48,000 images per
# fold, k = 5) and the quick preset's (12,000 images, k = 3, mini-batches of 256).
STACK_PROTOCOLS = {
    "seed, full batch": TrainConfig(subset=None, batch_size=None, k=5),
    "quick, mini-batch 256": TrainConfig(subset=12_000, batch_size=256, k=3),
}


def run_stacking(
    device: torch.device,
    data: DeviceData,
    sizes: list[int],
    epochs: int,
    rounds: int,
    graphs: bool,
    on_row: Callable[[dict[str, Any]], None] = lambda row: None,
) -> list[dict[str, Any]]:
    """Trials per second for B trials of a protocol trained three ways, in one run:
    stacked (`train_trials`), one after another (`train_kfold`, as one trial per worker
    process trains) and the naive way (its time for the first trial, times B). Early
    stopping is off, so every way trains every network for `epochs` epochs.

    The configurations are the seed study's first draws. Useful FLOP/s counts each
    network's own (unpadded) parameters: 6 · samples · parameters per model-epoch.
    On a GPU with `graphs`, the stacked way also runs with whole epochs as CUDA graphs,
    timed over its replays alone (`_graph_replays`).
    """
    draws = seed_draws(max(sizes))
    rows = []
    for name, protocol in STACK_PROTOCOLS.items():
        base = dataclasses.replace(protocol, max_epochs=epochs, patience=epochs + 1)
        configs = [base.with_params(params) for params in draws]
        n_train = split_folds(len(data), base)[0].shape[1]
        for b in sizes:
            chosen = configs[:b]
            ways: dict[str, Callable[[], Any]] = {
                "stacked": functools.partial(train_trials, chosen, data),
                "one at a time": functools.partial(_one_at_a_time, chosen, data),
            }
            if graphs and device.type == "cuda":
                ways["stacked, CUDA graph replays"] = functools.partial(
                    _graph_replays, chosen, data, epochs
                )
            if b == sizes[0]:
                ways["naive (first trial)"] = functools.partial(
                    _naive_scaled, chosen[0], data, epochs
                )
            times = _alternate(
                ways, rounds, warmup=dataclasses.replace(base.with_params(draws[0]), max_epochs=1),
                data=data,
            )  # fmt: skip
            useful = sum(6 * n_train * parameter_count(c.hidden) * c.k * epochs for c in chosen)
            row: dict[str, Any] = {
                "protocol": name, "trials": b, "epochs": epochs, "rounds": rounds,
                "device": str(device), "machine": machine(),
            }  # fmt: skip
            for way, seconds in times.items():
                per_trial = seconds if way.startswith("naive") else seconds / b
                row[way] = {
                    "seconds": seconds,
                    "trials_per_s": 1 / per_trial,
                    "useful_flop_per_s": useful / b / per_trial,
                }
                if device.type == "cuda":
                    row[way]["fraction_of_tf32_peak"] = (
                        row[way]["useful_flop_per_s"] / H100_TF32_PEAK
                    )
            row["stacked_vs_one_at_a_time"] = times["one at a time"] / times["stacked"]
            rows.append(row)
            on_row(row)
            _print_stacking(row)
    return rows


# The naive way's epochs all cost the same (no early stopping, nothing cached): two are
# timed and scaled, as 20 seed epochs of it took 100 s on an H200 (2026-12-04).
NAIVE_EPOCHS = 2


def _naive_scaled(config: TrainConfig, data: DeviceData, epochs: int) -> SelfTimed:
    timed = min(epochs, NAIVE_EPOCHS)
    sync(data.device)
    started = time.perf_counter()
    naive_kfold(config, data, timed)
    sync(data.device)
    return SelfTimed((time.perf_counter() - started) * epochs / timed)


def _graph_replays(configs: list[TrainConfig], data: DeviceData, epochs: int) -> SelfTimed:
    """Seconds of `epochs` replayed epochs alone: a run of the warm-up and capture
    epochs plus `epochs` more, less a run of the warm-up and capture alone. Timed whole,
    a short run would measure the capture, not the replays that a study's long trials
    are made of."""
    lead = GRAPH_WARMUP_EPOCHS + 1  # eager warm-up epochs, then the captured one

    def timed(max_epochs: int) -> float:
        chosen = [dataclasses.replace(c, max_epochs=max_epochs) for c in configs]
        sync(data.device)
        started = time.perf_counter()
        train_trials(chosen, data, graphs=True)
        sync(data.device)
        return time.perf_counter() - started

    return SelfTimed(max(0.0, timed(lead + epochs) - timed(lead)))


def _one_at_a_time(configs: list[TrainConfig], data: DeviceData) -> None:
    for config in configs:
        train_kfold(config, data)


def _print_stacking(row: dict[str, Any]) -> None:
    print(
        f"\n{row['protocol']}, B = {row['trials']} trials, {row['epochs']} epochs, "
        f"median of {row['rounds']} rounds, {row['machine']}"
    )
    for way, r in row.items():
        if isinstance(r, dict):
            peak = r.get("fraction_of_tf32_peak")
            extra = f"  {100 * peak:5.1f} % of dense TF32 peak" if peak is not None else ""
            print(f"  {way:22s} {r['trials_per_s']:8.3f} trials/s  "
                  f"{r['useful_flop_per_s'] / 1e9:9.1f} useful GFLOP/s{extra}")  # fmt: skip
    print(f"  stacked: {row['stacked_vs_one_at_a_time']:.2f}x one at a time")


# --- how the cost grows ---------------------------------------------------------------


def run_scaling(device: torch.device, data: DeviceData, epochs: int) -> dict[str, Any]:
    """Seconds per trial of the report's network (full batch, `epochs` epochs) against
    the training-set size (k = 5) and against k (9,600 training images per network; k = 1
    is the final retrain, which has no validation)."""
    from model.retrain import train_final

    base = dataclasses.replace(REPORT_BEST, max_epochs=epochs, patience=epochs + 1)
    train_kfold(dataclasses.replace(base, subset=6000, max_epochs=1), data)  # warm-up

    def timed(fn: Callable[[], Any]) -> float:
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        return time.perf_counter() - started

    by_size = []
    for n in (6_000, 12_000, 24_000, 48_000):
        config = dataclasses.replace(base, subset=n)
        by_size.append({"images": n, "seconds": timed(lambda c=config: train_kfold(c, data))})
    by_k = []
    per_network = 9_600
    for k in (1, 3, 5, 10):
        if k == 1:
            config = dataclasses.replace(base, k=2, subset=per_network)
            seconds = timed(lambda c=config: train_final(c, data, epochs))
        else:
            config = dataclasses.replace(base, k=k, subset=per_network * k // (k - 1))
            seconds = timed(lambda c=config: train_kfold(c, data))
        by_k.append({"k": k, "seconds": seconds})
    out = {
        "device": str(device),
        "machine": machine(),
        "epochs": epochs,
        "by_images": by_size,
        "by_k": by_k,
    }
    print(f"  time per trial ({epochs} full-batch epochs), {machine()}")
    _print_growth("images", by_size, "images")
    _print_growth("k", by_k, "k")
    return out


def _print_growth(label: str, rows: list[dict[str, Any]], key: str) -> None:
    """Seconds per unit against the largest case's: linear growth keeps them equal."""
    last = rows[-1]["seconds"] / rows[-1][key]
    for row in rows:
        per_unit = row["seconds"] / row[key]
        row["relative_cost_per_unit"] = per_unit / last
        print(
            f"    {label} = {row[key]:>6}: {row['seconds']:7.2f} s, per unit "
            f"{row['relative_cost_per_unit']:.2f}× the largest case's"
        )
    spread = max(r["relative_cost_per_unit"] for r in rows)
    verdict = (
        "grows linearly (within 15 %)"
        if spread <= 1.15
        else f"grows less than linearly at small {label}: fixed costs weigh "
        f"{spread:.2f}× per unit at the smallest"
    )
    print(f"    → {verdict}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("what", choices=("cases", "estimate", "scaling", "stacking", "all"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full-epochs", type=int, default=3)
    parser.add_argument("--mb-epochs", type=int, default=1)
    parser.add_argument("--trials", type=int, default=3, help="estimate: trials to time")
    parser.add_argument(
        "--max-minutes", type=float, default=2.0, help="estimate: cap on one trial's minutes"
    )
    parser.add_argument("--scaling-epochs", type=int, default=2)
    parser.add_argument(
        "--stack-sizes", default="1,2,4", help="stacking: trials per stack, comma-separated"
    )
    parser.add_argument("--stack-epochs", type=int, default=2, help="stacking: epochs per trial")
    parser.add_argument(
        "--graphs", action="store_true", help="stacking: also time whole epochs as CUDA graphs"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)

    def save() -> None:
        """Written after every case, whole or not at all: a run stopped by its time limit
        keeps every number it measured."""
        if args.json:
            partial = args.json.with_name(f".{args.json.name}.partial")
            partial.write_text(json.dumps(out, indent=1))
            partial.replace(args.json)

    def keep(section: str) -> Callable[[dict[str, Any]], None]:
        out[section] = []

        def on_row(row: dict[str, Any]) -> None:
            out[section].append(row)
            save()

        return on_row

    device = torch.device(args.device)
    mnist = load_mnist(default_root())
    data = to_device(mnist.train_images, mnist.train_labels, device)
    out: dict[str, Any] = {"machine": machine(), "torch": torch.__version__}
    # Stacking first: the GPU check's time limit cuts the last case short, and the GPU
    # default of trials per worker waits on this one (benchmarks/README.md).
    if args.what in ("stacking", "all"):
        print("\ntrials stacked")
        sizes = [int(b) for b in args.stack_sizes.split(",")]
        run_stacking(
            device, data, sizes, args.stack_epochs, args.rounds, args.graphs, keep("stacking")
        )
    if args.what in ("cases", "all"):
        run_cases(
            device,
            data,
            args.rounds,
            {"full batch": args.full_epochs, "mini-batch 256": args.mb_epochs},
            on_row=keep("cases"),
        )
    if args.what in ("estimate", "all"):
        print(f"\nestimate of the seed preset: {args.trials} trials drawn by its sampler")
        out["estimate"] = run_estimate(device, data, args.trials, args.max_minutes)
        save()
    if args.what in ("scaling", "all"):
        print("\nscaling")
        out["scaling"] = run_scaling(device, data, args.scaling_epochs)
        save()
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
