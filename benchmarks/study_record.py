"""One study's run, recorded as one JSON file: how fast its trials went and what it found.

    python -m benchmarks.study_record --storage URL --wall-seconds S --workers W --out DIR

`benchmarks/gpu_check.sh` runs it after the seed study and its retrain, with the wall
time it measured around `mnist-study run`. The file is `<preset>-study-<gpu>-<date>.json`
(`seed-study-h100-2026-11-28.json`: the GPU as `h100`, `h200`, or `cpu`; the date in UTC),
committed beside the other benchmark results. It holds what happened and nothing more: a
study stopped before its budget says `partial`, and no figure is carried over to the
trials that did not run.

A study that is resumed run after run (the seed study, one device lease at a time) is
recorded after each: `--finished-before` says how many trials had finished when this run
began, so the rate counts this run's trials against this run's wall time, and
`--run-started` logs the run in the study itself (its `timed_runs` attribute, which the
database carries to the next lease), so the record adds up every run's wall time. A
trial interrupted before it ended is thrown-away work, but for what its checkpoint kept:
`trial_seconds_lost` is the time this run's failed trials had trained since their last
checkpoint.

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
    "trials_before",
    "trials_this_run",
    "trial_seconds_lost",
    "wall_seconds_all_runs",
    "runs",
)

# The study attribute that logs each timed run of a study resumed run after run.
RUNS_ATTR = "timed_runs"


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

    from benchmarks.machine import cpu_model

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


def seconds_lost(study: optuna.Study, since: datetime.datetime | None) -> float:
    """Seconds that the failed trials started at or after `since` (all, if None) had
    trained when they failed and that no checkpoint kept: interrupted work, to be done
    again. A trial's checkpoint keeps its training up to the checkpoint, less what it
    had itself resumed from (`study.checkpoints`)."""
    from optuna.trial import TrialState

    from study.checkpoints import CHECKPOINT_ATTR, RESUMED_FROM

    lost = 0.0
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if t.datetime_start is None or t.datetime_complete is None:
            continue
        if since is not None and t.datetime_start < since:
            continue
        trained = (t.datetime_complete - t.datetime_start).total_seconds()
        kept = (t.system_attrs.get(CHECKPOINT_ATTR) or {}).get("seconds", 0.0)
        before = (t.user_attrs.get(RESUMED_FROM) or {}).get("seconds", 0.0)
        lost += max(0.0, trained - max(0.0, kept - before))
    return lost


def log_run(study: optuna.Study, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Add `run` to the study's log of timed runs (a run logged again, by its `started`,
    replaces its entry); the log, oldest first."""
    runs = [r for r in study.user_attrs.get(RUNS_ATTR, []) if r["started"] != run["started"]]
    runs = sorted([*runs, run], key=lambda r: r["started"])
    study.set_user_attr(RUNS_ATTR, runs)
    return runs


def study_record(
    study: optuna.Study,
    *,
    wall_seconds: float,
    workers: int,
    trials_per_worker: int,
    precision: str | None,
    cuda_graphs: bool = False,
    finished_before: int = 0,
    run_started: float | None = None,
) -> tuple[dict[str, Any], str]:
    """The record of `study` (the fields of FIELDS), and the slug of its device. With
    `run_started` (Unix time), the run is also logged in the study (`log_run`)."""
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
    if not 0 <= finished_before <= counts.finished:
        raise RecordError(
            f"--finished-before {finished_before}: the study has {counts.finished} finished "
            "trials, so it must be between 0 and that"
        )
    best = counts.best
    # A retrain of a trial that is no longer the best (the study went on after it, with a
    # larger budget) measured another network: the record has no test figure, as before
    # any retrain. Its metrics may also be gone with the folder of an earlier device lease.
    stale = best is not None and study.user_attrs.get("retrained_trial", best.number) != best.number
    metrics = None if stale else read_metrics(study)
    if metrics is not None and best is not None and metrics.get("trial") != best.number:
        # A retrain from before later trials beat it: its test accuracy is another network's.
        raise RecordError(
            f"the retrain's metrics are of trial {metrics.get('trial')}, the best trial is "
            f"{best.number}: retrain again (mnist-study retrain), then record"
        )
    this_run = counts.finished - finished_before
    # Optuna stamps trials with the local time, naive.
    since = None if run_started is None else datetime.datetime.fromtimestamp(run_started)
    lost = seconds_lost(study, since)
    runs = list(study.user_attrs.get(RUNS_ATTR, []))
    if run_started is not None:
        runs = log_run(
            study,
            {
                "started": datetime.datetime.fromtimestamp(
                    run_started, datetime.timezone.utc
                ).isoformat(timespec="seconds"),
                "device": name,
                "wall_seconds": wall_seconds,
                "trials_before": finished_before,
                "trials_after": counts.finished,
                "trial_seconds_lost": lost,
            },
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
        "trials_per_minute": this_run / wall_seconds * 60,
        "mean_epochs": mean_epochs(trials),
        "best_trial": None if best is None else {"number": best.number, "params": best.params},
        "best_cv_accuracy": None if best is None else best.value,
        "test_accuracy": None if metrics is None else metrics["test_accuracy"],
        "retrain_epochs": None if metrics is None else metrics["epochs"],
        "budget": counts.budget,
        "partial": counts.finished < counts.budget,
        "trials_before": finished_before,
        "trials_this_run": this_run,
        "trial_seconds_lost": lost,
        # Without a log (a study run once), this run is all there was.
        "wall_seconds_all_runs": sum(r["wall_seconds"] for r in runs) if runs else wall_seconds,
        "runs": runs,
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
    parser.add_argument(
        "--finished-before", type=int, default=0, metavar="N",
        help="trials the study had finished when this run began (default: 0, a fresh study)",
    )  # fmt: skip
    parser.add_argument(
        "--run-started", type=float, metavar="UNIX",
        help="when this run began (Unix time): log the run in the study, whose record then "
        "adds up every logged run's wall time, and count its lost trial-seconds",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, required=True, metavar="DIR", help="folder to write")
    args = parser.parse_args(argv)

    from study.database import open_storage
    from study.errors import EXIT_FAILURE, EXIT_USAGE, StorageError, StudyError
    from study.studies import list_studies, load_study

    prog = parser.prog
    try:
        storage = open_storage(args.storage, heartbeat=None, write=args.run_started is not None)
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
            finished_before=args.finished_before,
            run_started=args.run_started,
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
        f"({record['trials_complete']} complete; {record['trials_this_run']} in this run, "
        f"{record['trials_before']} before it) in {record['wall_seconds']:.0f} s "
        f"({record['wall_seconds_all_runs']:.0f} s over {max(1, len(record['runs']))} run(s)), "
        f"{record['trials_per_minute']:.2f} per minute, "
        f"{record['trial_seconds_lost']:.0f} trial-seconds lost, on {record['device']}"
        + (" (partial)" if record["partial"] else "")
        + f"; best CV {_figure(record['best_cv_accuracy'])}, "
        f"test {_figure(record['test_accuracy'])}"
    )
    return 0


def _figure(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


if __name__ == "__main__":
    sys.exit(main())
