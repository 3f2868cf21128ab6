"""The fast paths give the eager path's results: the hand-written CPU step, the mask
sampler, torch.compile, bf16 and tf32. Timings are benchmarks' business, not tested here.

Imports nothing of Optuna: `benchmarks/gpu_check.sh` runs this file on a GPU machine.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.config import ACTIVATIONS, TrainConfig
from model.cpu_step import CpuStep
from model.data import DeviceData, Mnist, to_device
from model.dropout import keep_mask
from model.kfold import initial_model, net_shape, train_kfold, train_trials
from model.network import StackedFFNN
from model.steps import (
    AutogradStep,
    StackedAdam,
    TrialOptimizers,
    make_optimizer,
    make_step,
    resolve_precision,
)
from tests.conftest import synthetic_data
from tests.reference import draw_step_masks, network_from, plain_optimizer, plain_step, set_masks

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def batches(data: DeviceData, k: int, rows: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    out = []
    for n in rows:
        idx = torch.randint(0, len(data), (k, n), generator=generator)
        out.append((data.x[idx], data.y[idx]))
    return out


def reference_networks(config: TrainConfig, dtype: torch.dtype) -> list[torch.nn.Sequential]:
    """Each fold's network alone, as `nn.Sequential`, from the trainer's initial weights."""
    model = initial_model(config).to(dtype)
    layers = list(zip(model.weights, model.biases, strict=True))
    return [
        network_from(config, [(w[j].T, b[j, 0]) for w, b in layers], dtype) for j in range(config.k)
    ]


STEP_KINDS = {
    # In float64 the rounding is ~1e-16, so a tolerance of 1e-10 still sees an error of
    # 1e-5 (a dropout scale of 1/(1 − p) instead of 1/kept is 9e-6 off at p = 0.35).
    "hand-written-float64": (True, torch.float64, 1e-10),
    "hand-written-float32": (True, torch.float32, 1e-5),
    "autograd-float32": (False, torch.float32, 1e-5),
}


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.35])
def test_training_step_matches_each_network_stepped_alone(
    kind: str, activation: str, dropout: float
) -> None:
    hand_written, dtype, tolerance = STEP_KINDS[kind]
    config = TrainConfig(hidden=(40, 20), activation=activation, dropout=dropout, k=3, lr=1e-3)
    data = synthetic_data(600)
    # Full batches, then mini-batches with a short last one, as an epoch has.
    steps = [(x.to(dtype), y) for x, y in batches(data, config.k, [150, 150, 64, 64, 23])]
    model = initial_model(config).to(dtype)
    nets = reference_networks(config, dtype)
    generators = [torch.Generator().manual_seed(7)]
    optimizer = make_optimizer(model, [config])
    step = make_step(model, optimizer, 150, generators, hand_written=hand_written)
    assert isinstance(step, CpuStep if hand_written else AutogradStep)
    optimizers = [plain_optimizer(net, config) for net in nets]

    ours = [step(x, y) for x, y in steps]
    torch.manual_seed(7)  # the reference draws the same masks by the documented rule
    for (x, y), (loss, correct) in zip(steps, ours, strict=True):
        masks = draw_step_masks(config.k, x.shape[1], config)
        for j, (net, optimizer) in enumerate(zip(nets, optimizers, strict=True)):
            set_masks(net, None if masks is None else [m[j] for m in masks])
            ref_loss, ref_correct = plain_step(net, optimizer, x[j], y[j])
            assert loss[j].item() == pytest.approx(ref_loss, rel=tolerance)
            assert correct[j].item() == ref_correct

    x, y = steps[0]
    losses, accuracies = step.evaluate(x, y)
    for j, net in enumerate(nets):
        with torch.no_grad():
            logits = net.eval()(x[j])
        assert losses[j].item() == pytest.approx(
            F.cross_entropy(logits, y[j]).item(), rel=tolerance
        )
        right = (logits.argmax(dim=1) == y[j]).sum().item()
        assert accuracies[j].item() == pytest.approx(right / y.shape[1], abs=1e-7)
        # Adam divides by the root of tiny second moments, which magnifies rounding where
        # a gradient is near zero; a wrong gradient would move many weights by about the
        # step size, 1e-3. So: every weight within a tenth of a step, and on average far
        # closer (in float64 everything is within rounding).
        linears = [m for m in net if isinstance(m, torch.nn.Linear)]
        for i, linear in enumerate(linears):
            for ours_param, ref_param in (
                (model.weights[i][j].T, linear.weight),
                (model.biases[i][j, 0], linear.bias),
            ):
                difference = (ours_param - ref_param).abs()
                assert difference.max() < (1e-4 if dtype == torch.float32 else tolerance)
                assert difference.mean() < (1e-7 if dtype == torch.float32 else tolerance)


# Three trials that differ in everything a stack lets differ: widths (so two are padded),
# activation, dropout, optimizer, learning rate, penalty and seed.
STACKED_TRIALS = [
    TrainConfig(hidden=(40, 20), activation="silu", dropout=0.35, optimizer="adam", lr=1e-3,
                weight_decay=1e-4, k=2, seed=11),
    TrainConfig(hidden=(17, 33), activation="relu", dropout=0.0, optimizer="adamax", lr=3e-3,
                weight_decay=0.0, k=2, seed=12),
    TrainConfig(hidden=(25, 9), activation="relu", dropout=0.5, optimizer="adam", lr=2e-3,
                weight_decay=1e-3, k=2, seed=13),
]  # fmt: skip


@pytest.mark.parametrize("capturable", [False, True], ids=["per-trial-optimizers", "stacked-adam"])
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_stacked_trials_step_as_each_network_stepped_alone(kind: str, capturable: bool) -> None:
    hand_written, dtype, tolerance = STEP_KINDS[kind]
    data = synthetic_data(600)
    k = 2
    steps = [(x.to(dtype), y) for x, y in batches(data, k, [150, 64, 23])]
    model = StackedFFNN([net_shape(c) for c in STACKED_TRIALS], k)
    model.reset_parameters([c.seed for c in STACKED_TRIALS])
    model = model.to(dtype)
    optimizer = make_optimizer(model, STACKED_TRIALS, capturable=capturable)
    assert isinstance(optimizer, StackedAdam if capturable else TrialOptimizers)
    generators = [torch.Generator().manual_seed(c.seed) for c in STACKED_TRIALS]
    step = make_step(model, optimizer, 150, generators, hand_written=hand_written)
    ours = [step(x, y) for x, y in steps]

    for t, config in enumerate(STACKED_TRIALS):
        # Trial t alone, by the reference's rules: its own initial weights and masks.
        nets = reference_networks(config, dtype)
        optimizers = [plain_optimizer(net, config) for net in nets]
        torch.manual_seed(config.seed)
        for (x, y), (loss, correct) in zip(steps, ours, strict=True):
            masks = draw_step_masks(k, x.shape[1], config)
            for j, (net, plain) in enumerate(zip(nets, optimizers, strict=True)):
                set_masks(net, None if masks is None else [m[j] for m in masks])
                ref_loss, ref_correct = plain_step(net, plain, x[j], y[j])
                assert loss[t * k + j].item() == pytest.approx(ref_loss, rel=tolerance)
                assert correct[t * k + j].item() == ref_correct
        for j, net in enumerate(nets):
            extracted = model.extract(t * k + j)
            assert extracted.hidden == config.hidden
            for ours_param, ref_param in zip(extracted.parameters(), net.parameters(), strict=True):
                difference = (ours_param - ref_param).abs()
                assert difference.max() < (1e-4 if dtype == torch.float32 else tolerance)
                assert difference.mean() < (1e-7 if dtype == torch.float32 else tolerance)
    # Padding stays exactly zero through training.
    assert model.weights[0][2:4, :, 17:].abs().max() == 0
    assert model.weights[1][2:4, 17:, :].abs().max() == 0
    assert model.weights[2][4:6, 9:, :].abs().max() == 0


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


def cuda_copy(data: DeviceData) -> DeviceData:
    return DeviceData(x=data.x.cuda(), y=data.y.cuda())


@needs_cuda
@pytest.mark.parametrize("batch_size", [None, 200], ids=["full-batch", "mini-batch"])
def test_cuda_graph_epochs_give_the_eager_numbers(batch_size: int | None) -> None:
    """Whole epochs captured and replayed, for a stack of trials of different widths that
    stop at different epochs (so the stack shrinks and is captured again)."""
    data = cuda_copy(synthetic_data(2400, learnable=False))
    configs = [
        dataclasses.replace(c, dropout=0.0, batch_size=batch_size, max_epochs=40, patience=3)
        for c in STACKED_TRIALS
    ]
    eager = train_trials(configs, data, precision="fp32")
    graphed = train_trials(configs, data, precision="fp32", graphs=True)
    assert len({max(r.epochs_run) for r in eager}) > 1  # the stack did shrink
    for a, b in zip(graphed, eager, strict=True):
        assert a.best_epochs == b.best_epochs
        assert a.epochs_run == b.epochs_run
        assert a.fold_losses == pytest.approx(b.fold_losses, rel=1e-4)


@needs_cuda
def test_cuda_graph_epochs_with_dropout_reach_the_eager_accuracy(mnist: Mnist) -> None:
    """With dropout, replays draw other masks than eager epochs: the same accuracy, not the
    same numbers."""
    data = to_device(mnist.train_images, mnist.train_labels, "cuda")
    config = TrainConfig(subset=12_000, batch_size=None, max_epochs=60, patience=100, k=5)
    eager = train_trials([config, dataclasses.replace(config, hidden=(120, 30))], data)
    graphed = train_trials([config, dataclasses.replace(config, hidden=(120, 30))], data,
                           graphs=True)  # fmt: skip
    for a, b in zip(graphed, eager, strict=True):
        assert a.mean_accuracy == pytest.approx(b.mean_accuracy, abs=0.01)


@needs_cuda
def test_stacked_trials_on_cuda_match_each_trained_alone() -> None:
    """Each trial draws from its own CUDA generator, so stacked or alone it sees the same
    initial weights, batch order and dropout masks."""
    data = cuda_copy(synthetic_data(2400))
    configs = [
        dataclasses.replace(c, batch_size=200, max_epochs=6, patience=9) for c in STACKED_TRIALS
    ]
    stacked = train_trials(configs, data, precision="fp32")
    for config, result in zip(configs, stacked, strict=True):
        alone = train_kfold(config, data, precision="fp32")
        assert result.best_epochs == alone.best_epochs
        assert result.fold_losses == pytest.approx(alone.fold_losses, rel=1e-4)


def test_both_optimizers_give_each_trial_its_own_update_and_keep_it_through_a_selection() -> None:
    """`StackedAdam` (one update for the stack, for CUDA graphs) and `TrialOptimizers`
    (torch's per trial) step three trials alike, and after the stack drops its middle
    trial, the two survivors go on as if nothing had happened."""
    k = 2
    shapes = [net_shape(c) for c in STACKED_TRIALS]
    models = []
    for _ in range(2):
        model = StackedFFNN(shapes, k)
        model.reset_parameters([c.seed for c in STACKED_TRIALS])
        models.append(model)
    stacked = make_optimizer(models[0], STACKED_TRIALS, capturable=True)
    per_trial = make_optimizer(models[1], STACKED_TRIALS)
    generator = torch.Generator().manual_seed(0)

    def step_both(optimizers: list, models: list[StackedFFNN]) -> None:
        grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for optimizer, model in zip(optimizers, models, strict=True):
            for param, grad in zip(model.parameters(), grads, strict=True):
                # Zero gradient on the padding, as training gives it.
                param.grad = grad * mask_of(model, param)
            optimizer.step()

    for _ in range(3):
        step_both([stacked, per_trial], models)
    kept = [0, 2]
    smaller = [m.select(kept) for m in models]
    index = models[0].network_index(kept)
    stacked = stacked.select(smaller[0], kept, index)
    per_trial = per_trial.select(smaller[1], kept, index)
    for _ in range(2):
        step_both([stacked, per_trial], smaller)
    for a, b in zip(smaller[0].parameters(), smaller[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for n in range(smaller[0].n):  # the padding stayed zero
        for p in smaller[0].parameters():
            assert (p[n] * (1 - mask_of(smaller[0], p)[n])).abs().max() == 0


def mask_of(model: StackedFFNN, param: torch.Tensor) -> torch.Tensor:
    """1 where a stacked tensor holds a network's own weights, 0 on its padding."""
    layer = next(i for i, p in enumerate(model.parameters()) if p is param)
    weights = len(model.weights)
    i = layer if layer < weights else layer - weights
    mask = torch.zeros(param.shape)
    for n in range(model.n):
        sizes = model.shape_of(n).sizes
        rows = sizes[i] if layer < weights else 1
        mask[n, :rows, : sizes[i + 1]] = 1
    return mask
