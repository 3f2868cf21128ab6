"""The commands' bodies: each takes the parsed arguments, does its work and returns the
exit code; `study.cli` parses and dispatches. torch and Optuna are imported inside the
bodies that use them, so that `--help` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from study.database import DEFAULT_STORAGE, STORAGE_ENV
from study.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    StudyError,
    UsageError,
    check_writable,
    redact,
)
from study.params import parse_params
from study.presets import DEFAULT_PRESET, get_preset
from study.progress import count_bar, epoch_bar
from study.tables import space_summary, status_block, train_table

if TYPE_CHECKING:
    import optuna
    import torch
    from optuna.storages import BaseStorage

    from study.objective import SpeedOptions
    from study.presets import Preset
    from study.retrain import RetrainOutcome


def _data_root(args: argparse.Namespace) -> Path:
    from model.data import default_root

    return args.root if args.root is not None else default_root()


def data(args: argparse.Namespace) -> int:
    from model.data import ensure_mnist, load_mnist

    root = _data_root(args)
    source = ensure_mnist(root, refetch=args.refetch)
    mnist = load_mnist(root)
    print(f"MNIST: {source}")
    for split, labels in (("train", mnist.train_labels), ("test", mnist.test_labels)):
        counts = labels.bincount(minlength=10).tolist()
        print(f"  {split:5s} {labels.shape[0]:6d} images, per digit {counts}")
    return 0


def train(args: argparse.Namespace) -> int:
    preset = _preset(args)
    config = preset.defaults.with_params(parse_params(args.params))

    from model.device import resolve_device

    device = resolve_device(args.device)
    _check_precision(args.precision, device)

    from model.data import ensure_mnist, load_mnist, to_device
    from model.kfold import train_kfold

    root = _data_root(args)
    ensure_mnist(root)
    mnist = load_mnist(root)
    data = to_device(mnist.train_images, mnist.train_labels, device)
    result = train_kfold(
        config,
        data,
        on_progress=epoch_bar(config.max_epochs),
        precision=args.precision,
        compile=args.compile,
        graphs=args.cuda_graphs,
    )
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    print(train_table(result))
    return 0


def _preset(args: argparse.Namespace, storage_url: str | None = None) -> Preset:
    """The study file `--space` names, else the shipped preset `--preset` names; with
    neither, the file that the existing study `--study` in `storage_url` stores (so a
    study made from a file resumes without it), else the default preset."""
    if args.space is not None:
        from study.study_file import read_study_file

        return read_study_file(args.space)
    if args.preset is not None:
        return get_preset(args.preset)
    if storage_url is not None and getattr(args, "study", None):
        from study.studies import stored_preset

        stored = stored_preset(storage_url, args.study)
        if stored is not None:
            return stored
    return get_preset(DEFAULT_PRESET)


def _storage_url(args: argparse.Namespace) -> str:
    if args.storage is not None and not args.storage.strip():
        raise UsageError("--storage is empty: give a database URL such as sqlite:///optuna.db")
    return args.storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def _speed(args: argparse.Namespace) -> SpeedOptions:
    """The training options `run` and `worker` share, from their flags."""
    from study.checkpoints import CHECKPOINT_EVERY_S
    from study.objective import SpeedOptions

    return SpeedOptions(
        precision=args.precision,
        compile=args.compile,
        graphs=args.cuda_graphs,
        trials_per_worker=args.trials_per_worker,
        checkpoint_every=(
            CHECKPOINT_EVERY_S if args.checkpoint_every is None else args.checkpoint_every or None
        ),
    )


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def space(args: argparse.Namespace) -> int:
    from study.sampler import draw_params

    _quiet_optuna()
    preset = _preset(args)
    draws = draw_params(preset.space, preset.defaults, args.sample, args.seed)
    if args.json:
        for params in draws:
            print(json.dumps(params))
        return 0
    print(space_summary(preset, draws, args.seed))
    return 0


def run(args: argparse.Namespace) -> int:
    storage_url = _storage_url(args)
    preset = _preset(args, storage_url)

    from model.data import check_mnist
    from model.device import resolve_device
    from study.launcher import RunOptions, plan_workers, run_study

    _quiet_optuna()
    _check_slurm_flags(args)
    if not args.slurm:
        # On SLURM the tasks' devices are known only there; each worker checks its own.
        for device, _ in plan_workers(args.devices, args.workers, args.workers_per_device):
            _check_precision(args.precision, resolve_device(device))
    # Damaged MNIST files or an unwritable --out stop the run before the storage is
    # created or touched; missing MNIST files are fetched by run_study.
    check_mnist(_data_root(args))
    if args.out is not None:
        check_writable(args.out)
    options = RunOptions(
        storage=storage_url,
        study=args.study or f"mnist-{preset.name}",
        preset=preset,
        n_trials=args.n_trials,
        workers=args.workers,
        devices=args.devices,
        seed=args.seed,
        timeout=args.timeout,
        data_root=_data_root(args),
        heartbeat=args.heartbeat,
        artifacts=args.artifacts,
        workers_per_device=args.workers_per_device,
        speed=_speed(args),
    )
    if args.slurm:
        from study.slurm import SlurmOptions, check_options, job_script, run_array

        slurm = SlurmOptions(sbatch=args.sbatch, tasks=args.tasks or 1)
        check_options(options, slurm)
        logs = Path("slurm-logs").resolve()
        if args.dry_run:
            print(job_script(options, slurm, logs), end="")
            return 0
        outcome = run_array(options, slurm, logs, log=lambda line: print(line, file=sys.stderr))
        unmet = (
            f"the array's tasks ended before the budget was met; see their logs in {logs}, "
            "then run the same command to submit again"
        )
    else:
        outcome = run_study(options, log=lambda line: print(line, file=sys.stderr))
        workers = ", ".join(f"w{i}" for i in outcome.failed_workers) or "all"
        unmet = (
            f"workers ({workers}) stopped before the budget was met; see their messages "
            "above, then run the same command to resume"
        )
    print(status_block(outcome.study.study_name, outcome.study, outcome.counts))
    if outcome.counts.done and not args.no_retrain:
        from study.database import open_storage

        device = resolve_device(plan_workers(args.devices, 1)[0][0])
        _retrain_and_print(
            outcome.study, None, device, options.data_root, json_out=False, precision=args.precision
        )
        storage = open_storage(options.storage, heartbeat=None)
        page = _write_report(
            outcome.study, storage, options.storage, args.out, args.artifacts, options.data_root
        )
        print(f"report: {page}")
    if outcome.interrupted:
        print("interrupted: the study is saved; run the same command to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    if outcome.timed_out:
        print(
            f"stopped by --timeout {args.timeout:g} s after {outcome.seconds:.0f} s; "
            "run again to resume",
            file=sys.stderr,
        )
        return 0
    if not outcome.counts.done:
        print(f"mnist-study run: error: {unmet}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _check_slurm_flags(args: argparse.Namespace) -> None:
    """The flags that belong to local workers or to `--slurm` alone, refused elsewhere."""
    if not args.slurm:
        for flag, given in (("--tasks", args.tasks is not None), ("--dry-run", args.dry_run)):
            if given:
                raise UsageError(f"{flag} belongs to --slurm")
        return
    local = {
        "--workers": args.workers is not None,
        "--devices": args.devices is not None,
        "--workers-per-device": args.workers_per_device is not None,
    }
    for flag, given in local.items():
        if given:
            raise UsageError(
                f"--slurm: each task runs one worker per GPU it is given, so {flag} has no "
                "place; ask sbatch for GPUs after --, e.g. -- --gres=gpu:2"
            )
    if args.timeout is not None:
        raise UsageError(
            "--slurm: give the array sbatch's time limit instead of --timeout, e.g. "
            "-- --time=2:00:00; at it the workers checkpoint their trials and stop"
        )


def worker(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from model.device import resolve_device
    from study.launcher import run_worker_per_device, task_devices, task_threads
    from study.worker import WorkerOptions, run_worker

    devices = [args.device]
    if args.each_gpu:
        if args.device is not None:
            raise UsageError("--each-gpu takes the task's GPUs from SLURM; give no --device")
        devices = task_devices(os.environ)
    _check_precision(args.precision, resolve_device(devices[0]))
    if args.quiet:
        _quiet_optuna()
    options = WorkerOptions(
        storage=_storage_url(args),
        study=args.study,
        device=args.device,
        data_root=_data_root(args),
        heartbeat=args.heartbeat,
        threads=args.threads,
        worker_id=args.worker_id,
        parent_pid=args.parent_pid,
        artifacts=args.artifacts,
        speed=_speed(args),
        deadline=args.deadline,
    )

    def log(line: str) -> None:
        print(f"mnist-study worker: {line}", file=sys.stderr)

    if len(devices) > 1:
        return run_worker_per_device(options, devices, log)
    if args.each_gpu:
        threads = args.threads or task_threads(os.environ, 1)
        options = replace(options, device=devices[0], threads=threads)
    ran = run_worker(options, log=log)
    if not args.quiet:
        print(f"worker done: ran {ran} trial(s); the study's budget is met", file=sys.stderr)
    return 0


def status(args: argparse.Namespace) -> int:
    from study.budget import count_trials
    from study.database import open_storage
    from study.studies import list_studies, load_study

    _quiet_optuna()
    storage = open_storage(_storage_url(args), heartbeat=None, write=False)
    names = [args.study] if args.study else list_studies(storage)
    if not names:
        raise StudyError("the storage holds no studies; start one with `mnist-study run`")
    report = {}
    for name in names:
        study = load_study(storage, name)
        report[name] = (study, count_trials(study))
    if args.json:
        print(
            json.dumps(
                {
                    name: {
                        "preset": study.user_attrs.get("preset"),
                        **counts.as_dict(),
                        "retrained_trial": study.user_attrs.get("retrained_trial"),
                        "study_file": study.user_attrs.get("study_file"),
                    }
                    for name, (study, counts) in report.items()
                }
            )
        )
        return 0
    print(
        "\n\n".join(status_block(name, study, counts) for name, (study, counts) in report.items())
    )
    return 0


def _open_study(args: argparse.Namespace, *, write: bool) -> tuple[BaseStorage, optuna.Study, str]:
    """(storage, study, url) for --study, or the storage's only study when none is named."""
    from study.database import open_storage
    from study.studies import list_studies, load_study

    _quiet_optuna()
    url = _storage_url(args)
    storage = open_storage(url, heartbeat=None, write=write)
    name = args.study
    if name is None:
        names = list_studies(storage)
        if len(names) != 1:
            there = ", ".join(names) if names else "none"
            raise StudyError(f"name the study with --study; the storage holds: {there}")
        name = names[0]
    return storage, load_study(storage, name), url


