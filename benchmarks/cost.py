"""What one steady-state epoch of a stack of trials costs a GPU, counted on the CPU.

    PYTHONPATH=CODE python benchmarks/cost.py profile [--trials 8] [--json FILE]
    python benchmarks/cost.py compare TODAY.json [NEW.json] [--ceilings FILE]

`profile` builds the trainer of the `model` package on `sys.path` (PYTHONPATH's, so one
script counts today's path and the new one), runs one warm-up epoch (`_Trainer._epoch`:
training step, validation, early-stopping bookkeeping) and records a second under
`torch.profiler` on the CPU, in fp32, with the autograd step: the GPU's path (on the CPU
`make_step` would pick the hand-written one). From the recorded operations, per epoch:

- FLOPs: the profiler's own count for the matrix products (mm, bmm, addmm, baddbmm, ...),
  each once (one with a product below it in the call tree is not counted);
- kernels (launches): the ops that do work. A composite op's work (`to`, `zeros`,
  `slice_backward`, ...) is its children's, so an op counts where no op below it counts:
  the leaf rule. Exceptions, each where the CPU's call tree is not a GPU's: a matrix
  product runs its GEMM besides its children (baddbmm's bias copy); `_foreach_*`,
  `_fused_*`, `mean` and `zero_` are one kernel on a GPU (multi-tensor apply, one
  reduction, one fill) whatever the CPU runs below them; a 0-d `to` inside an op is the
  CPU's cast of a Python scalar (a kernel argument on a GPU); a `fill_`/`zero_` inside a
  reduction is the CPU's initialisation of its output. `item` reads a value to the host
  (`host_reads`: on the CPU every tensor is there; on a GPU only a device tensor's read
  syncs). View, metadata and allocation ops (view, reshape, slice, select, narrow, t,
  transpose, permute, expand, squeeze, unsqueeze, detach, alias, empty, empty_strided,
  resize_, set_, ...) launch none;
- bytes: per kernel, the bytes of every tensor argument (shape and dtype as recorded,
  tensor lists element by element, dims of stride 0 not counted: an expanded bias is
  read once), plus the bytes the call left allocated (`profile_memory`: an out-of-place
  op's new outputs; in-place and out= ops write an argument, counted once). A lower bound
  of what its GPU kernel must move: each argument is read or written at least once, each
  output written once; an in-place operand, read and written, counts once; tensors in
  lists count as float32. What a GPU's 50 MB L2 keeps between kernels can come from
  cache instead, but only small tensors fit there.

Profiling the real 60,000 images on 2 cores takes minutes. At full batch (one step an
epoch) every op's FLOPs and bytes are affine in the rows and the kernels do not depend on
them, so it profiles two small subsets (default 1,000 and 2,000 images, multiples of 4·k:
whole folds and whole 4-value words for `keep_mask`) and extrapolates each op to the real
rows (`tests/test_cost.py` checks a third size on the line). Mini-batches: refused.

The prediction, per card: GPU time = Σ over kernels of max(FLOPs / GEMM rate, bytes /
bandwidth) (a roofline per kernel; products at the precision's tensor-core rate, other
ops memory-bound) + kernels × a graph's per-kernel gap; an eager epoch = max(GPU time,
kernels × the host's cost of one eager op); a CUDA-graphed epoch = GPU time. tf32 runs
fp32's ops; bf16 halves the products' bytes (operands and outputs in 16 bits), and
autocast's cast kernels are not counted. The GPU term is a floor (peaks are never
reached, small and unaligned products least of all); the launch terms are estimates. The
cards below carry datasheet figures, assumptions the next lease checks: `--ceilings FILE`
(a card's measured `gemm_tflops`, `copy_gbs`, `launch_us`) replaces them. A graphed epoch
steps `StackedAdam`, not the fused Adam counted here: its figure prices the eager
epoch's kernels without the host.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile


@dataclass(frozen=True)
class Ceilings:
    """What one card can do: dense GEMM rate by precision, DRAM bandwidth, launch costs."""

    name: str
    gemm_tflops: dict[str, float]
    bandwidth_gbs: float
    """Bytes read plus bytes written per second, in GB/s."""
    host_launch_us: float
    """One eager op on the host: Python, the dispatcher, the launch."""
    graph_launch_us: float
    """One kernel of a CUDA graph: the gap between kernels on the GPU."""


# Dense (no sparsity) figures from NVIDIA's H100 and H200 datasheets, which give the
# tensor-core rates with 2:4 sparsity (TF32 989, BF16 1,979 TFLOP/s): halved. Checked
# against glennklockwood.com/garden/processors/h100 (FP32 66.9, TF32 494.7, BF16 989.4
# dense; 3.35 TB/s HBM3) and NVIDIA's H200 page as quoted by aiminingco.com/gpu/h200/specs
# (same GH100 compute; 141 GB HBM3e at 4.8 TB/s). Launch costs: an eager PyTorch op costs
# the host ~5-10 µs, a kernel inside a CUDA graph ~1-2 µs on the GPU; the middle of each.
HOPPER_TFLOPS = {"fp32": 66.9, "tf32": 494.7, "bf16": 989.4}
CARDS = {
    "H100": Ceilings("H100 SXM", HOPPER_TFLOPS, 3350.0, 7.5, 1.5),
    "H200": Ceilings("H200 SXM", HOPPER_TFLOPS, 4800.0, 7.5, 1.5),
}


def measured_ceilings(path: Path, precision: str, like: Ceilings = CARDS["H100"]) -> Ceilings:
    """A card's ceilings as a lease measured them: a JSON with `gemm_tflops` (one large
    product under the trainer's precision), `copy_gbs` (one large copy: bytes read plus
    written per second; `"copy_gbs_counts": "bytes copied"` doubles it) and `launch_us`
    (one eager op); `graph_launch_us` and `card` are optional, `like`'s otherwise."""
    raw = json.loads(path.read_text())
    bandwidth = float(raw["copy_gbs"])
    if raw.get("copy_gbs_counts") == "bytes copied":
        bandwidth *= 2
    return Ceilings(
        f"{raw['card']}, measured" if "card" in raw else "measured",
        {**like.gemm_tflops, precision: float(raw["gemm_tflops"])},
        bandwidth,
        float(raw["launch_us"]),
        float(raw.get("graph_launch_us", like.graph_launch_us)),
    )


