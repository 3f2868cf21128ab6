"""One study's run, recorded as one JSON file: how fast its trials went and what it found.

    python -m benchmarks.study_record --storage URL --wall-seconds S --workers W --out DIR

`benchmarks/gpu_check.sh` runs it after the seed study and its retrain, with the wall
time it measured around `mnist-study run`. The file is `<preset>-study-<gpu>-<date>.json`
(`seed-study-h100-2026-11-28.json`: the GPU as `h100`, `h200`, or `cpu`; the date in UTC),
committed beside the other benchmark results. It holds what happened and nothing more: a
study stopped before its budget says `partial`, and no figure is carried over to the
trials that did not run. The rate counts every finished trial of the study against
`--wall-seconds`, so the wall time must cover all of them: record a fresh study, not one
resumed across runs.

The trials, the budget and the best trial come from the storage (`count_trials`,
`load_study`), the test accuracy and the retrain's epochs from the `metrics.json` that
`mnist-study retrain` wrote and named in the study's attributes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from model.config import PRECISIONS

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial

# The file's fields, in order; the test holds the file to exactly these.
FIELDS = (
    "device",
    "torch",
    "precision",
    "cuda_graphs",
    "workers",
    "trials_per_worker",
    "trials_finished",
    "trials_complete",
    "wall_seconds",
    "trials_per_minute",
    "mean_epochs",
    "best_trial",
    "best_cv_accuracy",
    "test_accuracy",
    "retrain_epochs",
    "budget",
    "partial",
)


class RecordError(Exception):
    """The record cannot be made as asked; the message says why in one line."""


def gpu_slug(device_name: str) -> str:
    """A GPU's name as a file-name word: its model (`h100`, `a100`, `l40s`) where the name
    has one, else the whole name minus the vendor, hyphenated."""
    words = [w for w in re.split(r"[^a-z0-9]+", device_name.lower()) if w and w != "nvidia"]
    # Data-centre names carry the model as letters then digits (H100, A100-SXM4, L40S);
    # memory sizes (80GB) have them the other way round.
    model = next((w for w in words if re.fullmatch(r"[a-z]+\d+[a-z]*", w)), None)
    return model or "-".join(words) or "gpu"


def ran_on(trials: list[FrozenTrial]) -> str:
    """The device the finished trials ran on (`cuda:0`, `cpu`), as the objective stored
    it; where none has finished, the device a worker here would take."""
    devices = sorted({str(t.user_attrs["device"]) for t in trials if "device" in t.user_attrs})
    if devices:
        # One device per study run here; a GPU wins over a stray CPU trial, as the name
        # of the file should say what the study was for.
        return next((d for d in devices if d.startswith("cuda")), devices[0])
    from model.device import resolve_device

    return str(resolve_device(None))


def describe(device: str) -> tuple[str, str]:
    """(name, slug) of `device` on this machine: the GPU's name, or the CPU's model."""
    import os

    import torch

    from benchmarks.speed import cpu_model

    if not device.startswith("cuda"):
        # The cores the workers shared out (as `run` counts them), not this process's threads.
        return f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores", "cpu"
    if not torch.cuda.is_available():
        raise RecordError(
            f"the trials ran on {device} but this machine has no GPU: record the study "
            "on the machine that ran it"
        )
    name = torch.cuda.get_device_name(torch.device(device))
    return name, gpu_slug(name)


def mean_epochs(trials: list[FrozenTrial]) -> float | None:
    """Mean over the trials of the epochs their folds ran (each trial's own fold mean
    first, so that every trial weighs the same whatever its k)."""
    per_trial = [statistics.fmean(t.user_attrs["epochs_run"]) for t in trials]
    return statistics.fmean(per_trial) if per_trial else None


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """The trials that ended and left their epochs: complete, pruned, and those failed
    after training (a trial interrupted mid-way stores no epochs, and is queued again)."""
    from optuna.trial import TrialState

    ended = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [
        t
        for t in study.get_trials(deepcopy=False)
        if t.state in ended and t.user_attrs.get("epochs_run")
    ]


def read_metrics(study: optuna.Study) -> dict[str, Any] | None:
    """The retrain's metrics that the study names, or None before any retrain."""
    from study.stored_paths import resolve_path

    stored = study.user_attrs.get("metrics")
    if not stored:
        return None
    path = resolve_path(study, stored)
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise RecordError(f"cannot read the retrain's metrics {path}: {exc}") from None