def _retrain_and_print(
    study: optuna.Study,
    out_dir: Path | None,
    device: torch.device,
    data_root: Path,
    *,
    json_out: bool,
    precision: str | None = None,
    ensemble: bool | None = None,
) -> None:
    from model.data import require_mnist
    from study.retrain import best_finished_trial, final_epochs, retrain_best, study_slug
    from study.studies import study_preset

    # What would stop the retrain stops it before its progress line, so that an error
    # is the only line.
    trial = best_finished_trial(study)
    require_mnist(data_root)
    out_dir = out_dir or Path("runs") / study_slug(study.study_name)
    check_writable(out_dir)
    preset = study_preset(study)
    if ensemble is None:
        ensemble = preset.ensemble
    config = preset.space.configure(trial.params, preset.defaults)
    epochs, _ = final_epochs(config, trial.user_attrs.get("best_epochs"))
    print(f"retraining the best trial of {study.study_name!r} on {device}", file=sys.stderr)
    outcome = retrain_best(
        study,
        out_dir=out_dir,
        device=device,
        data_root=data_root,
        precision=precision,
        ensemble=ensemble,
        on_epoch=count_bar(epochs, "retrain"),
        on_fold_epoch=count_bar(config.max_epochs, "folds") if ensemble else None,
    )
    _print_final(outcome, json_out)


