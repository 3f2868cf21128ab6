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
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from model.config import ACTIVATIONS, OPTIMIZERS, PRECISIONS, SCHEDULES
from model.errors import CheckpointError, ConfigError, DataError, DeviceError
from study import commands
from study.checkpoints import CHECKPOINT_EVERY_S
from study.database import DEFAULT_HEARTBEAT, DEFAULT_STORAGE, STORAGE_ENV
from study.errors import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_USAGE,
    OutputError,
    SlurmError,
    StorageError,
    StudyError,
    UsageError,
    redact,
)
from study.params import shorten
from study.presets import DEFAULT_PRESET, PRESETS


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


def parse_command_line(argv: Sequence[str]) -> argparse.Namespace:
    """The command line as `main` reads it; a mistake exits 2 with one line (`_Parser`)."""
    given = list(argv)
    # After `--`, sbatch's own options (`run --slurm`), passed on untouched.
    split = given.index("--") if "--" in given else len(given)
    args, unknown = build_parser().parse_known_args(given[:split])
    if unknown:
        # argparse would blame the top-level program for a flag the command lacks.
        args.command_parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if split < len(given) and not getattr(args, "slurm", False):
        args.command_parser.error("options after -- go to sbatch, and need --slurm")
    args.sbatch = tuple(given[split + 1 :])
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(sys.argv[1:] if argv is None else argv)
    prog = f"mnist-study {args.command}"
    # Ctrl-C and `kill -INT` stop every command cleanly, however it was started: a shell
    # starts background jobs with SIGINT ignored, and Python keeps an ignored SIGINT
    # ignored, so a `run` started that way could not be stopped (seen in a CI run
    # launched in the background: `run` and `dashboard` ran on through their SIGINT).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    # SIGTERM (`kill`, a SLURM time limit or preemption) stops a command as Ctrl-C does,
    # rather than kill it mid-write; a worker handles both signals itself (`StopSignals`).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
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
    if isinstance(exc, UsageError | ConfigError | StudyError | DeviceError):
        return EXIT_USAGE
    if isinstance(exc, StorageError | OutputError | DataError | CheckpointError | SlurmError):
        return EXIT_FAILURE
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


