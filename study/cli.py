"""`mnist-study`: the one command line (also `python -m study`).

Every error a user can cause ends here as one line on stderr and a non-zero exit:
2 for bad input on the command line (a flag, a parameter, a device, a study that does not
match), 1 when the data or the storage cannot serve the request, 130 for Ctrl-C.
Bugs still raise with a traceback.

torch is imported only by the commands that use it: it takes seconds to import, and a
mistyped flag or `--help` should answer at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.config import ACTIVATIONS, ConfigError
from study.database import DEFAULT_HEARTBEAT, DEFAULT_STORAGE
from study.errors import StorageError, StudyError, redact
from study.presets import DEFAULT_PRESET, PRESETS, get_preset

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130

# Copies of model.kfold.PRECISIONS and study.launcher.STORAGE_ENV, whose modules import
# torch; a test holds them equal.
PRECISIONS = ("fp32", "tf32", "bf16")
STORAGE_ENV = "MNIST_STUDY_STORAGE"

# The errors a user can cause, by module and name: a module that was never imported raised
# none of them, so looking them up in sys.modules spares importing torch to catch them.
_USER_ERRORS = (
    ("model.device", "DeviceError", EXIT_USAGE),
    ("model.data", "DataError", EXIT_FAILURE),
    ("model.checkpoint", "CheckpointError", EXIT_FAILURE),
)


class UsageError(Exception):
    """Bad input from the command line; exit 2."""


class OutputError(Exception):
    """A folder the command must write into cannot be made or written; exit 1."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (argparse would print the usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        # argparse quotes some arguments it echoes and not others ("unrecognized arguments").
        message = _printable(message)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _printable(text: str) -> str:
    """`text` with URL passwords masked and control characters (newlines too) escaped."""
    text = redact(text)
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would blame the top-level program for a flag the command lacks.
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    prog = f"mnist-study {args.command}"
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:
        code = _exit_code(exc)
        if code is None:
            raise
        print(f"{prog}: error: {_printable(_one_line(exc))}", file=sys.stderr)
        return code


def _exit_code(exc: Exception) -> int | None:
    """The exit code of an error the user can fix, None for a bug."""
    if isinstance(exc, UsageError | ConfigError | StudyError):
        return EXIT_USAGE
    if isinstance(exc, StorageError | OutputError):
        return EXIT_FAILURE
    for module, name, code in _USER_ERRORS:
        error = getattr(sys.modules.get(module), name, None)
        if error is not None and isinstance(exc, error):
            return code
    # A path the system refused (--out inside a file, a folder without write permission):
    # the user's to fix, and the path and reason say all there is to say.
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return EXIT_FAILURE
    return None


