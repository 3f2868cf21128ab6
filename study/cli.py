"""`mnist-study`: the one command line (also `python -m study`).

Every error a user can cause ends here as one line on stderr and a non-zero exit:
2 for bad input (a flag, a parameter, a device), 1 for a failure of the world (MNIST
missing and unfetchable), 130 for Ctrl-C. Bugs still raise with a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from model.config import ConfigError
from model.data import DataError
from model.device import DeviceError
from study.presets import DEFAULT_PRESET, PRESETS, get_preset

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad input from the command line; exit 2."""


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (argparse would print the usage block first)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    prog = f"mnist-study {args.command}"
    try:
        return args.handler(args)
    except (UsageError, ConfigError, DeviceError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except DataError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mnist-study",
        description="Optuna hyperparameter studies of fully connected networks on MNIST.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = _command(commands, "data", cmd_data, "fetch MNIST if missing and show where it is")
    _add_root(data)

    train = _command(
        commands, "train", cmd_train, "cross-validate one configuration and print its accuracy"
    )
    train.add_argument(
        "--params",
        metavar="JSON|FILE",
        default="{}",
        help="parameters over the preset's defaults, as a JSON object or a file holding one, "
        'e.g. \'{"n_units_l0": 300, "activation": "hardswish"}\'. Names: n_units_l0, '
        "n_units_l1, ... (one per hidden layer), activation (relu, leaky_relu, hardswish), "
        "optimizer (adam, adamax), dropout, lr, weight_decay, batch_size (null: full batch), "
        "max_epochs, patience, k, subset, fold_seed, seed",
    )
    _add_preset(train)
    train.add_argument(
        "--device", help="cpu, cuda or cuda:N (default: cuda if available, else cpu)"
    )
    train.add_argument("--json", action="store_true", help="print one JSON object")
    _add_root(train)
    return parser


def _command(
    commands: argparse._SubParsersAction,
    name: str,
    handler: Callable[[argparse.Namespace], int],
    help_text: str,
) -> argparse.ArgumentParser:
    sub = commands.add_parser(
        name, help=help_text, description=help_text[0].upper() + help_text[1:] + "."
    )
    sub.set_defaults(handler=handler)
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
    source = ensure_mnist(root)
    mnist = load_mnist(root)
    print(f"MNIST: {source}")
    for split, labels in (("train", mnist.train_labels), ("test", mnist.test_labels)):
        counts = labels.bincount(minlength=10).tolist()
        print(f"  {split:5s} {labels.shape[0]:6d} images, per digit {counts}")
    return 0


def parse_params(text: str) -> dict[str, Any]:
    """`--params`: a JSON object given inline, or the path of a file holding one."""
    source = "--params"
    if not text.lstrip().startswith(("{", "[")) and Path(text).is_file():
        try:
            text = Path(text).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--params {text!r}: cannot read it ({exc})") from None
        source = f"--params file {text}"
    try:
        params = json.loads(text)
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith(("{", "[")):
            raise UsageError(
                f"--params {text!r}: neither a JSON object nor a readable file"
            ) from None
        raise UsageError(
            f"{source}: bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    if not isinstance(params, dict):
        raise UsageError(f'{source}: must be a JSON object such as {{"n_units_l0": 300}}')
    return params


def cmd_train(args: argparse.Namespace) -> int:
    from model.device import resolve_device

    preset = get_preset(args.preset)
    config = preset.defaults.with_params(parse_params(args.params))
    device = resolve_device(args.device)

    from model.data import ensure_mnist, load_mnist, to_device
    from model.kfold import train_kfold

    root = _data_root(args)
    ensure_mnist(root)
    mnist = load_mnist(root)
    data = to_device(mnist.train_images, mnist.train_labels, device)
    result = train_kfold(config, data, on_progress=_epoch_bar(config.max_epochs))
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