def _print_final(outcome: RetrainOutcome, json_out: bool) -> None:
    m = outcome.metrics
    if json_out:
        print(json.dumps(m))
        return
    what = f"trial {m['trial']}" if "trial" in m else "the configuration"
    lines = [
        f"retrained {what} for {m['epochs']} epochs on {m['train_images']} images "
        f"({m['seconds']:.1f} s on {m['device']}): test accuracy {m['test_accuracy']:.4f} "
        "(the seed report: 0.9798)"
    ]
    if "ensemble" in m:
        e = m["ensemble"]
        lines.append(
            f"its {e['networks']} fold networks together ({e['seconds']:.1f} s): "
            f"test accuracy {e['test_accuracy']:.4f}"
        )
    lines += [f"checkpoint: {outcome.checkpoint}", f"metrics: {outcome.metrics_path}"]
    print("\n".join(lines))


def _write_report(
    study: optuna.Study,
    storage: BaseStorage,
    url: str,
    out_dir: Path | None,
    artifacts: Path | None,
    data_root: Path,
) -> Path:
    from study.artifacts import artifact_dir
    from study.reporting import build_report, retrained_network
    from study.retrain import study_slug

    # A refused checkpoint stops the report before its progress line.
    network = retrained_network(study)
    out_dir = out_dir or Path("reports") / study_slug(study.study_name)
    check_writable(out_dir)
    print(f"writing the report of {study.study_name!r}", file=sys.stderr)
    return build_report(
        study,
        storage,
        storage_url=url,
        out_dir=out_dir,
        artifact_dir=artifact_dir(url, artifacts),
        data_root=data_root,
        network=network,
    )


