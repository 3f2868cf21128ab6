"""Today's trainer and the new one side by side, in one run on one machine: the first step
of the GPU check's studies call (benchmarks/README.md, "The GPU check"; issue 31, 5).

    python -m benchmarks.paths compare OUTDIR [--baseline DIR] [--new DIR] [--small]
                                              [--seconds S] [--choice FILE]
    python -m benchmarks.paths measure LABEL JSON [--small] [--expect-root DIR]

`measure` times the `model/` that Python finds on its path. `compare` runs it once per
path, each in a process of its own: today's with `DIR` (the code of `BASELINE_COMMIT`,
made by `make gpu-baseline`) ahead of the checkout on `PYTHONPATH`, then the checkout's
(or `--new DIR`'s).
Only what both trainers have is called: `train_trials`, `_Trainer(...)._epoch`,
`TrainConfig`, `model.data`, `model.steps.matmul_precision`.

Each path trains the seed study's first 8 draws (`seed_draws.jsonl`) as one stack, as
`speed.py`'s stacking case makes them (all 60,000 images, full batch, k = 5, early
stopping off; `--small`: 100 images and a few epochs, for a CPU), alone on the device,
and times its epochs (CUDA events on a GPU, `perf_counter` on the CPU) three ways:

- *eager, one epoch*: `_Trainer._epoch` after a warm-up run and 2 warm-up epochs, each
  epoch timed on its own, the median of 30 (no read-back in it);
- *eager, as trained*: `train_trials` with a read-back every 10 epochs, as a study's
  worker trains at full batch on a GPU, timed over 100 epochs after the first 10;
- *CUDA graphs* (GPU only): the same with `graphs=True`, whose first 10 epochs hold the
  warm-up and the capture, so the 100 timed are replays.

Then the card's ceilings, measured by each path under its own precision setting
(`matmul_precision`: a TF32 switch that does not take shows as the FP32 rate): one large
square product, layer 1 of the stack as one product over all the images (its width, the
stack's first layers summed over the folds, as drawn and rounded up to 16), one large
device copy. Last, the agreement check: the same 8 draws without dropout (the new path
may draw other masks), fp32, 12,000 images, up to 300 epochs with patience 10, so that
most folds stop early; each fold's best epoch must be today's, or one whose loss today's
run found within rounding of its best's (`tests.rounding.same_best_epoch`, the tie rule
of the graph tests), and a fold with today's best epoch must stop at today's epoch.

`compare` writes OUTDIR/paths.json and prints a table; with `--choice`, it writes there
which path the study should run on: the faster path that agreed, `new` or `baseline`.
Until both paths have been measured the file says `baseline` (where there is one), so a
run cut short keeps the study on today's code. Without `--baseline` the new path runs
alone and is the choice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from model.config import TrainConfig
    from model.data import DeviceData

# Nothing here imports `model` at module level: the driver (`compare`) must not load the
# checkout's trainer, which may be the broken one, and each `measure` loads the one its
# path puts first.

REPO = Path(__file__).resolve().parent.parent
TRIALS = 8
# Epochs a trainer runs before it is timed: the first set up cuBLAS, autograd's buffers
# and the allocator's blocks (model.kfold.GRAPH_WARMUP_EPOCHS).
WARMUP_EPOCHS = 2
# A loss is a float32 figure: the tie rule's machine epsilon.
TIE_DTYPE = "float32"
# Today's path is faster only if it beats the new one by more than this: the two timings
# come from two processes, some 1 % apart on the same code.
NOISE = 1.01


@dataclass(frozen=True)
class Sizes:
    """How much each part of a path's measurement trains and multiplies."""

    subset: int | None
    """Images the timed stack learns from (None: all 60,000)."""
    epoch_epochs: int
    """Epochs timed one by one (eager, one epoch)."""
    lead: int
    """Epochs of a timed run before its window, and its read-back interval."""
    window: int
    """Epochs timed in a run (a multiple of `lead`)."""
    agree_subset: int | None
    agree_epochs: int
    agree_patience: int
    gemm: int
    """The side of the square product."""
    copy_mib: int
    reps: int
    """Repetitions of each ceiling's operation (after 2 warm-up ones)."""
    threads: int | None
    """torch's CPU threads (None: its default)."""


