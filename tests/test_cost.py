"""benchmarks/cost.py: what it counts from torch.profiler, the line it extrapolates the
rows on, the prediction, its JSON and its side-by-side table. Tiny stacks, a few seconds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import cost
from model.config import TrainConfig

# Full batch, as the seed preset trains; 60 images with k = 3 is 40 training and 20
# validation rows a fold, and every size here a multiple of 4·k (cost.py's docstring).
ONE_LAYER = TrainConfig(hidden=(16,), dropout=0.25, k=3, batch_size=None, max_epochs=5, patience=3)
STACK = [
    TrainConfig(hidden=(16, 8), activation="relu", optimizer="adam", dropout=0.3, k=3, seed=1),
    TrainConfig(
        hidden=(12, 8), activation="leaky_relu", optimizer="adamax", dropout=0.2, k=3, seed=2
    ),
]


def test_the_flops_of_one_trial_are_its_products_two_m_n_k_each() -> None:
    ops, host_reads = cost.epoch_ops([ONE_LAYER], 60)
    k, train, val, h, inputs, classes = 3, 40, 20, 16, 784, 10

    def product(m: int, n: int, inner: int) -> int:
        return 2 * k * m * n * inner

    expected = [
        product(train, h, inputs),  # training forward, layer 1
        product(train, classes, h),  # layer 2
        product(train, h, classes),  # backward: layer 2's input gradient
        product(h, classes, train),  # layer 2's weight gradient
        product(inputs, h, train),  # layer 1's weight gradient (no gradient for the images)
        product(val, h, inputs),  # validation forward
        product(val, classes, h),
    ]
    products = [op for op in ops if op.product]
    assert len(products) == len(expected)
    assert sorted(op.flops for op in products) == sorted(expected)
    assert sum(op.flops for op in ops) == sum(expected)
    assert host_reads == 0  # fused Adam's reads of its step count are the CPU's own


@pytest.fixture(scope="module")
def measured() -> dict[int, list[cost.Op]]:
    """The stack's epoch at three sizes, profiled once for the module."""
    return {n: cost.epoch_ops(STACK, n)[0] for n in (60, 120, 180)}


@pytest.fixture(scope="module")
def record() -> dict[str, object]:
    return cost.count_stack(STACK, (60, 120))


def test_profiling_leaves_every_later_trainer_its_own_step() -> None:
    # The profile builds its trainer with the autograd step patched in; afterwards the
    # CPU's float64 trainer must get the hand-written step again (a leak once made every
    # later test in the process train through autograd).
    import model.kfold as kfold
    import model.steps as steps

    original = steps.make_step
    cost.epoch_ops([ONE_LAYER], 60)
    assert steps.make_step is original
    assert kfold.make_step is original


def test_every_count_lies_on_the_line_through_two_sizes_at_a_third(
    measured: dict[int, list[cost.Op]],
) -> None:
    # Exactly: every shape is affine in the rows, and the sizes keep the folds and
    # keep_mask's 4-value words whole, so no count rounds; the allocator's bytes are exact.
    line = cost.extrapolate((60, measured[60]), (180, measured[180]), 120)
    assert line == measured[120]
    assert len(measured[60]) == len(measured[180])  # the launches do not grow with the rows
    grown = cost.totals(measured[180])
    assert grown["bytes"] > cost.totals(measured[60])["bytes"]
    assert grown["flops"] == 3 * cost.totals(measured[60])["flops"]  # products are linear


def test_views_launch_nothing_and_a_broadcast_is_read_once(
    measured: dict[int, list[cost.Op]],
) -> None:
    x = torch.rand(6, 4, 10)

    def views() -> None:
        y = x.view(24, 10).reshape(6, 40).t().transpose(0, 1).unsqueeze(0).squeeze(0)
        x.permute(2, 0, 1).expand(2, 10, 6, 4).narrow(0, 0, 1).select(1, 2)
        x[1:3].detach().split(1)
        y.as_strided((2, 2), (1, 1))

    assert cost.profile_ops(views) == ([], 0)
    ops, _ = cost.profile_ops(lambda: x * x)
    assert [op.name for op in ops] == ["aten::mul"]
    assert ops[0].bytes == 3 * x.numel() * 4  # two operands read, the product written
    a, b = torch.rand(7, 5), torch.rand(5, 3)
    ops, _ = cost.profile_ops(lambda: a @ b)
    assert [(op.flops, op.product) for op in ops] == [(2 * 7 * 5 * 3, True)]
    assert ops[0].bytes == (7 * 5 + 5 * 3 + 7 * 3) * 4
    bias = torch.rand(1, 8)
    ops, _ = cost.profile_ops(lambda: bias.expand(1000, 8).contiguous())
    assert [(op.name, op.bytes) for op in ops] == [("aten::copy_", (8 + 1000 * 8) * 4)]
    assert not {op.name for op in measured[60]} & cost.NO_KERNEL
    # One fill kernel at any size, though the CPU's zero_ calls fill_ only at some.
    for n in (10, 100_000):
        ops, _ = cost.profile_ops(lambda n=n: torch.zeros(n))
        assert [(op.name, op.bytes) for op in ops] == [("aten::zero_", 4 * n)]