def _one_line(exc: Exception) -> str:
    """The message on one line whatever it holds: a second line would read as another error."""
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return " ".join(str(exc).split()) or type(exc).__name__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mnist-study",
        description="Optuna hyperparameter studies of fully connected networks on MNIST.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = _command(commands, "data", cmd_data, "fetch MNIST if missing and show where it is")
    _add_root(data)
    data.add_argument(
        "--refetch", action="store_true",
        help="fetch again the files that fail verification (truncated or corrupted), "
        "replacing only those",
    )  # fmt: skip

    train = _command(
        commands, "train", cmd_train, "cross-validate one configuration and print its accuracy"
    )
    train.add_argument(
        "--params",
        metavar="JSON|FILE",
        default="{}",
        help="parameters over the preset's defaults, as a JSON object or a file holding one, "
        'e.g. \'{"n_units_l0": 300, "activation": "hardswish"}\'. Names: n_units_l0, '
        f"n_units_l1, ... (one per hidden layer), activation ({', '.join(ACTIVATIONS)}), "
        "optimizer (adam, adamax), dropout, lr, weight_decay, batch_size (null: full batch), "
        "max_epochs, patience, k, subset, fold_seed, seed",
    )
    _add_preset(train)
    train.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    train.add_argument("--json", action="store_true", help="print one JSON object")
    _add_root(train)
    _add_speed(train)

    space = _command(
        commands, "space", cmd_space, "draw configurations from a preset's priors, train nothing"
    )
    _add_preset(space)
    space.add_argument(
        "--sample",
        type=_whole_number(1, 100_000),
        required=True,
        metavar="N",
        help="draws (at most 100,000)",
    )
    space.add_argument("--seed", type=_seed, default=0, help="sampler seed (default: 0)")
    space.add_argument("--json", action="store_true", help="one JSON object per draw")

    run = _command(
        commands, "run", cmd_run, "create or resume a study and run it to its budget with workers"
    )
    _add_preset(run)
    _add_study(run, required=False)
    _add_storage(run)
    run.add_argument(
        "--n-trials",
        type=_positive_int,
        metavar="N",
        help="the study's budget of finished trials (default: the preset's; given on resume, "
        "it replaces the stored budget)",
    )
    run.add_argument(
        "--workers",
        type=_whole_number(1, MAX_WORKERS),
        metavar="W",
        help="worker processes (default: one per device)",
    )
    run.add_argument(
        "--devices",
        type=_device_list,
        metavar="LIST",
        help="comma-separated devices the workers are spread over, e.g. cuda:0,cuda:1 "
        "(default: every GPU, else cpu)",
    )
    run.add_argument(
        "--workers-per-device", type=_whole_number(1, MAX_WORKERS), metavar="N",
        help="workers on each device when --workers is not given (default: 1)",
    )  # fmt: skip
    run.add_argument(
        "--seed", type=_seed, help="sampler seed of a new study (default: random, stored)"
    )
    run.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SEC",
        help="after SEC seconds, finish the running trials and stop; rerun to resume",
    )
    run.add_argument(
        "--no-retrain", action="store_true",
        help="when the budget is met, skip retraining the best trial and the report",
    )  # fmt: skip
    run.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for the report (default: reports/<study>)"
    )
    _add_root(run)
    _add_heartbeat(run)
    _add_artifacts(run)
    _add_speed(run)

    worker = _command(
        commands,
        "worker",
        cmd_worker,
        "join an existing study and run trials until its budget is met",
    )
    _add_study(worker, required=True)
    _add_storage(worker)
    worker.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    worker.add_argument(
        "--threads", type=_whole_number(1, MAX_THREADS), help="CPU threads for torch"
    )
    _add_root(worker)
    _add_heartbeat(worker)
    worker.add_argument("--worker-id", help=argparse.SUPPRESS)
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    worker.add_argument("--quiet", action="store_true", help="no per-trial log lines")
    _add_artifacts(worker)
    _add_speed(worker)

    status = _command(commands, "status", cmd_status, "show a study's progress and best trial")
    _add_study(status, required=False)
    _add_storage(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")

    retrain = _command(
        commands, "retrain", cmd_retrain,
        "train the best trial on all its training images and measure the test set once",
    )  # fmt: skip
    _add_study(retrain, required=False, default_text="the storage's only study")
    _add_storage(retrain)
    retrain.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for best.pt and metrics.json "
        "(default: runs/<study>)",
    )  # fmt: skip
    retrain.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    retrain.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_root(retrain)
    _add_speed(retrain, compile_flag=False)

    report = _command(commands, "report", cmd_report, "write the study's HTML report page")
    _add_study(report, required=False, default_text="the storage's only study")
    _add_storage(report)
    report.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for index.html and its images "
        "(default: reports/<study>)",
    )  # fmt: skip
    _add_root(report)
    _add_artifacts(report)

    dashboard = _command(
        commands, "dashboard", cmd_dashboard, "serve optuna-dashboard on the study storage"
    )
    _add_storage(dashboard)
    dashboard.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this "
        "machine only; optuna-dashboard has no authentication)",
    )  # fmt: skip
    dashboard.add_argument("--port", type=_whole_number(1, 65535), default=8080, help="port")
    _add_artifacts(dashboard)
    return parser