@dataclass(frozen=True)
class Op:
    """One kernel of the epoch: its name, FLOPs (matrix products only) and bytes."""

    name: str
    flops: int
    bytes: int
    product: bool


# --- counting the kernels of a profile ----------------------------------------------


def _aten(names: str) -> frozenset[str]:
    return frozenset(f"aten::{name}" for name in names.split())


NO_KERNEL = _aten(
    """view reshape _reshape_alias as_strided as_strided_ slice select split split_with_sizes
    chunk unbind narrow t transpose permute expand expand_as unsqueeze squeeze flatten
    unflatten view_as movedim swapaxes diagonal unfold detach detach_ alias empty empty_like
    empty_strided new_empty new_empty_strided resize_ set_ lift_fresh _unsafe_view resolve_conj
    resolve_neg conj _conj to _to_copy contiguous type_as item _local_scalar_dense result_type
    scalar_tensor"""
)
PRODUCTS = _aten("mm bmm addmm baddbmm addbmm addmv mv dot _addmm_activation")
REDUCTIONS = _aten(
    "sum mean amax amin max min argmax argmin prod norm linalg_vector_norm nansum all any "
    "std var logsumexp"
)
ONE_KERNEL_PREFIXES = ("aten::_foreach_", "aten::_fused_")
# zero_ too: on the CPU it calls fill_ at some sizes and not at others.
ONE_KERNEL = frozenset({"aten::mean", "aten::zero_"})
HOST_READS = frozenset({"aten::item", "aten::_local_scalar_dense"})
_ITEMSIZE = {
    "float": 4, "double": 8, "c10::Half": 2, "c10::BFloat16": 2, "long int": 8, "int": 4,
    "short int": 2, "signed char": 1, "unsigned char": 1, "bool": 1,
}  # fmt: skip


def _children(event: FunctionEvent) -> list[FunctionEvent]:
    return sorted(event.cpu_children, key=lambda e: e.time_range.start)


def _skipped(event: FunctionEvent, parent: FunctionEvent | None) -> bool:
    """Work the CPU does below an op that a GPU's kernel for that op does not."""
    if parent is None or not parent.name.startswith("aten::"):
        return False
    if event.name in ("aten::to", "aten::_to_copy"):
        return bool(event.input_shapes) and event.input_shapes[0] == []
    return event.name in ("aten::fill_", "aten::zero_") and parent.name in REDUCTIONS


def _kernels(
    event: FunctionEvent, parent: FunctionEvent | None, reads: list[FunctionEvent]
) -> list[FunctionEvent]:
    """The events below and at `event` that launch a kernel, in order (module docstring)."""
    name = event.name
    if not name.startswith("aten::"):  # autograd nodes, record_function ranges, detach
        return [k for c in _children(event) for k in _kernels(c, parent, reads)]
    if _skipped(event, parent):
        return []
    if name in HOST_READS:
        reads.append(event)
        return []
    if name in ONE_KERNEL or name.startswith(ONE_KERNEL_PREFIXES):
        return [event]
    below = [k for c in _children(event) for k in _kernels(c, event, reads)]
    if name in PRODUCTS and not any(k.name in PRODUCTS for k in below):
        return [*below, event]
    if name in NO_KERNEL or below:
        return below
    return [event]