GPU_SIZES = Sizes(
    subset=None, epoch_epochs=30, lead=10, window=100, agree_subset=12_000, agree_epochs=300,
    agree_patience=10, gemm=8192, copy_mib=1024, reps=10, threads=None,
)  # fmt: skip
SMALL_SIZES = Sizes(
    subset=100, epoch_epochs=4, lead=2, window=2, agree_subset=100, agree_epochs=20,
    agree_patience=2, gemm=512, copy_mib=32, reps=3, threads=1,
)  # fmt: skip
# One thread at a CPU's sizes: their products are too small to share out, and on the
# project's 2 cores beside other jobs two threads waited on each other for seconds an
# epoch (3.5 s against 0.14 s on one).


# --- one path: `measure` ---------------------------------------------------------------


class Clock:
    """Marks on the device's timeline: CUDA events on a GPU (launch gaps included, so an
    epoch that waits on the host shows it), `perf_counter` on the CPU."""

    def __init__(self, device: torch.device) -> None:
        import torch

        self.torch = torch
        self.device = device

    def mark(self) -> Any:
        if self.device.type != "cuda":
            return time.perf_counter()
        event = self.torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def ms(self, start: Any, end: Any) -> float:
        if self.device.type != "cuda":
            return (end - start) * 1e3
        self.torch.cuda.synchronize(self.device)
        return float(start.elapsed_time(end))

    def median_ms(self, operation: Callable[[], object], reps: int) -> float:
        """The median of `reps` timings of `operation`, after 2 untimed ones."""
        for _ in range(2):
            operation()
        marks = [self.mark()]
        for _ in range(reps):
            operation()
            marks.append(self.mark())
        return statistics.median(self.ms(a, b) for a, b in itertools.pairwise(marks))


def stack_configs(epochs: int, subset: int | None) -> list[TrainConfig]:
    """The seed study's first `TRIALS` draws over `speed.py`'s seed protocol, early
    stopping off, as its stacking case builds them."""
    from benchmarks.speed import DRAWS_FILE, STACK_PROTOCOLS

    draws = [json.loads(line) for line in DRAWS_FILE.read_text().splitlines()[:TRIALS]]
    protocol = dataclasses.replace(STACK_PROTOCOLS["seed, full batch"], subset=subset)
    base = dataclasses.replace(protocol, max_epochs=epochs, patience=epochs + 1)
    return [base.with_params(params) for params in draws]