def _add_speed(parser: argparse.ArgumentParser, *, compile_flag: bool = True) -> None:
    parser.add_argument(
        "--precision", choices=PRECISIONS,
        help="matrix products in fp32, tf32 (GPU tensor cores) or bf16 (autocast); "
        "default: tf32 on a GPU, fp32 on the CPU",
    )  # fmt: skip
    if compile_flag:
        parser.add_argument(
            "--compile", action="store_true",
            help="compile the training step with torch.compile (on a GPU as CUDA graphs); "
            "it pays off on long GPU runs, not on the CPU",
        )  # fmt: skip


def _check_precision(precision: str | None, device: Any) -> None:
    from model.steps import resolve_precision

    try:
        resolve_precision(precision, device)
    except ValueError as exc:
        raise UsageError(f"--precision: {exc}") from None


def _add_artifacts(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--artifacts", type=Path, metavar="DIR", help="artifact folder with each trial's "
        "learning curves (default: <sqlite file>.artifacts, else ./artifacts)",
    )  # fmt: skip


def _whole_number(low: int, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{_shorten(text)!r} is not a whole number") from None
        if value < low or (high is not None and value > high):
            bound = f"at least {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"{value} must be {bound}")
        return value

    return parse


_positive_int = _whole_number(1)
_seed = _whole_number(0, 2**31 - 1)
# Bounds past any real use, below where things break: a million torch threads segfaulted,
# a heartbeat of 10^12 s overflows the grace period's timedelta, and the workers are
# planned as a list before any starts.
MAX_THREADS = 1024
MAX_HEARTBEAT = 3600
MAX_WORKERS = 1024


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{_shorten(text)!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value:g} must be greater than 0")
    return value


def _device_list(text: str) -> tuple[str, ...]:
    devices = tuple(d.strip() for d in text.split(",") if d.strip())
    if not devices:
        raise argparse.ArgumentTypeError("needs at least one device, e.g. cuda:0,cuda:1")
    return devices


def _add_study(
    parser: argparse.ArgumentParser, *, required: bool, default_text: str = "mnist-<preset>"
) -> None:
    parser.add_argument(
        "--study",
        required=required,
        metavar="NAME",
        help="study name" + ("" if required else f" (default: {default_text})"),
    )


def _add_storage(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--storage",
        metavar="URL",
        help=f"SQLAlchemy URL of the study storage (default: ${STORAGE_ENV}, else "
        f"{DEFAULT_STORAGE}); postgresql+psycopg://user:pass@host/db for several hosts",
    )


def _add_heartbeat(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--heartbeat",
        type=_whole_number(1, MAX_HEARTBEAT),
        default=DEFAULT_HEARTBEAT,
        metavar="SEC",
        help="seconds between a running trial's heartbeats; a trial silent for 4x as long "
        f"is retried (default: {DEFAULT_HEARTBEAT})",
    )


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."
    )
    sub.set_defaults(handler=handler, command_parser=sub)
    return sub


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        help="MNIST data root (default: $MNIST_ROOT, else ./data)",
    )


def _add_preset(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--preset",
        default=DEFAULT_PRESET,
        choices=list(PRESETS),
        help=f"training settings and defaults (default: {DEFAULT_PRESET}); "
        + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()),
    )


def _data_root(args: argparse.Namespace) -> Path:
    from model.data import default_root

    return args.root if args.root is not None else default_root()


def cmd_data(args: argparse.Namespace) -> int:
    from model.data import ensure_mnist, load_mnist

    root = _data_root(args)
    source = ensure_mnist(root, refetch=args.refetch)
    mnist = load_mnist(root)
    print(f"MNIST: {source}")
    for split, labels in (("train", mnist.train_labels), ("test", mnist.test_labels)):
        counts = labels.bincount(minlength=10).tolist()
        print(f"  {split:5s} {labels.shape[0]:6d} images, per digit {counts}")
    return 0