def _tensor_bytes(shape: Sequence[Any], strides: Sequence[Any], itemsize: int) -> int:
    elements = 1
    same = len(strides) == len(shape)
    for i, size in enumerate(shape):
        if not (same and strides[i] == 0):  # a broadcast dim reads one element
            elements *= size
    return elements * itemsize


def _bytes(event: FunctionEvent) -> int:
    shapes = getattr(event, "structured_input_shapes", None) or event.input_shapes
    strides = getattr(event, "structured_input_strides", None) or [[]] * len(shapes)
    total = 0
    for shape, stride, dtype in zip(shapes, strides, event.input_dtypes, strict=False):
        if dtype == "TensorList":
            for s, st in zip(shape, stride or [[]] * len(shape), strict=False):
                total += _tensor_bytes(s, st or [], 4)
        elif dtype in _ITEMSIZE and isinstance(shape, list):
            total += _tensor_bytes(shape, stride or [], _ITEMSIZE[dtype])
    return total + max(0, event.cpu_memory_usage)


def profile_ops(fn: Callable[[], object], autograd: bool = False) -> tuple[list[Op], int]:
    """The kernels `fn()` runs, as recorded on the CPU, and its reads to the host;
    `autograd`: refuse a profile in which no backward ran."""
    with profile(
        activities=[ProfilerActivity.CPU],
        record_shapes=True,
        with_flops=True,
        profile_memory=True,
    ) as prof:
        fn()
    events = prof.events()
    roots = sorted((e for e in events if e.cpu_parent is None), key=lambda e: e.time_range.start)
    reads: list[FunctionEvent] = []
    kernels = [k for root in roots for k in _kernels(root, None, reads)]
    if autograd and not any("Backward" in e.name for e in events):
        raise RuntimeError("no autograd in the profile: the hand-written CPU step ran")
    ops = [
        Op(k.name, int(k.flops or 0) if k.name in PRODUCTS else 0, _bytes(k), k.name in PRODUCTS)
        for k in kernels
    ]
    return ops, len(reads)


# --- the trainer's epoch ------------------------------------------------------------


def epoch_ops(configs: Sequence[Any], images: int, seed: int = 0) -> tuple[list[Op], int]:
    """The kernels of one steady-state epoch of `configs` stacked (model.config.TrainConfig,
    full batch), on `images` synthetic images on the CPU, each config's subset set to all of
    them: the trainer's second epoch, the autograd path, fp32."""
    import model.kfold as kfold
    import model.steps as steps
    from model.data import DeviceData

    generator = torch.Generator().manual_seed(seed)
    data = DeviceData(
        x=torch.rand(images, 784, generator=generator),
        y=torch.randint(0, 10, (images,), generator=generator),
    )
    configs = [dataclasses.replace(c, subset=images) for c in configs]
    if configs[0].batch_size is not None and configs[0].batch_size < images:
        raise ValueError("full batch only: a mini-batch epoch's kernels grow with its steps")
    original = steps.make_step
    autograd = functools.partial(original, hand_written=False)
    # Every model module that imported make_step by name gets the autograd one (kfold
    # today); only while the trainer is built, which is when it picks its step. model.steps
    # itself is not patched, and `original` is held apart, so the restore cannot leave the
    # autograd step behind for the next trainer in this process.
    patched = [
        m
        for name, m in list(sys.modules.items())
        if name.startswith("model") and m is not steps and getattr(m, "make_step", None) is original
    ]
    for module in patched:
        module.make_step = autograd
    try:
        trainer = kfold._Trainer(configs, data, "fp32", compile=False, graphs=False)
    finally:
        for module in patched:
            module.make_step = original
    patience = configs[0].patience
    trainer._epoch(patience)
    return profile_ops(lambda: trainer._epoch(patience), autograd=True)


def extrapolate(a: tuple[int, list[Op]], b: tuple[int, list[Op]], rows: int) -> list[Op]:
    """Each op's FLOPs and bytes at `rows`, on the line through its counts at two sizes
    (rows, ops); the two must run the same kernels in the same order."""
    (ra, ops_a), (rb, ops_b) = a, b
    names_a, names_b = [o.name for o in ops_a], [o.name for o in ops_b]
    if names_a != names_b:
        raise ValueError(f"{ra} and {rb} rows run different kernels: no line through them")
    t = Fraction(rows - ra, rb - ra)

    def at(x: int, y: int) -> int:
        return max(0, round(x + (y - x) * t))

    return [
        Op(p.name, at(p.flops, q.flops), at(p.bytes, q.bytes), p.product)
        for p, q in zip(ops_a, ops_b, strict=True)
    ]