def measure(label: str, out: Path, sizes: Sizes, expect_root: Path | None) -> None:
    """Measure the trainer on `sys.path`, writing `out` after every part: a path cut short
    by its time limit keeps what it measured."""
    import torch

    import model

    where = Path(model.__file__).resolve().parent
    if expect_root is not None and where != (expect_root / "model").resolve():
        raise SystemExit(f"{label}: model/ came from {where}, not from {expect_root}/model")
    from benchmarks.speed import H100_TF32_PEAK, machine
    from model.config import parameter_count
    from model.data import default_root, load_mnist, to_device
    from model.kfold import split_folds

    if sizes.threads is not None:
        torch.set_num_threads(sizes.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    precision = "tf32" if device.type == "cuda" else "fp32"
    clock = Clock(device)
    mnist = load_mnist(default_root())
    data = to_device(mnist.train_images, mnist.train_labels, device)
    configs = stack_configs(sizes.lead + sizes.window, sizes.subset)
    k = configs[0].k
    n_train = split_folds(len(data), configs[0])[0].shape[1]
    rows = len(data) if sizes.subset is None else min(sizes.subset, len(data))
    # What the networks' own (unpadded) weights cost an epoch: speed.py's useful FLOPs.
    useful = sum(6 * n_train * parameter_count(c.hidden) * k for c in configs)
    record: dict[str, Any] = {
        "label": label,
        "model": str(where),
        "device": str(device),
        "machine": machine(),
        "torch": torch.__version__,
        "precision": precision,
        "sizes": dataclasses.asdict(sizes),
        "stack": {
            "trials": len(configs),
            "networks": len(configs) * k,
            "first_layers": [c.hidden[0] for c in configs],
            "images": rows,
            "train_rows_per_fold": n_train,
            "useful_flop_per_epoch": useful,
        },
    }

    def save() -> None:
        partial = out.with_name(f".{out.name}.partial")
        partial.write_text(json.dumps(record, indent=1))
        partial.replace(out)

    def rate(ms: float | None) -> dict[str, Any] | None:
        """An epoch time with what it makes of the stack's useful work."""
        if ms is None:
            return None
        entry: dict[str, Any] = {"ms_per_epoch": ms, "useful_flop_per_s": useful / ms * 1e3}
        if device.type == "cuda":
            entry["fraction_of_tf32_peak"] = entry["useful_flop_per_s"] / H100_TF32_PEAK
        return entry

    save()
    width = k * sum(c.hidden[0] for c in configs)
    record["ceilings"] = ceilings(clock, precision, sizes, rows, width)
    save()
    # A process's first epochs pay once for what later ones reuse (the allocator's pool,
    # cuBLAS's handles, the CPU's pages): 2 warm-up epochs of the first trainer were not
    # enough on the CPU, whose next ones then took 9 times as long as later trainers'.
    warm_up(configs, data, precision, sizes)
    record["eager_epoch"] = rate(epoch_ms(clock, configs, data, precision, sizes))
    save()
    record["eager"] = timed_run(clock, configs, data, precision, False, sizes)
    record["eager"].update(rate(record["eager"]["ms_per_epoch"]) or {})
    save()
    if device.type == "cuda":
        record["graphs"] = timed_run(clock, configs, data, precision, True, sizes)
        record["graphs"].update(rate(record["graphs"]["ms_per_epoch"]) or {})
    else:
        record["graphs"] = None  # CUDA graphs are a GPU's
    save()
    record["agreement_run"] = agreement_run(data, sizes)
    save()


def ceilings(clock: Clock, precision: str, sizes: Sizes, rows: int, width: int) -> dict[str, Any]:
    """The card's rates for the work an epoch is made of, under the trainer's own
    precision setting: products (TFLOP/s) and a copy (GB/s, bytes read plus written)."""
    import torch

    from model.steps import matmul_precision

    device = clock.device

    def product_rate(m: int, k: int, n: int, how: str) -> float:
        a = torch.rand(m, k, device=device)
        w = torch.rand(n, k, device=device)  # (out, in), as a layer's weight is held
        c = torch.empty(m, n, device=device)
        with matmul_precision(how, device):
            ms = clock.median_ms(lambda: torch.mm(a, w.t(), out=c), sizes.reps)
        return 2 * m * k * n / ms / 1e9

    def copy_rate(mib: int) -> float:
        src = torch.rand(mib << 18, device=device)
        dst = torch.empty_like(src)
        ms = clock.median_ms(lambda: dst.copy_(src), sizes.reps)
        return 2 * (mib << 20) / ms / 1e6  # read and written

    n = sizes.gemm
    aligned = -(-width // 16) * 16
    result: dict[str, Any] = {
        "precision": precision,
        "gemm": {"shape": [n, n, n], precision: product_rate(n, n, n, precision)},
        "layer1": {
            "shape": [rows, 784, width],
            precision: product_rate(rows, 784, width, precision),
            "aligned_width": aligned,
            f"{precision}_aligned": product_rate(rows, 784, aligned, precision),
        },
    }
    if precision == "tf32":
        fp32 = product_rate(n, n, n, "fp32")
        result["gemm"]["fp32"] = fp32
        # TF32 tensor cores run a large product several times faster than FP32's units;
        # under half again as fast, the switch did not take.
        result["gemm"]["tf32_took"] = result["gemm"]["tf32"] > 1.5 * fp32
    result["copy"] = {"mib": sizes.copy_mib, "gb_per_s": copy_rate(sizes.copy_mib)}
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the stacks that follow get the memory back
    return result


def warm_up(configs: list[TrainConfig], data: DeviceData, precision: str, sizes: Sizes) -> None:
    from model.kfold import train_trials

    epochs = WARMUP_EPOCHS + sizes.lead
    chosen = [dataclasses.replace(c, max_epochs=epochs, patience=epochs + 1) for c in configs]
    train_trials(chosen, data, precision=precision, sync_every=sizes.lead)


def epoch_ms(
    clock: Clock, configs: list[TrainConfig], data: DeviceData, precision: str, sizes: Sizes
) -> float:
    """The median of `epoch_epochs` eager epochs, each timed alone: the epoch itself,
    without the read-backs a run makes."""
    from model.kfold import _Trainer
    from model.steps import matmul_precision

    epochs = WARMUP_EPOCHS + sizes.epoch_epochs
    chosen = [dataclasses.replace(c, max_epochs=epochs, patience=epochs + 1) for c in configs]
    trainer = _Trainer(chosen, data, precision, False, False)
    patience = chosen[0].patience
    with matmul_precision(precision, data.device):
        for _ in range(WARMUP_EPOCHS):
            trainer._epoch(patience)
        marks = [clock.mark()]
        for _ in range(sizes.epoch_epochs):
            trainer._epoch(patience)
            marks.append(clock.mark())
    return statistics.median(clock.ms(a, b) for a, b in itertools.pairwise(marks))


@contextlib.contextmanager
def warnings_of_model() -> Iterator[list[str]]:
    """The first lines of the warnings `model`'s loggers give in the block (a capture
    that fell back to eager epochs says so there)."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage().splitlines()[0])

    handler = Keep(logging.WARNING)
    logger = logging.getLogger("model")
    logger.addHandler(handler)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)


def timed_run(
    clock: Clock,
    configs: list[TrainConfig],
    data: DeviceData,
    precision: str,
    graphs: bool,
    sizes: Sizes,
) -> dict[str, Any]:
    """`train_trials` as a worker runs it, read back every `lead` epochs: the time from
    the read-back after epoch `lead` to the one after epoch `lead + window`, per epoch.
    Under `graphs` the first `lead` epochs hold the warm-up and the capture, so the
    window is replays alone."""
    from model.kfold import train_trials

    marks: dict[int, Any] = {}

    def on_progress(_trial: int, progress: Any) -> bool:
        # Called per trial after each read-back: the first call of an epoch marks it.
        if progress.epoch not in marks:
            marks[progress.epoch] = clock.mark()
        return False

    started = time.perf_counter()
    with warnings_of_model() as warnings:
        results = train_trials(
            configs,
            data,
            precision=precision,
            graphs=graphs,
            sync_every=sizes.lead,
            on_progress=on_progress,
        )
    wall = time.perf_counter() - started
    start, end = sizes.lead, sizes.lead + sizes.window
    ms = None  # no read-back there: every trial diverged before it
    if start in marks and end in marks:
        ms = clock.ms(marks[start], marks[end]) / sizes.window
    return {
        "epochs": sizes.window,
        "after": sizes.lead,
        "ms_per_epoch": ms,
        "wall_seconds": wall,
        "diverged": [r.diverged for r in results if r.diverged],
        "warnings": warnings,
    }


def agreement_run(data: DeviceData, sizes: Sizes) -> dict[str, Any]:
    """The stack without dropout, fp32, early stopping on: what `compare` holds the two
    paths' best epochs to."""
    from model.kfold import train_trials

    configs = [
        dataclasses.replace(c, dropout=0.0, input_dropout=0.0, patience=sizes.agree_patience)
        for c in stack_configs(sizes.agree_epochs, sizes.agree_subset)
    ]
    started = time.perf_counter()
    results = train_trials(configs, data, precision="fp32", sync_every=sizes.lead)
    return {
        "images": sizes.agree_subset,
        "max_epochs": sizes.agree_epochs,
        "patience": sizes.agree_patience,
        "seconds": time.perf_counter() - started,
        "trials": [
            {
                "best_epochs": r.best_epochs,
                "epochs_run": r.epochs_run,
                "fold_losses": r.fold_losses,
                "diverged": r.diverged,
                "val_loss": r.curves.get("val_loss"),
            }
            for r in results
        ],
    }


# --- both paths: `compare` -------------------------------------------------------------


def run_path(
    label: str, root: Path, work: Path, sizes_flag: list[str], seconds: float
) -> dict[str, Any]:
    """`measure` in a process of its own, `root` first on its path; its record, with how
    it ended (`status`: ok, failed, timed out) and, unless ok, the last lines it printed.

    It runs in an empty folder: `python -m` puts the working folder first on the path,
    and the checkout's `model/` would then shadow `root`'s."""
    out = work / f"{label}.json"
    log = work / f"{label}.log"
    folder = work / label
    folder.mkdir()
    path = [str(root), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(path),
        # MNIST where this process finds it, not in the empty folder.
        "MNIST_ROOT": str(Path(os.environ.get("MNIST_ROOT") or REPO / "data").resolve()),
    }
    command = [sys.executable, "-m", "benchmarks.paths", "measure", label, str(out),
               "--expect-root", str(root), *sizes_flag]  # fmt: skip
    started = time.perf_counter()
    with log.open("w") as sink:
        try:
            done = subprocess.run(
                command, cwd=folder, env=env, stdout=sink, stderr=subprocess.STDOUT,
                timeout=seconds, check=False,
            )  # fmt: skip
            status = "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"
        except subprocess.TimeoutExpired:
            status = f"timed out after {seconds:.0f} s"
    record: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    record.update(status=status, root=str(root), seconds=time.perf_counter() - started)
    if status != "ok":
        record["output_tail"] = log.read_text(errors="replace").splitlines()[-12:]
    return record


def agreement(today: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    """Whether the new path's agreement run ends each fold as today's does, up to ties of
    today's own losses (`tests.rounding.same_best_epoch`, float32, one step an epoch)."""
    import torch

    from tests.rounding import same_best_epoch

    base_run, new_run = today.get("agreement_run"), new.get("agreement_run")
    if base_run is None or new_run is None:
        missing = "today's" if base_run is None else "the new path's"
        return {"checked": False, "agreed": None, "why": f"no agreement run of {missing}"}
    verdict: dict[str, Any] = {
        "checked": True,
        "rule": "best epoch today's, or one whose loss today's run found within rounding "
        "of its best's (tests/rounding.py, same_best_epoch); same best epoch, same stop",
        "images": base_run["images"],
        "max_epochs": base_run["max_epochs"],
        "patience": base_run["patience"],
        "folds": 0,
        "same_best_epoch": 0,
        "within_a_tie": 0,
        "differ": [],
        "stopped_early": {"baseline": 0, "new": 0},
        "max_relative_loss_difference": 0.0,
    }
    dtype = getattr(torch, TIE_DTYPE)
    cap = base_run["max_epochs"]
    pairs = zip(base_run["trials"], new_run["trials"], strict=True)
    for trial, (b, n) in enumerate(pairs):
        if b["diverged"] or n["diverged"]:
            verdict["differ"].append({"trial": trial, "diverged": [b["diverged"], n["diverged"]]})
            continue
        folds = zip(b["best_epochs"], n["best_epochs"], b["epochs_run"], n["epochs_run"],
                    b["fold_losses"], n["fold_losses"], strict=True)  # fmt: skip
        for fold, (best_b, best_n, run_b, run_n, loss_b, loss_n) in enumerate(folds):
            verdict["folds"] += 1
            verdict["stopped_early"]["baseline"] += run_b < cap
            verdict["stopped_early"]["new"] += run_n < cap
            losses = (b["val_loss"] or [None] * (fold + 1))[fold]
            if best_n == best_b and run_n == run_b:
                verdict["same_best_epoch"] += 1
                relative = abs(loss_n - loss_b) / max(abs(loss_b), 1e-30)
                verdict["max_relative_loss_difference"] = max(
                    verdict["max_relative_loss_difference"], relative
                )
            elif (
                best_n != best_b
                and losses is not None
                and same_best_epoch(best_n, best_b, losses, dtype, 1)
            ):
                verdict["within_a_tie"] += 1
            else:
                verdict["differ"].append(
                    {"trial": trial, "fold": fold, "best_epochs": [best_b, best_n],
                     "epochs_run": [run_b, run_n]}
                )  # fmt: skip
    verdict["agreed"] = not verdict["differ"]
    return verdict


def fastest_ms(record: dict[str, Any]) -> float | None:
    """A path's epoch time as a study trains it: eager or graphs, whichever is faster."""
    times = [
        way["ms_per_epoch"]
        for way in (record.get("eager"), record.get("graphs"))
        if way and way.get("ms_per_epoch")
    ]
    return min(times) if times else None


def choose(paths: dict[str, dict[str, Any]], verdict: dict[str, Any] | None) -> tuple[str, str]:
    """The path the study runs on, and why: the faster path that agreed."""
    new = paths["new"]
    if "baseline" not in paths:
        return "new", "measured alone, without a baseline"
    today = paths["baseline"]
    if new["status"] != "ok":
        return "baseline", f"the new path {new['status']}"
    if today["status"] != "ok":
        return "new", f"today's path {today['status']}: the new path, unchecked"
    if verdict is None or not verdict["checked"]:
        return "baseline", "the agreement was not checked"
    if not verdict["agreed"]:
        return "baseline", f"the new path disagrees in {len(verdict['differ'])} fold(s)"
    new_ms, today_ms = fastest_ms(new), fastest_ms(today)
    if new_ms is None or today_ms is None:
        return "baseline", "an epoch time is missing"
    if today_ms * NOISE < new_ms:
        return "baseline", f"today's is faster ({new_ms / today_ms:.2f}× the new path's time)"
    return "new", f"it agreed, at {today_ms / new_ms:.2f}× today's epochs per second"


def compare(
    out: Path,
    baseline: Path | None,
    new: Path,
    small: bool,
    seconds: float,
    choice_file: Path | None,
) -> int:
    """Both paths, one after the other, within `seconds`; the record, the table, the
    choice. Exit 1 where a path failed or disagreed (the choice is still written)."""
    sizes_flag = ["--small"] if small else []
    safe = "baseline" if baseline is not None else "new"
    if choice_file is not None:
        choice_file.write_text(safe + "\n")
    commit = None
    if baseline is not None and (baseline / "COMMIT").is_file():
        commit = (baseline / "COMMIT").read_text().strip()
    order = [("baseline", baseline)] if baseline is not None else []
    order.append(("new", new))
    if baseline is None:
        print("no baseline folder (make gpu-baseline): the side-by-side runs the new path alone")
    deadline = time.monotonic() + seconds
    paths: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="paths-") as work:
        for index, (label, root) in enumerate(order):
            left = deadline - time.monotonic()
            # Today's path gets at most 55 % of the whole: the new path must not be the one
            # that runs out of time. The last leaves 5 s for the verdict and the table.
            cap = left - 5 if index == len(order) - 1 else 0.55 * seconds
            where = f"{commit}, {root}" if label == "baseline" and commit else root
            print(f"{LABELS[label]} ({where}): measuring, at most {cap:.0f} s", flush=True)
            paths[label] = run_path(label, root, Path(work), sizes_flag, max(cap, 1.0))
    verdict = agreement(paths["baseline"], paths["new"]) if "baseline" in paths else None
    choice, why = choose(paths, verdict)
    for record in paths.values():
        for trial in (record.get("agreement_run") or {}).get("trials", []):
            trial.pop("val_loss", None)  # held to; 40 curves of up to 300 losses
    result = {
        "small": small,
        "commit_of_baseline": commit,
        "device": next((p["machine"] for p in paths.values() if "machine" in p), None),
        "torch": next((p["torch"] for p in paths.values() if "torch" in p), None),
        "paths": paths,
        "agreement": verdict,
        "speedup": speedups(paths),
        "choice": choice,
        "why": f"{choice}: {why}",
    }
    (out / "paths.json").write_text(json.dumps(result, indent=1))
    if choice_file is not None:
        choice_file.write_text(choice + "\n")
    print_table(result)
    failed = any(p["status"] != "ok" for p in paths.values())
    return 1 if failed or (verdict is not None and verdict["agreed"] is not True) else 0


LABELS = {"baseline": "today's path", "new": "the new path"}
# The ways an epoch is timed, by record key, as the table names them.
WAYS = {
    "eager_epoch": "eager, one epoch (median)",
    "eager": "eager, as trained",
    "graphs": "CUDA graphs, replays",
}


def speedups(paths: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """New path's epochs per second over today's, per way (None where either lacks it)."""
    if "baseline" not in paths:
        return {}
    ratios: dict[str, float | None] = {}
    for way in WAYS:
        a, b = paths["baseline"].get(way) or {}, paths["new"].get(way) or {}
        ms_a, ms_b = a.get("ms_per_epoch"), b.get("ms_per_epoch")
        ratios[way] = ms_a / ms_b if ms_a and ms_b else None
    return ratios


def print_table(result: dict[str, Any]) -> None:
    paths = result["paths"]
    labels = [label for label in ("baseline", "new") if label in paths]
    head = next((p for p in paths.values() if "stack" in p), None)
    for label in labels:
        if paths[label]["status"] != "ok":
            print(f"{LABELS[label]} {paths[label]['status']}; its last lines:")
            for line in paths[label].get("output_tail", []):
                print(f"    {line}")
    if head is not None:
        stack = head["stack"]
        widths = stack["first_layers"]
        print(
            f"side by side: {stack['trials']} seed draws as one stack, {stack['networks']} "
            f"networks, first layers {min(widths)}–{max(widths)} units ({sum(widths):,} in "
            f"all), {stack['images']:,} images, full batch; {head['machine']}, torch "
            f"{head['torch']}, {head['precision']}"
        )
    names = {"baseline": "today's", "new": "new"}
    columns = [names[label] for label in labels]
    if len(labels) == 2:
        columns.append("new/today's")
    print(f"  {'ms an epoch':<30}" + "".join(f"{c:>13}" for c in columns))
    for way, name in WAYS.items():
        cells = []
        for label in labels:
            ms = (paths[label].get(way) or {}).get("ms_per_epoch")
            cells.append("—" if ms is None else f"{ms:.2f}")
        ratio = result["speedup"].get(way)
        if len(labels) == 2:
            cells.append("—" if ratio is None else f"{ratio:.2f}×")
        if any(c != "—" for c in cells):
            print(f"  {name:<30}" + "".join(f"{c:>13}" for c in cells))
    print_ceilings(paths, labels, columns[: len(labels)])
    verdict = result["agreement"]
    if verdict is not None:
        if not verdict["checked"]:
            print(f"agreement: not checked ({verdict['why']})")
        else:
            said = "agreed" if verdict["agreed"] else "DISAGREED"
            print(
                f"agreement (fp32, dropout off, {verdict['images']:,} images, up to "
                f"{verdict['max_epochs']} epochs, patience {verdict['patience']}): {said}: "
                f"{verdict['same_best_epoch']} of {verdict['folds']} folds the same best and "
                f"stopping epochs, {verdict['within_a_tie']} moved within a tie, "
                f"{len(verdict['differ'])} not; stopped early: "
                f"{verdict['stopped_early']['baseline']} today, "
                f"{verdict['stopped_early']['new']} new; best losses within "
                f"{verdict['max_relative_loss_difference']:.1e} relatively"
            )
            for entry in verdict["differ"][:5]:
                print(f"    differs: {entry}")
    print(f"choice: {result['why']}")


def print_ceilings(paths: dict[str, dict[str, Any]], labels: list[str], columns: list[str]) -> None:
    rows: list[tuple[str, list[float | None], str]] = []

    def cell(label: str, *keys: str) -> float | None:
        value: Any = paths[label].get("ceilings")
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value if isinstance(value, float) else None

    first = next((paths[x]["ceilings"] for x in labels if paths[x].get("ceilings")), None)
    if first is None:
        return
    p = first["precision"]
    n = first["gemm"]["shape"][0]
    m, _, w = first["layer1"]["shape"]
    rows.append((f"GEMM {n}³, {p}", [cell(x, "gemm", p) for x in labels], "TFLOP/s"))
    if p != "fp32" and "fp32" in first["gemm"]:
        rows.append((f"GEMM {n}³, fp32", [cell(x, "gemm", "fp32") for x in labels], "TFLOP/s"))
    rows.append((f"layer 1, {m}×784×{w}", [cell(x, "layer1", p) for x in labels], "TFLOP/s"))
    aligned = first["layer1"]["aligned_width"]
    rows.append(
        (f"  width {aligned}", [cell(x, "layer1", f"{p}_aligned") for x in labels], "TFLOP/s")
    )
    rows.append(
        (f"copy {first['copy']['mib']} MiB", [cell(x, "copy", "gb_per_s") for x in labels], "GB/s")
    )
    print(f"  {'ceilings':<30}" + "".join(f"{c:>13}" for c in columns))
    for name, values, unit in rows:
        cells = "".join(f"{'—' if v is None else f'{v:.3g}':>13}" for v in values)
        print(f"  {name:<30}{cells}  {unit}")
    for label in labels:
        took = (paths[label].get("ceilings") or {}).get("gemm", {}).get("tf32_took")
        if took is False:
            print(f"  {LABELS[label]}: TF32 did not take (its tf32 product runs at the fp32 rate)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.paths", description=__doc__.split("\n")[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    both = commands.add_parser("compare", help="both paths, side by side")
    both.add_argument("outdir", type=Path)
    both.add_argument("--baseline", type=Path, help="today's code (make gpu-baseline)")
    both.add_argument(
        "--new", type=Path, default=REPO, help="the new code's root (default: this checkout)"
    )
    both.add_argument("--seconds", type=float, default=90.0, help="for both paths (90)")
    both.add_argument("--choice", type=Path, help="write the chosen path here")
    one = commands.add_parser("measure", help="the trainer on sys.path")
    one.add_argument("label")
    one.add_argument("json", type=Path)
    one.add_argument("--expect-root", type=Path)
    for sub in (both, one):
        sub.add_argument("--small", action="store_true", help="a CPU's sizes")
    args = parser.parse_args(argv)
    sizes = SMALL_SIZES if args.small else GPU_SIZES
    if args.command == "measure":
        measure(args.label, args.json, sizes, args.expect_root)
        return 0
    if args.baseline is not None and not (args.baseline / "model").is_dir():
        print(f"--baseline {args.baseline}: no model/ in it (make gpu-baseline)", file=sys.stderr)
        return 2
    if not (args.new / "model").is_dir():
        print(f"--new {args.new}: no model/ in it", file=sys.stderr)
        return 2
    if not math.isfinite(args.seconds) or args.seconds < 10:
        print(f"--seconds {args.seconds:g}: give at least 10", file=sys.stderr)
        return 2
    mnist = Path(os.environ.get("MNIST_ROOT") or REPO / "data") / "MNIST" / "raw"
    if not mnist.is_dir():
        print(f"no MNIST in {mnist} (make data, or set MNIST_ROOT)", file=sys.stderr)
        return 2
    try:
        args.outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"{args.outdir}: cannot make it ({exc.strerror})", file=sys.stderr)
        return 2
    baseline = None if args.baseline is None else args.baseline.resolve()
    new = args.new.resolve()
    return compare(args.outdir, baseline, new, args.small, args.seconds, args.choice)


if __name__ == "__main__":
    sys.exit(main())