def test_the_prediction_rises_with_the_bytes_and_falls_with_the_bandwidth() -> None:
    card = cost.CARDS["H100"]
    light = [cost.Op("aten::mul", 0, 10**9, False), cost.Op("aten::bmm", 10**12, 10**8, True)]
    heavy = [cost.Op("aten::mul", 0, 2 * 10**9, False), light[1]]
    assert cost.predict(heavy, card)["graphed_ms"] > cost.predict(light, card)["graphed_ms"]
    assert cost.CARDS["H200"].bandwidth_gbs > card.bandwidth_gbs
    assert (
        cost.predict(heavy, cost.CARDS["H200"])["graphed_ms"]
        < cost.predict(heavy, card)["graphed_ms"]
    )
    p = cost.predict(light, card)
    # 1 GB at 3.35 TB/s, 1 TFLOP at 494.7 TFLOP/s, two kernels' gaps; host-bound never here.
    assert p["other_ms"] == pytest.approx(1e3 / 3350)
    assert p["products_ms"] == pytest.approx(1e3 / 494.7)
    assert (
        p["eager_ms"]
        == p["graphed_ms"]
        == pytest.approx(p["products_ms"] + p["other_ms"] + 2 * 1.5e-3)
    )
    # Many tiny kernels: the host's launches bound an eager epoch, a graph does not.
    tiny = [cost.Op("aten::add_", 0, 8, False)] * 1000
    t = cost.predict(tiny, card)
    assert t["eager_ms"] == pytest.approx(1000 * 7.5e-3) and t["graphed_ms"] < t["eager_ms"]
    # bf16 halves a memory-bound product's bytes.
    wide = [cost.Op("aten::bmm", 10**6, 10**9, True)]
    assert cost.predict(wide, card, "bf16")["products_ms"] == pytest.approx(
        cost.predict(wide, card, "tf32")["products_ms"] / 2
    )


def test_the_json_round_trips(
    tmp_path: Path, record: dict[str, object], measured: dict[int, list[cost.Op]]
) -> None:
    path = tmp_path / "count.json"
    path.write_text(json.dumps(record))
    again = json.loads(path.read_text())
    assert again == record
    ops = cost.ops_of(again)
    # 60,000 images, as the seed preset trains (subset None): 48,000 training rows a fold.
    direct = cost.extrapolate((60, measured[60]), (120, measured[120]), 60_000)
    assert sorted(ops, key=repr) == sorted(direct, key=repr)
    assert cost.totals(ops) == record["totals"]
    assert record["rows"] == 60_000 and record["k"] == 3 and len(record["trials"]) == 2


def test_compare_prints_both_paths_and_their_ratio(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], record: dict[str, object]
) -> None:
    today, new = tmp_path / "today.json", tmp_path / "new.json"
    today.write_text(json.dumps(record))
    halved = json.loads(today.read_text())
    halved["ops"] = [[n, f, b // 2, p, c] for n, f, b, p, c in halved["ops"]]
    new.write_text(json.dumps(halved))
    ceilings = tmp_path / "ceilings.json"
    ceilings.write_text(json.dumps({"gemm_tflops": 300, "copy_gbs": 3000, "launch_us": 9}))
    assert cost.main(["compare", str(today), str(new), "--ceilings", str(ceilings)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith("| today |") for line in lines)
    assert any(line.startswith("| new |") for line in lines)
    ratio = next(line for line in lines if line.startswith("| today / new |"))
    cells = [c.strip() for c in ratio.strip("|").split("|")][1:]
    assert cells[0] == "1.00×" and cells[1] == "2.00×" and cells[2] == "1.00×"
    assert "H100 SXM eager ms" in out and "H200 SXM graphed ms" in out
    assert "| measured eager ms |" in out
    measured = cost.measured_ceilings(ceilings, "tf32")
    assert (measured.gemm_tflops["tf32"], measured.bandwidth_gbs) == (300.0, 3000.0)
    assert measured.host_launch_us == 9.0