def totals(ops: Sequence[Op]) -> dict[str, int]:
    products = [o for o in ops if o.product]
    return {
        "flops": sum(o.flops for o in ops),
        "bytes": sum(o.bytes for o in ops),
        "launches": len(ops),
        "product_launches": len(products),
        "product_bytes": sum(o.bytes for o in products),
    }


# --- the prediction -----------------------------------------------------------------


def predict(ops: Sequence[Op], card: Ceilings, precision: str = "tf32") -> dict[str, float]:
    """Milliseconds an epoch on `card` (module docstring): `eager_ms`, `graphed_ms`, and
    their parts `products_ms`, `other_ms` (rooflines), `gaps_ms`, `host_ms`."""
    rate = card.gemm_tflops[precision] * 1e12
    bandwidth = card.bandwidth_gbs * 1e9
    products = other = 0.0
    for op in ops:
        if op.product:
            moved = op.bytes / 2 if precision == "bf16" else op.bytes
            products += max(op.flops / rate, moved / bandwidth)
        else:
            other += op.bytes / bandwidth
    gaps = len(ops) * card.graph_launch_us * 1e-6
    host = len(ops) * card.host_launch_us * 1e-6
    gpu = products + other + gaps
    parts = {"eager": max(gpu, host), "graphed": gpu, "products": products, "other": other}
    return {f"{name}_ms": 1e3 * s for name, s in {**parts, "gaps": gaps, "host": host}.items()}


# --- the stack, the JSON, the table -------------------------------------------------


def seed_stack(trials: int, k: int = 5) -> list[Any]:
    """The seed study's first `trials` draws as the stacking benchmark builds them: the
    seed protocol (all images, full batch, patience 50) with each draw's parameters."""
    from benchmarks.speed import STACK_PROTOCOLS, seed_draws

    base = dataclasses.replace(STACK_PROTOCOLS["seed, full batch"], k=k)
    return [base.with_params(params) for params in seed_draws(trials)]


def _code() -> dict[str, Any]:
    """Where the profiled `model` package lives, and its commit."""
    import model

    root = Path(model.__file__).resolve().parent.parent
    out: dict[str, Any] = {"code": str(root)}

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True)
        return done.stdout.strip()

    try:
        out["commit"] = git("rev-parse", "HEAD")
        out["model_changed_since_commit"] = bool(git("status", "--porcelain", "--", "model"))
    except OSError:  # no git here
        pass
    return out


def count_stack(configs: Sequence[Any], sizes: tuple[int, int] = (1000, 2000)) -> dict[str, Any]:
    """One epoch of the stack at its real row count, from profiles at `sizes` images."""
    from model.config import N_TRAIN_IMAGES

    first = configs[0]
    rows = N_TRAIN_IMAGES if first.subset is None else first.subset
    for size in sizes:
        if size % (4 * first.k):
            raise ValueError(f"{size} images: not a multiple of 4·k = {4 * first.k}")
    profiled = [(s, epoch_ops(configs, s)) for s in sizes]
    if profiled[0][1][1] != profiled[1][1][1]:
        raise ValueError("reads to the host differ between sizes")
    ops = extrapolate((sizes[0], profiled[0][1][0]), (sizes[1], profiled[1][1][0]), rows)
    grouped = Counter(dataclasses.astuple(o) for o in ops)
    return {
        **_code(),
        "torch": torch.__version__,
        "trials": [c.params() for c in configs],
        "k": first.k,
        "rows": rows,
        "profiled_images": list(sizes),
        "profiled_precision": "fp32",
        "host_reads": profiled[0][1][1],
        "totals": totals(ops),
        "ops": [[*op, n] for op, n in grouped.items()],
    }


def ops_of(record: dict[str, Any]) -> list[Op]:
    return [Op(name, f, b, bool(p)) for name, f, b, p, n in record["ops"] for _ in range(n)]


def cards(
    ceilings: Path | None, precision: str, host_us: float | None = None
) -> dict[str, Ceilings]:
    """The datasheet cards, and a measured one from `ceilings`; `host_us` replaces every
    card's host cost of an eager op."""
    chosen = dict(CARDS)
    if ceilings is not None:
        chosen["measured"] = measured_ceilings(ceilings, precision)
    if host_us is not None:
        chosen = {k: dataclasses.replace(c, host_launch_us=host_us) for k, c in chosen.items()}
    return chosen