def study_record(
    study: optuna.Study,
    *,
    wall_seconds: float,
    workers: int,
    trials_per_worker: int,
    precision: str | None,
    cuda_graphs: bool = False,
) -> tuple[dict[str, Any], str]:
    """The record of `study` (the fields of FIELDS), and the slug of its device."""
    import torch

    from model.steps import resolve_precision
    from study.budget import count_trials

    if not wall_seconds > 0:
        raise RecordError(f"--wall-seconds {wall_seconds:g}: must be greater than 0")
    if workers < 1 or trials_per_worker < 1:
        raise RecordError("--workers and --trials-per-worker: must be at least 1")
    counts = count_trials(study)
    trials = finished_trials(study)
    device = ran_on(trials)
    name, slug = describe(device)
    try:
        precision = resolve_precision(precision, torch.device(device))
    except ValueError as exc:  # tf32 named for a study that ran on the CPU
        raise RecordError(f"--precision: {exc}") from None
    metrics = read_metrics(study)
    best = counts.best
    if metrics is not None and best is not None and metrics.get("trial") != best.number:
        # A retrain from before later trials beat it: its test accuracy is another network's.
        raise RecordError(
            f"the retrain's metrics are of trial {metrics.get('trial')}, the best trial is "
            f"{best.number}: retrain again (mnist-study retrain), then record"
        )
    record = {
        "device": name,
        "torch": torch.__version__,
        "precision": precision,
        "cuda_graphs": cuda_graphs,
        "workers": workers,
        "trials_per_worker": trials_per_worker,
        "trials_finished": counts.finished,
        "trials_complete": counts.complete,
        "wall_seconds": wall_seconds,
        "trials_per_minute": counts.finished / wall_seconds * 60,
        "mean_epochs": mean_epochs(trials),
        "best_trial": None if best is None else {"number": best.number, "params": best.params},
        "best_cv_accuracy": None if best is None else best.value,
        "test_accuracy": None if metrics is None else metrics["test_accuracy"],
        "retrain_epochs": None if metrics is None else metrics["epochs"],
        "budget": counts.budget,
        "partial": counts.finished < counts.budget,
    }
    return record, slug


def record_name(preset: str, slug: str, day: datetime.date) -> str:
    return f"{preset}-study-{slug}-{day.isoformat()}.json"


def write_record(out_dir: Path, name: str, record: dict[str, Any]) -> Path:
    """Write the record whole or not at all: a check killed at its deadline leaves no
    half a file to be committed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / name
    partial = out_dir / f".{name}.partial"
    partial.write_text(json.dumps(record, indent=1) + "\n")
    partial.replace(path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.study_record", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--storage", required=True, metavar="URL", help="the study's storage")
    parser.add_argument(
        "--study", metavar="NAME", help="study name (default: the storage's only study)"
    )
    parser.add_argument(
        "--wall-seconds", type=float, required=True, metavar="S",
        help="wall time of the `mnist-study run` that ran the study's trials",
    )  # fmt: skip
    parser.add_argument("--workers", type=int, required=True, help="the run's worker processes")
    parser.add_argument(
        "--trials-per-worker", type=int, default=1, metavar="B",
        help="trials each worker trained at once (default: 1)",
    )  # fmt: skip
    parser.add_argument(
        "--precision", choices=("", *PRECISIONS),
        help="the run's --precision; empty or left out: what the run defaulted to",
    )  # fmt: skip
    parser.add_argument(
        "--cuda-graphs", type=int, choices=(0, 1), default=0,
        help="1 if the run captured whole epochs as CUDA graphs (run --cuda-graphs)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write")
    args = parser.parse_args(argv)

    from study.database import open_storage
    from study.errors import EXIT_FAILURE, EXIT_USAGE, StorageError, StudyError
    from study.studies import list_studies, load_study

    prog = parser.prog
    try:
        storage = open_storage(args.storage, heartbeat=None, write=False)
        names = [args.study] if args.study else list_studies(storage)
        if len(names) != 1:
            raise StudyError(f"name the study with --study; the storage holds: {names}")
        study = load_study(storage, names[0])
        record, slug = study_record(
            study,
            wall_seconds=args.wall_seconds,
            workers=args.workers,
            trials_per_worker=args.trials_per_worker,
            precision=args.precision or None,
            cuda_graphs=bool(args.cuda_graphs),
        )
    except (StudyError, RecordError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except StorageError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    today = datetime.datetime.now(datetime.timezone.utc).date()
    path = write_record(args.out, record_name(study.user_attrs["preset"], slug, today), record)
    print(
        f"{path}: {record['trials_finished']}/{record['budget']} trials "
        f"({record['trials_complete']} complete) in {record['wall_seconds']:.0f} s, "
        f"{record['trials_per_minute']:.2f} per minute, on {record['device']}"
        + (" (partial)" if record["partial"] else "")
        + f"; best CV {_figure(record['best_cv_accuracy'])}, "
        f"test {_figure(record['test_accuracy'])}"
    )
    return 0


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
