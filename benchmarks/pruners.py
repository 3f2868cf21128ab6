"""Pruners for the `wide` preset, side by side: one wide-like study run three times in one
process — under no pruner, Optuna's median pruner and Hyperband — with the same sampler,
seed and trial budget.

    python -m benchmarks.pruners [--seeds 0,1] [--trials 24] [--json FILE]
    python -m benchmarks.pruners --quick      # a few seconds: the test runs this

The study is the `wide` preset scaled down to fit a 2-core CPU (`FULL` below): the wide
space with widths capped (log-uniform in [128, 256] instead of [128, 4096]), a 6,000-image
subset of real MNIST, k = 2, 10 epochs under the preset's cosine schedule, patience 4
(the preset's 10 of 30 epochs, scaled), 24 trials of which the first 8 are drawn from the
priors and the rest by TPE (the preset's 20 of 60, scaled). Everything else — the
sampler (`PriorThenTPESampler`), the pruners' own settings (`study.studies.make_pruner`),
the objective and its intermediate values (the running mean validation accuracy over the
folds, each epoch), the SQLite storage — is the project's own code, as a worker runs it.

For each pruner it records the wall seconds of `optimize`, the trials complete, pruned
(by the pruner) and diverged, the fold-epochs trained (each fold network over its
training part once: the compute spent), the best mean CV accuracy and each trial's end:
elapsed seconds, fold-epochs so far and best so far. Per seed it also compares the three
at the same point: the best each had when the fastest of them finished, and the seconds
and fold-epochs each took to first reach the lowest of their three best values.

One torch thread by default: the trials are small, and on the project's 2-core machine,
shared with other jobs, two threads collide — 3 epochs of one trial (batches of 64, one
layer of 162 units) took 0.38 s on one thread and 12.5 s on two while another job held
both cores (2026-11-27).

Seeds run in turn; within a seed the pruners run in an order rotated by one per seed, so
that a drift of the machine's speed does not always land on the same pruner.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.trial import FrozenTrial, TrialState

from benchmarks.speed import machine
from model.data import DeviceData, default_root, load_mnist, to_device
from study.database import open_storage
from study.objective import Objective
from study.presets import PRESETS, PRUNERS, Preset
from study.studies import create_or_resume


@dataclass(frozen=True)
class Protocol:
    """How far the `wide` preset is scaled down; the rest of it stands."""

    units_low: int
    units_high: int
    subset: int
    k: int
    max_epochs: int
    patience: int
    n_trials: int
    n_prior_trials: int


FULL = Protocol(
    units_low=128, units_high=256, subset=6_000, k=2, max_epochs=10, patience=4,
    n_trials=24, n_prior_trials=8,
)  # fmt: skip
# Small enough for a test (a few seconds for all three), long enough that both pruners
# can act: the median pruner from epoch 4 after 4 trials, Hyperband at epochs 2 and 6.
QUICK = Protocol(
    units_low=16, units_high=32, subset=600, k=2, max_epochs=6, patience=6,
    n_trials=8, n_prior_trials=4,
)  # fmt: skip


def scaled_preset(protocol: Protocol, pruner: str) -> Preset:
    """`wide` with `protocol`'s sizes and the named pruner."""
    wide = PRESETS["wide"]
    return dataclasses.replace(
        wide,
        name="wide-pruners-benchmark",
        summary=f"the wide preset scaled down for benchmarks.pruners: {protocol}",
        defaults=dataclasses.replace(
            wide.defaults,
            subset=protocol.subset,
            k=protocol.k,
            max_epochs=protocol.max_epochs,
            patience=protocol.patience,
        ),
        n_trials=protocol.n_trials,
        pruner=pruner,
        space=dataclasses.replace(
            wide.space, units_low=protocol.units_low, units_high=protocol.units_high
        ),
        n_prior_trials=protocol.n_prior_trials,
        ensemble=False,
    )


def run_study(
    protocol: Protocol, pruner: str, seed: int, data: DeviceData, folder: Path
) -> dict[str, Any]:
    """One study of the scaled preset under `pruner`, in its own SQLite file; its record."""
    preset = scaled_preset(protocol, pruner)
    storage = open_storage(f"sqlite:///{folder / f'{pruner}-{seed}.db'}", create=True,
                           heartbeat=None)  # fmt: skip
    study, _ = create_or_resume(storage, f"{pruner}-{seed}", preset, seed=seed)
    objective = Objective(preset, data, worker="benchmarks.pruners")
    ends: list[dict[str, Any]] = []
    best: float | None = None
    fold_epochs = 0

    def record(study: optuna.Study, trial: FrozenTrial) -> None:
        nonlocal best, fold_epochs
        epochs_run = trial.user_attrs.get("epochs_run", [])
        fold_epochs += sum(epochs_run)
        if trial.state == TrialState.COMPLETE:
            assert trial.value is not None
            best = trial.value if best is None else max(best, trial.value)
        diverged = "failure" in trial.user_attrs
        ends.append({
            "number": trial.number,
            "state": "diverged" if diverged else trial.state.name.lower(),
            "value": trial.value,
            "stopped_at_epoch": max(epochs_run, default=0),
            "fold_epochs": sum(epochs_run),
            "elapsed_s": time.perf_counter() - started,
            "fold_epochs_so_far": fold_epochs,
            "best_so_far": best,
            "params": trial.params,
        })  # fmt: skip

    started = time.perf_counter()
    study.optimize(objective, n_trials=protocol.n_trials, callbacks=[record])
    wall = time.perf_counter() - started
    states = [end["state"] for end in ends]
    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    best_trial = max(complete, key=lambda t: t.value or 0.0) if complete else None
    first_best = next((e for e in ends if best is not None and e["best_so_far"] == best), None)
    return {
        "pruner": pruner,
        "seed": seed,
        "wall_seconds": wall,
        "trials": len(ends),
        "complete": states.count("complete"),
        "pruned": states.count("pruned"),
        "diverged": states.count("diverged"),
        "fold_epochs": fold_epochs,
        "fold_epoch_cap": protocol.n_trials * protocol.k * protocol.max_epochs,
        "best_value": best,
        "best_trial": None if best_trial is None else best_trial.number,
        "best_params": None if best_trial is None else best_trial.params,
        "seconds_to_best": None if first_best is None else first_best["elapsed_s"],
        "fold_epochs_to_best": None if first_best is None else first_best["fold_epochs_so_far"],
        "trials_by_end": ends,
    }


