"""What a trial's checkpoint costs: seconds to take, write and read one, and its bytes.

    python -m benchmarks.checkpoints [--device D] [--json FILE]

For each network below, a trial of k folds is trained for a few full-batch epochs on
synthetic images (a checkpoint's size and cost depend on the networks and the epochs
run, not on the images), with its curves booked for the preset's epoch cap; at the end
of epoch `AT_EPOCH` the trainer takes a snapshot of it (`model.trial_state`), timed from
the trainer's decision to its hand-over; `study.checkpoints.Checkpoints.save` then
writes it to an artifact store in a temporary folder, as a worker does (serialised with
`torch.save`, written, named in the trial's attributes on an in-memory study); and
`Checkpoints` reads it back as a resumed trial would. Each is timed `REPEATS` times
(the median). Its share of training time is the cost over the interval between
checkpoints (`CHECKPOINT_EVERY_S`, 60 s by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.artifacts import FileSystemArtifactStore

from benchmarks.machine import cpu_model
from model.config import TrainConfig
from model.data import DeviceData
from model.kfold import train_trials
from model.trial_state import TrialSnapshot
from study.checkpoints import CHECKPOINT_EVERY_S, Checkpoints

optuna.logging.set_verbosity(optuna.logging.WARNING)

AT_EPOCH = 3
REPEATS = 3
ROWS = 1_000

# (name, configuration): the seed preset's networks (k = 5, up to 2,000 epochs) at the
# report's best and at the widest its space allows (784 units in both layers), and a
# wide-preset network of two 2,048-unit layers (k = 3, 30 epochs).
NETWORKS = [
    ("seed: the report's 784-249-36-10, k = 5", TrainConfig(hidden=(249, 36), k=5)),
    ("seed: the widest, 784-784-784-10, k = 5", TrainConfig(hidden=(784, 784), k=5)),
    (
        "wide: 784-2048-2048-10, k = 3, Adam",
        TrainConfig(hidden=(2048, 2048), k=3, max_epochs=30, dropout=0.2),
    ),
]


def measure(config: TrainConfig, device: torch.device) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    data = DeviceData(
        x=torch.rand(ROWS, 784, generator=generator).to(device),
        y=torch.randint(0, 10, (ROWS,), generator=generator).to(device),
    )
    config = dataclasses.replace(config, patience=config.max_epochs, subset=ROWS)
    taken: list[float] = []
    snapshots: list[TrialSnapshot] = []
    decided = 0.0

    def due(_since: float) -> bool:
        nonlocal decided
        decided = time.perf_counter()
        return True

    def keep(by_trial: dict[int, TrialSnapshot]) -> None:
        taken.append(time.perf_counter() - decided)
        snapshots.append(by_trial[0])

    epoch = dataclasses.replace(config, max_epochs=AT_EPOCH + REPEATS)
    train_trials([epoch], data, checkpoint_due=due, on_checkpoint=keep)
    written, read = [], []
    with tempfile.TemporaryDirectory(prefix="mnist-study-bench-") as folder:
        store = FileSystemArtifactStore(folder)
        checkpoints = Checkpoints(store, log=lambda _line: None)
        study = optuna.create_study()
        for snapshot in snapshots[-REPEATS:]:
            trial = study.ask()
            started = time.perf_counter()
            checkpoints.save(trial, snapshot)
            written.append(time.perf_counter() - started)
            artifact = checkpoints.held[trial.number]
            size = (Path(folder) / artifact).stat().st_size
            started = time.perf_counter()
            checkpoints._read(artifact)
            read.append(time.perf_counter() - started)
    parameters = sum(w.numel() for w in snapshots[-1].weights)
    take_s, write_s, read_s = (statistics.median(v[-REPEATS:]) for v in (taken, written, read))
    return {
        "parameters_per_trial": parameters,
        "bytes": size,
        "take_s": take_s,
        "write_s": write_s,
        "read_s": read_s,
        "share_of_training_at_default_interval": (take_s + write_s) / CHECKPOINT_EVERY_S,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model()
    out: dict[str, Any] = {
        "machine": machine,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
        "interval_s": CHECKPOINT_EVERY_S,
        "networks": {},
    }
    print(f"{machine}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'network':44} {'MB':>8} {'take s':>8} {'write s':>8} {'read s':>8} {'share':>7}")
    for name, config in NETWORKS:
        figures = measure(config, device)
        out["networks"][name] = figures
        print(
            f"{name:44} {figures['bytes'] / 1e6:8.1f} {figures['take_s']:8.3f} "
            f"{figures['write_s']:8.3f} {figures['read_s']:8.3f} "
            f"{figures['share_of_training_at_default_interval']:7.2%}"
        )
        if args.json:
            args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