def retrain(args: argparse.Namespace) -> int:
    from model.device import resolve_device

    device = resolve_device(args.device)
    _check_precision(args.precision, device)
    if args.params is not None:
        return _retrain_params(args, device)
    if args.preset is not None:
        raise UsageError("--preset goes with --params; a study's retrain uses the study's preset")
    _, study, _ = _open_study(args, write=True)  # the test accuracy goes into the study
    _retrain_and_print(
        study,
        args.out,
        device,
        _data_root(args),
        json_out=args.json,
        precision=args.precision,
        ensemble=args.ensemble,
    )
    return 0


def _retrain_params(args: argparse.Namespace, device: torch.device) -> int:
    """`retrain --params`: one configuration on all its images, no study."""
    from model.data import require_mnist
    from study.retrain import train_and_test

    if args.study is not None:
        raise UsageError("--params and --study: give one, a configuration or a study")
    preset = get_preset(args.preset or "quick")
    config = preset.defaults.with_params(parse_params(args.params))
    root = _data_root(args)
    require_mnist(root)
    out_dir = args.out or Path("runs") / "params"
    check_writable(out_dir)
    ensemble = preset.ensemble if args.ensemble is None else args.ensemble
    print(f"training the configuration on {device}", file=sys.stderr)
    outcome = train_and_test(
        config,
        config.max_epochs,
        "max_epochs (no cross-validation chose it)",
        head={"preset": preset.name, "params": parse_params(args.params)},
        out_dir=out_dir,
        device=device,
        data_root=root,
        precision=args.precision,
        ensemble=ensemble,
        on_epoch=count_bar(config.max_epochs, "train"),
        on_fold_epoch=count_bar(config.max_epochs, "folds") if ensemble else None,
    )
    _print_final(outcome, args.json)
    return 0


def report(args: argparse.Namespace) -> int:
    storage, study, url = _open_study(args, write=False)
    page = _write_report(study, storage, url, args.out, args.artifacts, _data_root(args))
    print(f"report: {page}")
    return 0


def dashboard(args: argparse.Namespace) -> int:
    from optuna_dashboard import run_server

    from study.artifacts import artifact_dir, open_artifact_store
    from study.database import open_storage

    url = _storage_url(args)
    storage = open_storage(url, heartbeat=None, write=False)
    store = open_artifact_store(artifact_dir(url, args.artifacts), create=False)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(
            f"mnist-study dashboard: warning: listening on {args.host}: optuna-dashboard has "
            "no authentication, so anyone who reaches this port can read and change the studies",
            file=sys.stderr,
        )
    print(
        f"optuna-dashboard on {redact(url)}: http://{args.host}:{args.port}/ (Ctrl-C stops it)",
        file=sys.stderr,
    )
    try:
        run_server(storage, host=args.host, port=args.port, artifact_store=store)
    except OSError as exc:
        raise UsageError(
            f"cannot listen on {args.host}:{args.port}: {exc.strerror or exc}"
        ) from None
    return 0


def _check_precision(precision: str | None, device: torch.device) -> None:
    from model.steps import resolve_precision

    try:
        resolve_precision(precision, device)
    except ValueError as exc:
        raise UsageError(f"--precision: {exc}") from None
