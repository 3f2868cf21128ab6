"""Speed of the k-fold trainer, side by side with the naive way, in one run.

    python -m benchmarks.speed cases     [--device D] [--rounds R] [--json FILE]
    python -m benchmarks.speed estimate  [--device D] [--trials N] [--max-minutes M]
    python -m benchmarks.speed scaling   [--device D]
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
against the training-set size and against k.

Needs only torch (and the project's `model/`): it runs where Optuna is not installed;
`estimate` then reads its configurations from `seed_draws.json` beside this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import platform
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

from model.config import TrainConfig
from model.data import DeviceData, default_root, load_mnist, to_device
from model.kfold import split_folds, train_kfold
from model.network import layer_sizes

# Dense TF32 tensor-core peak of an H100 SXM, without sparsity.
H100_TF32_PEAK = 495e12
REPORT_BEST = TrainConfig(
    hidden=(249, 36), activation="relu", dropout=0.35, optimizer="adam", lr=5.4e-3,
    weight_decay=1.2e-4, k=5, subset=60_000,
)  # fmt: skip
DRAWS_FILE = Path(__file__).with_name("seed_draws.json")


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def parameters(hidden: tuple[int, ...]) -> int:
    sizes = layer_sizes(hidden)
    return sum(a * b + b for a, b in itertools.pairwise(sizes))


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


def gemm_floor(config: TrainConfig, n_train: int, n_val: int, device: torch.device) -> float:
    """Seconds for one epoch's matrix products of all k networks, alone: per step and
    network each layer's forward product, weight gradient and (but for the first layer)
    input gradient, then the validation forward. k distinct networks, as the trainer has,
    and every product written into a preallocated output, as a best implementation would
    (a fresh 48 MB output per product costs page faults that are not the GEMM's)."""
    sizes = layer_sizes(config.hidden)
    batch = config.batch_size or n_train
    steps = [batch] * (n_train // batch) + ([n_train % batch] if n_train % batch else [])
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=gen).to(device)

    shapes = list(itertools.pairwise(sizes))
    nets = []
    for _ in range(config.k):
        nets.append(
            {
                "w": [rand(a, b) for a, b in shapes],
                "x": [rand(batch, a) for a, _ in shapes],
                "g": [rand(batch, b) for _, b in shapes],
                "out": [torch.empty(batch, b, device=device) for _, b in shapes],
                "dw": [torch.empty(a, b, device=device) for a, b in shapes],
                "dx": [torch.empty(batch, a, device=device) for a, _ in shapes],
                "val_x": [rand(n_val, a) for a, _ in shapes],
                "val_out": [torch.empty(n_val, b, device=device) for _, b in shapes],
            }
        )
    sync(device)
    started = time.perf_counter()
    for rows in steps:
        for net in nets:
            for i, w in enumerate(net["w"]):
                x, g = net["x"][i][:rows], net["g"][i][:rows]
                torch.mm(x, w, out=net["out"][i][:rows])
                torch.mm(x.T, g, out=net["dw"][i])
                if i > 0:
                    torch.mm(g, w.T, out=net["dx"][i][:rows])
    for net in nets:
        for i, w in enumerate(net["w"]):
            torch.mm(net["val_x"][i], w, out=net["val_out"][i])
    sync(device)
    return time.perf_counter() - started


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# --- the cases ------------------------------------------------------------------------


def run_cases(
    device: torch.device, data: DeviceData, rounds: int, epochs: dict[str, int]
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
        flops = 6 * n_train * parameters(config.hidden)
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
        _print_case(row)
    return results


def _ours(config: TrainConfig, data: DeviceData) -> None:
    result = train_kfold(config, data)
    assert result.epochs_run == [config.max_epochs] * config.k  # early stopping is off


def _repeat_floor(
    config: TrainConfig, n_train: int, n_val: int, device: torch.device, epochs: int
) -> None:
    for _ in range(epochs):
        gemm_floor(config, n_train, n_val, device)


def _alternate(
    ways: dict[str, Callable[[], Any]], rounds: int, warmup: TrainConfig, data: DeviceData
) -> dict[str, float]:
    """Median seconds of each way over `rounds`, run in turn (A, B, C, A, B, C, ...)
    after one warm-up of each, so drifts in the machine's speed hit all ways alike."""
    train_kfold(warmup, data)
    for fn in ways.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(rounds):
        for name, fn in ways.items():
            sync(data.device)
            started = time.perf_counter()
            fn()
            sync(data.device)
            samples[name].append(time.perf_counter() - started)
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.speed", description=__doc__.split("\n")[0]
    )
    parser.add_argument("what", choices=("cases", "estimate", "scaling", "all"))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--full-epochs", type=int, default=3)
    parser.add_argument("--mb-epochs", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    mnist = load_mnist(default_root())
    data = to_device(mnist.train_images, mnist.train_labels, device)
    out: dict[str, Any] = {"machine": machine(), "torch": torch.__version__}
    if args.what in ("cases", "all"):
        out["cases"] = run_cases(
            device,
            data,
            args.rounds,
            {"full batch": args.full_epochs, "mini-batch 256": args.mb_epochs},
        )
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