PARAMS_HELP = (
    'as a JSON object or a file holding one, e.g. \'{"n_units_l0": 300, "activation": '
    '"hardswish"}\'. Names: n_layers, n_units_l0, n_units_l1, ... (one per hidden layer), '
    f"activation ({', '.join(ACTIVATIONS)}), optimizer ({', '.join(OPTIMIZERS)}), dropout, "
    "input_dropout, max_norm (null or 0: none), lr, weight_decay, "
    f"schedule ({', '.join(SCHEDULES)}), warmup, label_smoothing, batch_size (null: full "
    "batch), max_epochs, patience, k, subset, fold_seed, seed"
)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mnist-study",
        description="Optuna hyperparameter studies of fully connected networks on MNIST.",
        epilog="The guide: README.md, then docs/ (each command's --help names its page).",
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = _command(
        subcommands, "data", commands.data, "fetch MNIST if missing and show where it is"
    )
    _add_root(data)
    data.add_argument(
        "--refetch", action="store_true",
        help="fetch again the files that fail verification (truncated or corrupted), "
        "replacing only those",
    )  # fmt: skip

    train = _command(
        subcommands,
        "train",
        commands.train,
        "cross-validate one configuration and print its accuracy",
    )
    train.add_argument(
        "--params", metavar="JSON|FILE", default="{}",
        help="parameters over the preset's defaults, " + PARAMS_HELP,
    )  # fmt: skip
    _add_preset(train)
    train.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    train.add_argument("--json", action="store_true", help="print one JSON object")
    _add_root(train)
    _add_speed(train)

    space = _command(
        subcommands,
        "space",
        commands.space,
        "draw configurations from a preset's priors, train nothing",
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
        subcommands,
        "run",
        commands.run,
        "create or resume a study and run it to its budget with workers",
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
        help="end by SEC seconds: workers start no stack of trials that they expect to end "
        "later (by the longest they have run), and at SEC checkpoint the trials still "
        "training and stop; rerun to resume them where they stopped",
    )
    run.add_argument(
        "--no-retrain", action="store_true",
        help="when the budget is met, skip retraining the best trial and the report",
    )  # fmt: skip
    run.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for the report (default: reports/<study>)"
    )
    cluster = run.add_argument_group(
        "on a SLURM cluster",
        "mnist-study run --slurm [OPTIONS] -- [SBATCH OPTIONS]: the workers run as one job "
        "array, each task one worker per GPU it is given; the options after -- (partition, "
        "account, time, --gres, CPUs, memory, --requeue, ...) go into the script. Needs a "
        "storage every node reaches (PostgreSQL) and --artifacts and --root on a filesystem "
        "they share (docs/clusters.md)",
    )
    cluster.add_argument(
        "--slurm", action="store_true",
        help="submit the workers as a SLURM job array instead of starting them here; show "
        "the study's progress, cancel the array on Ctrl-C",
    )  # fmt: skip
    cluster.add_argument(
        "--tasks", type=_whole_number(1, MAX_WORKERS), metavar="N",
        help="tasks in the array (default: 1)",
    )  # fmt: skip
    cluster.add_argument(
        "--dry-run", action="store_true",
        help="print the sbatch script --slurm would submit, and submit nothing",
    )  # fmt: skip
    _add_root(run)
    _add_heartbeat(run)
    _add_artifacts(run)
    _add_speed(run)
    _add_stacking(run)

    worker = _command(
        subcommands,
        "worker",
        commands.worker,
        "join an existing study and run trials until its budget is met",
    )
    _add_study(worker, required=True)
    _add_storage(worker)
    worker.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    worker.add_argument(
        "--each-gpu", action="store_true",
        help="one worker per GPU this job's task was given (CUDA_VISIBLE_DEVICES, else "
        "SLURM_JOB_GPUS; none: one on the CPU), as `run --slurm`'s tasks run",
    )  # fmt: skip
    worker.add_argument(
        "--threads", type=_whole_number(1, MAX_THREADS), metavar="T",
        help="CPU threads for torch (default: torch's; with --each-gpu, the task's CPUs "
        "shared out)",
    )  # fmt: skip
    _add_root(worker)
    _add_heartbeat(worker)
    worker.add_argument("--worker-id", help=argparse.SUPPRESS)
    worker.add_argument("--parent-pid", type=int, help=argparse.SUPPRESS)
    # Unix time from `run --timeout`: the worker claims no stack it expects to end later.
    worker.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    worker.add_argument("--quiet", action="store_true", help="no per-trial log lines")
    _add_artifacts(worker)
    _add_speed(worker)
    _add_stacking(worker)

    status = _command(
        subcommands, "status", commands.status, "show a study's progress and best trial"
    )
    _add_study(status, required=False, default_text="every study in the storage")
    _add_storage(status)
    status.add_argument("--json", action="store_true", help="print one JSON object")

    retrain = _command(
        subcommands, "retrain", commands.retrain,
        "train the best trial on all its training images and measure the test set once",
    )  # fmt: skip
    _add_study(retrain, required=False, default_text="the storage's only study")
    _add_storage(retrain)
    retrain.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for best.pt and metrics.json "
        "(default: runs/<study>)",
    )  # fmt: skip
    retrain.add_argument(
        "--params", metavar="JSON|FILE",
        help="instead of a study's best trial, train this configuration (over --preset's "
        "defaults) for its max_epochs; " + PARAMS_HELP,
    )  # fmt: skip
    retrain.add_argument(
        "--preset", choices=list(PRESETS), default=None,
        help="with --params: the defaults under them (default: quick)",
    )  # fmt: skip
    retrain.add_argument(
        "--ensemble", action=argparse.BooleanOptionalAction, default=None,
        help="also cross-validate the configuration again and measure its k fold networks "
        "together on the test set (averaged probabilities); default: on for the presets "
        "that say so (wide), off otherwise",
    )  # fmt: skip
    retrain.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda if available)")
    retrain.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_root(retrain)
    _add_speed(retrain, compile_flag=False)

    report = _command(subcommands, "report", commands.report, "write the study's HTML report page")
    _add_study(report, required=False, default_text="the storage's only study")
    _add_storage(report)
    report.add_argument(
        "--out", type=Path, metavar="DIR", help="folder for index.html and its images "
        "(default: reports/<study>)",
    )  # fmt: skip
    _add_root(report)
    _add_artifacts(report)

    dashboard = _command(
        subcommands, "dashboard", commands.dashboard, "serve optuna-dashboard on the study storage"
    )
    _add_storage(dashboard)
    dashboard.add_argument(
        "--host", default="127.0.0.1", metavar="ADDRESS",
        help="address to listen on (default: 127.0.0.1, this machine only; optuna-dashboard "
        "has no authentication)",
    )  # fmt: skip
    dashboard.add_argument(
        "--port",
        type=_whole_number(1, 65535),
        default=8080,
        metavar="N",
        help="port (default: 8080)",
    )
    _add_artifacts(dashboard)
    return parser