def parse_params(text: str) -> dict[str, Any]:
    """`--params`: a JSON object given inline, or the path of a file holding one."""
    source = "--params"
    if not text.lstrip().startswith(("{", "[")) and _is_file(text):
        path = text
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--params file {path}: cannot read it ({exc})") from None
        source = f"--params file {path}"
    try:
        params = json.loads(
            text, parse_constant=_not_json, parse_float=_finite_float, parse_int=_short_int
        )
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith(("{", "[")):
            raise UsageError(
                f"--params {_shorten(text)!r}: neither a JSON object nor a readable file"
            ) from None
        raise UsageError(
            f"{source}: bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _NotJson as exc:
        raise UsageError(f"{source}: bad JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{source}: bad JSON: nested too deeply") from None
    if not isinstance(params, dict):
        raise UsageError(f'{source}: must be a JSON object such as {{"n_units_l0": 300}}')
    return params


class _NotJson(ValueError):
    """A number Python's json reads but JSON has not: NaN, Infinity, or one that overflows."""


def _not_json(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{_shorten(text)} is too large for a number")
    return value


def _short_int(text: str) -> int:
    # Python refuses to read integers of over 4300 digits with a ValueError of its own.
    if len(text) > 100:
        raise _NotJson(f"a whole number of {len(text)} digits is too large")
    return int(text)


def _shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_file(text: str) -> bool:
    """Whether `text` names a file; a name the system refuses (too long, say) names none."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def cmd_train(args: argparse.Namespace) -> int:
    preset = get_preset(args.preset)
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
        on_progress=_epoch_bar(config.max_epochs),
        precision=args.precision,
        compile=args.compile,
    )
    if args.json:
        print(json.dumps(result.summary()))
        return 0
    print(_format_table(result))
    return 0


def _epoch_bar(max_epochs: int) -> Callable[[Any], bool]:
    """A progress bar over epochs, on stderr when it is a terminal."""
    from tqdm import tqdm

    bar = tqdm(total=max_epochs, unit="epoch", desc="k-fold", disable=None, leave=False)

    def on_progress(progress: Any) -> bool:
        bar.update(progress.epoch - bar.n)
        bar.set_postfix(mean_acc=f"{progress.mean_accuracy:.4f}", folds=progress.active_folds)
        if progress.active_folds == 0 or progress.epoch >= max_epochs:
            bar.close()
        return False

    return on_progress


def _format_table(result: Any) -> str:
    config = result.config
    lines = [
        f"{'-'.join(map(str, (784, *config.hidden, 10)))} {config.activation} "
        f"dropout {config.dropout:g} {config.optimizer} lr {config.lr:g} "
        f"weight_decay {config.weight_decay:g} "
        f"batch {'full' if config.full_batch else config.batch_size}",
        f"{'fold':>4}  {'accuracy':>8}  {'val loss':>8}  {'best epoch':>10}  {'epochs':>6}",
    ]
    for j in range(config.k):
        lines.append(
            f"{j + 1:>4}  {result.fold_accuracies[j]:>8.4f}  {result.fold_losses[j]:>8.4f}  "
            f"{result.best_epochs[j]:>10d}  {result.epochs_run[j]:>6d}"
        )
    lines.append(
        f"mean accuracy {result.mean_accuracy:.4f} ± {result.std_accuracy:.4f} "
        f"({config.k} folds, {result.seconds:.1f} s on {result.device})"
    )
    if result.diverged:
        lines.append(f"diverged: {result.diverged}")
    return "\n".join(lines)


def _storage_url(args: argparse.Namespace) -> str:
    if args.storage is not None and not args.storage.strip():
        raise UsageError("--storage is empty: give a database URL such as sqlite:///optuna.db")
    return args.storage or os.environ.get(STORAGE_ENV) or DEFAULT_STORAGE


def _quiet_optuna() -> None:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)


def cmd_space(args: argparse.Namespace) -> int:
    from study.sampler import draw_params

    _quiet_optuna()
    preset = get_preset(args.preset)
    draws = draw_params(preset.space, preset.defaults, args.sample, args.seed)
    if args.json:
        for params in draws:
            print(json.dumps(params))
        return 0
    print(_format_space_summary(preset, draws, args.seed))
    return 0


def _format_space_summary(preset: Any, draws: list[dict[str, Any]], seed: int) -> str:
    import statistics

    space = preset.space
    priors = space.priors()
    lines = [
        f"preset {preset.name}: {len(draws)} draws, seed {seed}",
        f"{'parameter':<13} {'mean':>10} {'sd':>10} {'min':>10} {'max':>10}   prior",
    ]
    for name, distribution in space.distributions().items():
        values = [d[name] for d in draws]
        if hasattr(distribution, "choices"):
            counts = ", ".join(f"{c} {values.count(c)}" for c in distribution.choices)
            expected = len(values) / len(distribution.choices)
            lines.append(f"{name:<13} {counts}   uniform: {expected:.1f} each")
            continue
        sd = statistics.pstdev(values) if len(values) > 1 else 0.0
        stats = (statistics.fmean(values), sd, min(values), max(values))
        row = f"{name:<13} " + " ".join(f"{v:>10.4g}" for v in stats)
        if name in priors:
            prior = priors[name]
            mean, prior_sd = prior.truncated_moments(distribution.low, distribution.high)
            row += (
                f"   N({prior.mu:.2f}, {prior.sigma:.2f}) rounded, in "
                f"[{distribution.low}, {distribution.high}]: mean {mean:.2f}, sd {prior_sd:.2f}"
            )
        elif distribution.log:
            low, high = distribution.low, distribution.high
            log_width = math.log(high / low)
            mean = (high - low) / log_width
            prior_sd = math.sqrt((high**2 - low**2) / (2 * log_width) - mean**2)
            row += f"   log-uniform [{low:g}, {high:g}]: mean {mean:.4g}, sd {prior_sd:.4g}"
        else:
            width = distribution.high - distribution.low
            row += (
                f"   uniform [{distribution.low:g}, {distribution.high:g}]: mean "
                f"{(distribution.low + distribution.high) / 2:.4g}, sd {width / 12**0.5:.4g}"
            )
        lines.append(row)
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    storage_url = _storage_url(args)
    preset = get_preset(args.preset)

    from model.data import check_mnist
    from model.device import resolve_device
    from study.launcher import RunOptions, plan_workers, run_study

    _quiet_optuna()
    for device, _ in plan_workers(args.devices, args.workers, args.workers_per_device):
        _check_precision(args.precision, resolve_device(device))
    # Damaged MNIST files or an unwritable --out stop the run before the storage is
    # created or touched; missing MNIST files are fetched by run_study.
    check_mnist(_data_root(args))
    if args.out is not None:
        _check_writable(args.out)
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
        precision=args.precision,
        compile=args.compile,
    )
    outcome = run_study(options, log=lambda line: print(line, file=sys.stderr))
    print(_format_status(outcome.study.study_name, outcome.study, outcome.counts))
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
        print(f"stopped after --timeout {args.timeout:g} s; run again to resume", file=sys.stderr)
        return 0
    if not outcome.counts.done:
        workers = ", ".join(f"w{i}" for i in outcome.failed_workers) or "all"
        print(
            f"mnist-study run: error: workers ({workers}) stopped before the budget was met; "
            "see their messages above, then run the same command to resume",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from model.device import resolve_device
    from study.worker import WorkerOptions, run_worker

    _check_precision(args.precision, resolve_device(args.device))
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
        precision=args.precision,
        compile=args.compile,
    )
    ran = run_worker(
        options, log=lambda line: print(f"mnist-study worker: {line}", file=sys.stderr)
    )
    if not args.quiet:
        print(f"worker done: ran {ran} trial(s); the study's budget is met", file=sys.stderr)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
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
                    name: {"preset": study.user_attrs.get("preset"), **counts.as_dict()}
                    for name, (study, counts) in report.items()
                }
            )
        )
        return 0
    print(
        "\n\n".join(_format_status(name, study, counts) for name, (study, counts) in report.items())
    )
    return 0


def _format_status(name: str, study: Any, counts: Any) -> str:
    attrs = study.user_attrs
    lines = [
        f"study {name}: preset {attrs.get('preset')}, seed {attrs.get('seed')}",
        f"  trials  {counts.finished}/{counts.budget} finished ({counts.complete} complete, "
        f"{counts.pruned} pruned, {counts.failed} failed), {counts.running} running, "
        f"{counts.waiting} queued, {counts.retried} retried",
    ]
    best = counts.best
    if best is None:
        lines.append("  best    none yet")
        return "\n".join(lines)
    sd = best.user_attrs.get("accuracy_sd")
    spread = f" ± {sd:.4f}" if isinstance(sd, float) else ""
    lines.append(f"  best    trial {best.number}: mean CV accuracy {best.value:.4f}{spread}")
    for key, value in best.params.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        lines.append(f"          {key} = {shown}")
    if "test_accuracy" in attrs:
        lines.append(
            f"  test    accuracy {attrs['test_accuracy']:.4f} after retraining "
            f"(checkpoint {attrs.get('checkpoint')})"
        )
    return "\n".join(lines)


def _open_study(args: argparse.Namespace, *, write: bool) -> tuple[Any, Any, str]:
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
    study: Any,
    out_dir: Path | None,
    device: Any,
    data_root: Path,
    *,
    json_out: bool,
    precision: str | None = None,
) -> None:
    from model.data import require_mnist
    from study.retrain import best_finished_trial, retrain_best, study_slug

    # What would stop the retrain stops it before its progress line, so that an error
    # is the only line.
    best_finished_trial(study)
    require_mnist(data_root)
    out_dir = out_dir or Path("runs") / study_slug(study.study_name)
    _check_writable(out_dir)
    print(f"retraining the best trial of {study.study_name!r} on {device}", file=sys.stderr)
    outcome = retrain_best(
        study, out_dir=out_dir, device=device, data_root=data_root, precision=precision
    )
    m = outcome.metrics
    if json_out:
        print(json.dumps(m))
        return
    print(
        f"retrained trial {m['trial']} for {m['epochs']} epochs on {m['train_images']} images "
        f"({m['seconds']:.1f} s on {m['device']}): test accuracy {m['test_accuracy']:.4f} "
        f"(the seed report: 0.9798)\ncheckpoint: {outcome.checkpoint}\nmetrics: "
        f"{outcome.metrics_path}"
    )


def _check_writable(folder: Path) -> None:
    """Refuse a folder that could not be made or written, before the work whose results
    go there: its nearest existing ancestor must be a folder this process may write."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path("."))
    if not existing.is_dir():
        raise OutputError(f"cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {folder}: {existing} is not writable")


def _write_report(
    study: Any,
    storage: Any,
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
    _check_writable(out_dir)
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


def cmd_retrain(args: argparse.Namespace) -> int:
    from model.device import resolve_device

    device = resolve_device(args.device)
    _check_precision(args.precision, device)
    _, study, _ = _open_study(args, write=True)  # the test accuracy goes into the study
    _retrain_and_print(
        study, args.out, device, _data_root(args), json_out=args.json, precision=args.precision
    )
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    storage, study, url = _open_study(args, write=False)
    page = _write_report(study, storage, url, args.out, args.artifacts, _data_root(args))
    print(f"report: {page}")
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
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