def compare(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The pruners of one seed at common points: at the time the fastest finished, the
    best each had; for the lowest of their best values, when each first reached it."""
    at_seconds = min(run["wall_seconds"] for run in runs)
    bests = [run["best_value"] for run in runs if run["best_value"] is not None]
    target = min(bests) if len(bests) == len(runs) else None
    out: dict[str, Any] = {"at_seconds": at_seconds, "target": target, "pruners": {}}
    for run in runs:
        before = [e for e in run["trials_by_end"] if e["elapsed_s"] <= at_seconds]
        reached = next(
            (e for e in run["trials_by_end"]
             if target is not None and e["best_so_far"] is not None
             and e["best_so_far"] >= target),
            None,
        )  # fmt: skip
        out["pruners"][run["pruner"]] = {
            "best_at_seconds": before[-1]["best_so_far"] if before else None,
            "seconds_to_target": None if reached is None else reached["elapsed_s"],
            "fold_epochs_to_target": None if reached is None else reached["fold_epochs_so_far"],
        }
    return out


def run(
    protocol: Protocol,
    seeds: list[int],
    data: DeviceData,
    pruners: tuple[str, ...] = PRUNERS,
    on_seed: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Every pruner under every seed, side by side; the whole record, also handed to
    `on_seed` after each seed (so a run stopped early keeps its finished seeds)."""
    out: dict[str, Any] = {
        "machine": machine(),
        "torch": torch.__version__,
        "optuna": optuna.__version__,
        "protocol": dataclasses.asdict(protocol),
        "seeds": seeds,
        "runs": [],
        "comparisons": [],
    }
    with tempfile.TemporaryDirectory(prefix="pruners-") as tmp:
        for i, seed in enumerate(seeds):
            order = pruners[i % len(pruners) :] + pruners[: i % len(pruners)]
            runs = []
            for pruner in order:
                result = run_study(protocol, pruner, seed, data, Path(tmp))
                _print_run(result)
                runs.append(result)
            out["runs"] += sorted(runs, key=lambda r: pruners.index(r["pruner"]))
            comparison = {"seed": seed, **compare(runs)}
            _print_comparison(comparison)
            out["comparisons"].append(comparison)
            if on_seed is not None:
                on_seed(out)
    return out


def _print_run(run: dict[str, Any]) -> None:
    best = "none" if run["best_value"] is None else f"{run['best_value']:.4f}"
    print(
        f"seed {run['seed']}, {run['pruner']:9s}: {run['wall_seconds']:7.1f} s, "
        f"{run['complete']} complete, {run['pruned']} pruned, {run['diverged']} diverged; "
        f"{run['fold_epochs']}/{run['fold_epoch_cap']} fold-epochs; best {best}",
        flush=True,
    )


def _print_comparison(comparison: dict[str, Any]) -> None:
    target = comparison["target"]
    print(f"  at {comparison['at_seconds']:.1f} s (the fastest's end), and to reach "
          f"{'n/a' if target is None else f'{target:.4f}'} (the lowest best):")  # fmt: skip
    for pruner, c in comparison["pruners"].items():
        at = "none" if c["best_at_seconds"] is None else f"{c['best_at_seconds']:.4f}"
        to = (
            "not reached"
            if c["seconds_to_target"] is None
            else f"{c['seconds_to_target']:.1f} s, {c['fold_epochs_to_target']} fold-epochs"
        )
        print(f"    {pruner:9s} best {at}; target at {to}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.pruners", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seeds", default="0", help="sampler seeds, comma-separated (default 0)")
    parser.add_argument("--trials", type=int, help=f"trials per study (default {FULL.n_trials})")
    parser.add_argument(
        "--quick", action="store_true", help="a tiny protocol (600 images, 8 trials): seconds"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; see the module)"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    protocol = QUICK if args.quick else FULL
    if args.trials is not None:
        protocol = dataclasses.replace(protocol, n_trials=args.trials)
    seeds = [int(s) for s in args.seeds.split(",")]
    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    mnist = load_mnist(default_root())
    data = to_device(mnist.train_images, mnist.train_labels, torch.device(args.device))
    print(f"{protocol}, seeds {seeds}, {machine()}", flush=True)

    def write(out: dict[str, Any]) -> None:
        if args.json:
            args.json.write_text(json.dumps(out, indent=1) + "\n")

    run(protocol, seeds, data, on_seed=write)
    return 0


if __name__ == "__main__":
    sys.exit(main())
