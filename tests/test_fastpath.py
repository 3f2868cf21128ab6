"""The fast paths give the eager path's results: the hand-written CPU step, the mask
sampler, torch.compile, bf16 and tf32. Timings are benchmarks' business, not tested here.

Imports nothing of Optuna: `benchmarks/gpu_check.sh` runs this file on a GPU machine.
"""

from __future__ import annotations

import pytest
import torch

from model.config import TrainConfig
from model.cpu_step import CpuStep
from model.data import DeviceData, Mnist, to_device
from model.kfold import (
    AutogradStep,
    initial_model,
    make_optimizer,
    make_step,
    resolve_precision,
    train_kfold,
)
from model.stacked_ops import keep_mask
from tests.conftest import synthetic_data

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batches(data: DeviceData, k: int, rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for n in rows:
        idx = torch.randint(0, len(data), (k, n), generator=generator)
        out.append((data.x[idx], data.y[idx]))
    return out


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "hardswish"])
@pytest.mark.parametrize("dropout", [0.0, 0.35])
def test_hand_written_cpu_step_equals_the_autograd_step(activation: str, dropout: float) -> None:
    config = TrainConfig(hidden=(40, 20), activation=activation, dropout=dropout, k=3, lr=1e-3)
    data = synthetic_data(600)
    # Full batches, then mini-batches with a short last one, as an epoch has.
    steps = batches(data, config.k, [150, 150, 64, 64, 23])
    results = {}
    for hand_written in (True, False):
        model = initial_model(config)
        step = make_step(model, make_optimizer(model, config), 150, hand_written=hand_written)
        assert isinstance(step, CpuStep if hand_written else AutogradStep)
        torch.manual_seed(7)  # the same dropout masks for both
        outputs = [step(x, y) for x, y in steps]
        evaluation = step.evaluate(*steps[0])
        results[hand_written] = (
            outputs,
            evaluation,
            [p.detach().clone() for p in model.parameters()],
        )
    (ours, ours_eval, ours_params), (ref, ref_eval, ref_params) = results[True], results[False]
    for (loss_a, correct_a), (loss_b, correct_b) in zip(ours, ref, strict=True):
        torch.testing.assert_close(loss_a, loss_b, rtol=1e-5, atol=1e-6)
        assert torch.equal(correct_a, correct_b)
    for a, b in zip(ours_eval, ref_eval, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # Adam divides by the root of tiny second moments, which magnifies rounding where a
    # gradient is near zero; a wrong gradient would move many weights by about the step
    # size, 1e-3. So: every weight within a tenth of a step, and on average far closer.
    for a, b in zip(ours_params, ref_params, strict=True):
        difference = (a - b).abs()
        assert difference.max() < 1e-4
        assert difference.mean() < 1e-7


def test_keep_masks_keep_the_asked_fraction_in_every_position_and_reuse_buffers() -> None:
    torch.manual_seed(0)
    n = 400_000
    mask, kept = keep_mask((n,), 0.65)
    assert abs(kept - 0.65) < 3.1e-5
    standard_error = (0.65 * 0.35 / n) ** 0.5
    assert abs(mask.float().mean().item() - 0.65) < 4 * standard_error
    # Each 16-bit chunk of a word (the top one has its own range) keeps the same share.
    by_position = mask.view(-1, 4).float().mean(dim=0)
    assert (by_position - 0.65).abs().max() < 4 * standard_error * 2
    torch.manual_seed(1)
    fresh, _ = keep_mask((5, 7, 11), 0.5)
    words = torch.empty(200, dtype=torch.int64)
    bits = torch.empty(800, dtype=torch.bool)
    torch.manual_seed(1)
    reused, _ = keep_mask((5, 7, 11), 0.5, words=words, bits=bits)
    assert torch.equal(fresh, reused)


def test_compiled_step_gives_the_eager_numbers() -> None:
    data = synthetic_data(600)
    config = TrainConfig(
        hidden=(32, 16), dropout=0.0, batch_size=100, max_epochs=3, patience=5, k=3
    )
    eager = train_kfold(config, data)
    compiled = train_kfold(config, data, compile=True)
    assert compiled.best_epochs == eager.best_epochs
    for curve in ("train_loss", "val_loss", "val_accuracy"):
        for a, b in zip(compiled.curves[curve], eager.curves[curve], strict=True):
            assert a == pytest.approx(b, rel=1e-4, abs=1e-5)


def test_bf16_training_reaches_the_fp32_accuracy(mnist: Mnist) -> None:
    data = to_device(mnist.train_images, mnist.train_labels, "cpu")
    config = TrainConfig(subset=6000, batch_size=100, max_epochs=8, patience=9, k=2, lr=2e-3)
    fp32 = train_kfold(config, data)
    bf16 = train_kfold(config, data, precision="bf16")
    assert fp32.mean_accuracy > 0.9
    assert bf16.mean_accuracy == pytest.approx(fp32.mean_accuracy, abs=0.015)


def test_precision_defaults_to_tf32_on_a_gpu_and_fp32_on_the_cpu() -> None:
    assert resolve_precision(None, torch.device("cpu")) == "fp32"
    assert resolve_precision(None, torch.device("cuda", 0)) == "tf32"
    with pytest.raises(ValueError, match="tf32: a CUDA setting"):
        resolve_precision("tf32", torch.device("cpu"))
    with pytest.raises(ValueError, match="must be one of fp32, tf32, bf16"):
        resolve_precision("fp16", torch.device("cpu"))


@needs_cuda
def test_cuda_tf32_and_bf16_reach_the_fp32_accuracy(mnist: Mnist) -> None:
    data = to_device(mnist.train_images, mnist.train_labels, "cuda")
    config = TrainConfig(subset=12_000, batch_size=None, max_epochs=60, patience=100, k=5)
    fp32 = train_kfold(config, data, precision="fp32")
    for precision in ("tf32", "bf16"):
        other = train_kfold(config, data, precision=precision)
        assert other.mean_accuracy == pytest.approx(fp32.mean_accuracy, abs=0.01), precision


@needs_cuda
def test_cuda_graph_compiled_step_gives_the_eager_numbers() -> None:
    cpu = synthetic_data(2400)
    data = DeviceData(x=cpu.x.cuda(), y=cpu.y.cuda())
    config = TrainConfig(
        hidden=(64, 32), dropout=0.0, batch_size=200, max_epochs=5, patience=9, k=5
    )
    eager = train_kfold(config, data, precision="fp32")
    graphed = train_kfold(config, data, precision="fp32", compile=True)
    assert graphed.best_epochs == eager.best_epochs
    assert graphed.fold_losses == pytest.approx(eager.fold_losses, rel=1e-4)