def table(
    records: Sequence[tuple[str, dict[str, Any]]], chosen: dict[str, Ceilings], precision: str
) -> str:
    """The side-by-side, as Markdown: a row per path, and each later path's ratio to the
    first (how many times fewer FLOPs, bytes, launches, milliseconds)."""
    head = ["path", "GFLOP", "GB moved (fp32)", "launches"]
    for card in chosen.values():
        head += [f"{card.name} eager ms", f"{card.name} graphed ms"]
    rows = []
    for label, record in records:
        ops = ops_of(record)
        t = totals(ops)
        row = [t["flops"] / 1e9, t["bytes"] / 1e9, float(t["launches"])]
        for card in chosen.values():
            p = predict(ops, card, precision)
            row += [p["eager_ms"], p["graphed_ms"]]
        rows.append((label, row))
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, row in rows:
        cells = [f"{row[0]:,.0f}", f"{row[1]:,.2f}", f"{row[2]:,.0f}"]
        cells += [f"{v:,.2f}" for v in row[3:]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    first = rows[0][1]
    for label, row in rows[1:]:
        ratios = [f"{a / b:.2f}×" if b else "—" for a, b in zip(first, row, strict=True)]
        lines.append(f"| {rows[0][0]} / {label} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def _print_profile(record: dict[str, Any], chosen: dict[str, Ceilings], precision: str) -> None:
    t = record["totals"]
    print(
        f"{len(record['trials'])} trials, k = {record['k']}, {record['rows']:,} images, "
        f"code {record['code']} ({record.get('commit', '?')[:9]}), torch {record['torch']}"
    )
    print(
        f"  one epoch: {t['flops'] / 1e9:,.1f} GFLOP, {t['bytes'] / 1e9:,.2f} GB moved, "
        f"{t['launches']} launches ({t['product_launches']} products, "
        f"{t['product_bytes'] / 1e9:,.2f} GB), {record['host_reads']} reads to the host"
    )
    ops = ops_of(record)
    for card in chosen.values():
        p = predict(ops, card, precision)
        print(
            f"  {card.name}, {precision}: eager {p['eager_ms']:.2f} ms, graphed "
            f"{p['graphed_ms']:.2f} ms (products {p['products_ms']:.2f}, other ops "
            f"{p['other_ms']:.2f}, gaps {p['gaps_ms']:.2f}, host {p['host_ms']:.2f})"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="benchmarks/cost.py", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="what", required=True)
    prof = sub.add_parser(
        "profile", help="count one epoch of the seed stack of the code on sys.path"
    )
    prof.add_argument("--trials", type=int, default=8, help="the seed study's first N draws")
    prof.add_argument("--k", type=int, default=5)
    prof.add_argument("--sizes", default="1000,2000", help="the two profiled image counts")
    prof.add_argument("--json", type=Path, help="write the count here")
    comp = sub.add_parser("compare", help="the side-by-side of one or more counts")
    comp.add_argument("records", type=Path, nargs="+")
    comp.add_argument("--labels", help="comma-separated, one per record (default: file names)")
    for p in (prof, comp):
        p.add_argument("--precision", default="tf32", choices=tuple(HOPPER_TFLOPS))
        p.add_argument("--ceilings", type=Path, help="a card's measured ceilings (JSON)")
        p.add_argument("--host-us", type=float, help="the host's µs per eager op, every card")
    args = parser.parse_args(argv)
    chosen = cards(args.ceilings, args.precision, args.host_us)
    if args.what == "profile":
        a, b = (int(s) for s in args.sizes.split(","))
        record = count_stack(seed_stack(args.trials, args.k), (a, b))
        _print_profile(record, chosen, args.precision)
        if args.json:
            args.json.write_text(json.dumps(record, indent=1) + "\n")
        return 0
    labels = args.labels.split(",") if args.labels else [p.stem for p in args.records]
    if len(labels) != len(args.records):
        parser.error("--labels: one label per record")
    records = [
        (lab, json.loads(p.read_text())) for lab, p in zip(labels, args.records, strict=True)
    ]
    print(
        f"one epoch of {len(records[0][1]['trials'])} trials, k = {records[0][1]['k']}, "
        f"{records[0][1]['rows']:,} images; predicted in {args.precision}"
    )
    print(table(records, chosen, args.precision))
    return 0


if __name__ == "__main__":
    # Run as a script: `model` and `benchmarks` come from PYTHONPATH (the code to count);
    # this checkout only where it gives neither.
    sys.path.append(str(Path(__file__).resolve().parent.parent))
    sys.exit(main())