def _add_speed(parser: argparse.ArgumentParser, *, compile_flag: bool = True) -> None:
    parser.add_argument(
        "--precision", choices=PRECISIONS,
        help="matrix products in fp32, tf32 (GPU tensor cores) or bf16 (autocast); "
        "default: tf32 on a GPU, fp32 on the CPU",
    )  # fmt: skip
    if compile_flag:
        # Both capture CUDA graphs of their own, one inside the other; never shown to work
        # together, so refused rather than left to fail on a GPU.
        graphs = parser.add_mutually_exclusive_group()
        graphs.add_argument(
            "--compile", action="store_true",
            help="compile the training step with torch.compile (on a GPU as CUDA graphs); "
            "it pays off on long GPU runs, not on the CPU",
        )  # fmt: skip
        graphs.add_argument(
            "--cuda-graphs", action="store_true",
            help="on a GPU, capture each whole epoch (steps, validation, early stopping) "
            "as one CUDA graph and replay it; ignored on the CPU",
        )  # fmt: skip


def _add_stacking(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trials-per-worker", type=_whole_number(1, MAX_TRIALS_PER_WORKER), metavar="B",
        help="trials a worker claims at once and trains as one stack "
        "(default: 1 on the CPU; on a GPU 8 at full batch, 16 at mini-batch)",
    )  # fmt: skip
    parser.add_argument(
        "--checkpoint-every", type=_non_negative_float, metavar="SEC",
        help="seconds of training between checkpoints of the trials in training, from "
        "which an interrupted trial resumes where it stopped (default: "
        f"{CHECKPOINT_EVERY_S:g}; 0: none)",
    )  # fmt: skip


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
            raise argparse.ArgumentTypeError(f"{shorten(text)!r} is not a whole number") from None
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
# Each stacked trial holds k networks and their activations on one device; past a few
# hundred a stack no longer fits any GPU at the seed protocol.
MAX_TRIALS_PER_WORKER = 256


def _number_above(low: float, *, or_equal: bool = False) -> Callable[[str], float]:
    """An argparse type: a number greater than `low` (or equal to it)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{shorten(text)!r} is not a number") from None
        if not (value >= low if or_equal else value > low):  # NaN fails both
            bound = f"at least {low:g}" if or_equal else f"greater than {low:g}"
            raise argparse.ArgumentTypeError(f"{value:g} must be {bound}")
        return value

    return parse


_positive_float = _number_above(0)
_non_negative_float = _number_above(0, or_equal=True)


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


# Each command's page of the user guide, which explains every flag it takes (the docs'
# test holds the pages to the parser).
GUIDE_PAGES = {
    "data": "docs/data.md",
    "train": "docs/training.md",
    "space": "docs/search-space.md",
    "run": "docs/running.md",
    "worker": "docs/running.md",
    "status": "docs/inspecting.md",
    "retrain": "docs/training.md",
    "report": "docs/inspecting.md",
    "dashboard": "docs/inspecting.md",
}


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name,
        help=help_text,
        description=help_text[0].upper() + help_text[1:] + ".",
        epilog=f'Guide: {GUIDE_PAGES[name]}, section "mnist-study {name}".',
    )
    sub.set_defaults(handler=handler, command_parser=sub)
    return sub


def _add_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--root",
        type=Path,
        default=None,
        metavar="DIR",
        help="MNIST data root (default: $MNIST_ROOT, else ./data)",
    )


def _add_preset(parser: argparse.ArgumentParser) -> None:
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument(
        "--preset",
        choices=list(PRESETS),
        help=f"a shipped study file (default: {DEFAULT_PRESET}; `run` resuming --study: the "
        "file the study stores); " + "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values()),
    )
    chosen.add_argument(
        "--space", type=Path, metavar="FILE",
        help="a study file of your own instead: TOML, the search space in W&B's sweep "
        "vocabulary (docs/search-space.md); the study stores it",
    )  # fmt: skip
