"""The fast paths give the eager path's results: the hand-written CPU step, the mask
sampler, torch.compile, bf16 and tf32. Timings are benchmarks' business, not tested here.

Imports nothing of Optuna: `benchmarks/gpu_check.sh` runs this file on a GPU machine.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from model import kfold
from model.config import ACTIVATIONS, SCHEDULES, TrainConfig
from model.cpu_step import CpuStep, _cross_entropy_and_grad
from model.data import DeviceData, Mnist, to_device
from model.dropout import keep_mask
from model.kfold import (
    KFoldResult,
    initial_model,
    net_shape,
    split_folds,
    train_kfold,
    train_trials,
)
from model.network import StackedFFNN
from model.optimizers import StackedAdam, TrialOptimizers, lr_factors, make_optimizer
from model.steps import AutogradStep, make_step, resolve_precision
from tests.conftest import synthetic_data
from tests.reference import (
    PlainTrainer,
    draw_step_masks,
    fold_masks,
    lr_factor,
    network_from,
    top_two_gaps,
)
from tests.rounding import loss_tolerance, near_ties, same_best_epoch, weight_tolerance

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
    layers = list(zip(model.weights_of(0), model.biases_of(0), strict=True))
    return [
        network_from(config, [(w[j].T, b[j, 0]) for w, b in layers], dtype) for j in range(config.k)
    ]


STEP_KINDS = {
    # (hand-written, dtype). Compared within rounding (tests/rounding.py): in float64 that
    # is below 1e-13 after these few steps, so it sees an error of 1e-5 (a dropout scale
    # of 1/(1 − p) instead of 1/kept is 9e-6 off at p = 0.35); in float32, 2e-5.
    "hand-written-float64": (True, torch.float64),
    "hand-written-float32": (True, torch.float32),
    "autograd-float32": (False, torch.float32),
}


def assert_same_count(ours: int, theirs: int, logits: torch.Tensor, steps: int) -> None:
    """Two counts of right predictions agree, but for rows whose two largest logits the
    reference found within rounding of each other (`tests.rounding.near_ties`)."""
    assert abs(ours - theirs) <= near_ties(top_two_gaps(logits), logits.dtype, steps)


def network_difference(ours: torch.nn.Module, theirs: torch.nn.Module) -> torch.Tensor:
    """Every weight's absolute difference between two networks of one shape."""
    return torch.cat(
        [
            (a - b).abs().flatten()
            for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
        ]
    )


@pytest.mark.parametrize("kind", STEP_KINDS)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dropout", [0.0, 0.35])
def test_training_step_matches_each_network_stepped_alone(
    kind: str, activation: str, dropout: float
) -> None:
    hand_written, dtype = STEP_KINDS[kind]
    config = TrainConfig(hidden=(40, 20), activation=activation, dropout=dropout, k=3, lr=1e-3)
    data = synthetic_data(600)
    # Full batches, then mini-batches with a short last one, as an epoch has.
    rows = [150, 150, 64, 64, 23]
    steps = [(x.to(dtype), y) for x, y in batches(data, config.k, rows)]
    model = initial_model(config).to(dtype)
    nets = reference_networks(config, dtype)
    generators = [torch.Generator().manual_seed(7)]
    optimizer = make_optimizer(model, [config], total_steps=len(steps))
    step = make_step(model, optimizer, 150, generators, hand_written=hand_written)
    assert isinstance(step, CpuStep if hand_written else AutogradStep)
    trainers = [PlainTrainer(net, config, len(steps)) for net in nets]

    ours = [step(x, y) for x, y in steps]
    torch.manual_seed(7)  # the reference draws the same masks by the documented rule
    for done, ((x, y), (loss, correct)) in enumerate(zip(steps, ours, strict=True)):
        masks = draw_step_masks(config.k, x.shape[1], config)
        for j, trainer in enumerate(trainers):
            ref_loss, ref_correct = trainer.step(x[j], y[j], fold_masks(masks, j))
            assert loss[j].item() == pytest.approx(ref_loss, rel=loss_tolerance(dtype, done))
            assert_same_count(correct[j].item(), ref_correct, trainer.logits, done)

    x, y = steps[0]
    losses, accuracies = step.evaluate(x, y)
    for j, net in enumerate(nets):
        with torch.no_grad():
            logits = net.eval()(x[j])
        assert losses[j].item() == pytest.approx(
            F.cross_entropy(logits, y[j]).item(), rel=loss_tolerance(dtype, len(steps))
        )
        right = (logits.argmax(dim=1) == y[j]).sum().item()
        assert_same_count(round(accuracies[j].item() * y.shape[1]), right, logits, len(steps))
        # Adam divides by the root of tiny second moments, which magnifies rounding where
        # a gradient is near zero, so single weights may stray further; a wrong gradient
        # would move many weights by about the step size, 1e-3, far past the bound.
        difference = network_difference(model.extract(j), net)
        assert difference.mean() <= weight_tolerance(dtype, len(steps), config.lr, max(rows))


# Three trials that differ in everything a stack lets differ: widths (so the first layer's
# fused product has three parts and a padded tail), activation, dropout, optimizer,
# learning rate, penalty and seed.
STACKED_TRIALS = [
    TrainConfig(hidden=(40, 20), activation="silu", dropout=0.35, optimizer="adam", lr=1e-3,
                weight_decay=1e-4, k=2, seed=11),
    TrainConfig(hidden=(17, 33), activation="relu", dropout=0.0, optimizer="adamax", lr=3e-3,
                weight_decay=0.0, k=2, seed=12),
    TrainConfig(hidden=(25, 9), activation="relu", dropout=0.5, optimizer="adam", lr=2e-3,
                weight_decay=1e-3, k=2, seed=13),
]  # fmt: skip

# Three trials that between them use every setting beyond the report's: input dropout
# (with and without hidden dropout), a max-norm cap small enough to bind from the first
# step (initial incoming-weight norms are about 0.58), AdamW, SGD with Nesterov momentum,
# cosine and one-cycle schedules, and label smoothing; at different widths.
FEATURE_TRIALS = [
    TrainConfig(hidden=(40, 20), activation="silu", dropout=0.3, input_dropout=0.2,
                optimizer="adamw", lr=2e-3, weight_decay=1e-2, schedule="cosine", warmup=0.4,
                label_smoothing=0.1, k=2, seed=21),
    TrainConfig(hidden=(17, 33), activation="relu", dropout=0.0, optimizer="sgd", lr=0.05,
                weight_decay=1e-3, schedule="one_cycle", max_norm=0.5, k=2, seed=22),
    TrainConfig(hidden=(25, 9), activation="relu", dropout=0.5, input_dropout=0.1,
                optimizer="adam", lr=3e-3, weight_decay=1e-4, max_norm=0.45,
                schedule="cosine", warmup=0.2, label_smoothing=0.25, k=2, seed=23),
]  # fmt: skip

# The same for `StackedAdam`, which steps Adam and Adamax only.
FEATURE_TRIALS_ADAM = [
    dataclasses.replace(FEATURE_TRIALS[0], optimizer="adam"),
    dataclasses.replace(FEATURE_TRIALS[1], optimizer="adamax", lr=3e-3),
    FEATURE_TRIALS[2],
]


def step_stack_against_reference(
    trials: list[TrainConfig], kind: str, capturable: bool, rows: list[int]
) -> StackedFFNN:
    """Steps `trials` stacked (k = 2) on batches of `rows`, and each network alone by the
    reference; asserts each step's losses and counts and the final weights agree.
    Returns the stack."""
    hand_written, dtype = STEP_KINDS[kind]
    data = synthetic_data(600)
    k = trials[0].k
    steps = [(x.to(dtype), y) for x, y in batches(data, k, rows)]
    model = StackedFFNN([net_shape(c) for c in trials], k)
    model.reset_parameters([c.seed for c in trials])
    model = model.to(dtype)
    optimizer = make_optimizer(model, trials, total_steps=len(steps), capturable=capturable)
    assert isinstance(optimizer, StackedAdam if capturable else TrialOptimizers)
    generators = [torch.Generator().manual_seed(c.seed) for c in trials]
    step = make_step(model, optimizer, max(rows), generators, hand_written=hand_written)
    assert isinstance(step, CpuStep if hand_written else AutogradStep)
    ours = [step(x, y) for x, y in steps]

    for t, config in enumerate(trials):
        # Trial t alone, by the reference's rules: its own initial weights and masks.
        trainers = [
            PlainTrainer(net, config, len(steps)) for net in reference_networks(config, dtype)
        ]
        torch.manual_seed(config.seed)
        for done, ((x, y), (loss, correct)) in enumerate(zip(steps, ours, strict=True)):
            masks = draw_step_masks(k, x.shape[1], config)
            for j, trainer in enumerate(trainers):
                ref_loss, ref_correct = trainer.step(x[j], y[j], fold_masks(masks, j))
                assert loss[t * k + j].item() == pytest.approx(
                    ref_loss, rel=loss_tolerance(dtype, done)
                )
                assert_same_count(correct[t * k + j].item(), ref_correct, trainer.logits, done)
        for j, trainer in enumerate(trainers):
            extracted = model.extract(t * k + j)
            assert extracted.hidden == config.hidden
            difference = network_difference(extracted, trainer.net)
            tolerance = weight_tolerance(dtype, len(steps), config.lr, max(rows))
            assert difference.mean() <= tolerance
    return model


@pytest.mark.parametrize("capturable", [False, True], ids=["per-trial-optimizers", "stacked-adam"])
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_stacked_trials_step_as_each_network_stepped_alone(kind: str, capturable: bool) -> None:
    model = step_stack_against_reference(STACKED_TRIALS, kind, capturable, [150, 64, 23])
    assert [shape.hidden for shape in model.shapes] == [c.hidden for c in STACKED_TRIALS]


@pytest.mark.parametrize("capturable", [False, True], ids=["per-trial-optimizers", "stacked-adam"])
@pytest.mark.parametrize("kind", STEP_KINDS)
def test_trials_with_every_new_setting_step_as_each_network_stepped_alone(
    kind: str, capturable: bool
) -> None:
    """Input dropout, max-norm, AdamW, SGD (Nesterov), cosine and one-cycle schedules and
    label smoothing, per trial in a stack, on both optimizers' paths."""
    trials = FEATURE_TRIALS_ADAM if capturable else FEATURE_TRIALS
    # Six steps (so the schedules rise and fall): full batches, mini-batches, a short one.
    model = step_stack_against_reference(trials, kind, capturable, [150, 64, 23, 150, 64, 23])
    # The cap bound: every capped network's hidden units sit at or under it, and the
    # first layer's widest ones (they start near 0.58) exactly on it; the output layer is
    # not capped (some of its units are above the cap).
    for t, config in enumerate(trials):
        if config.max_norm is None:
            continue
        cap = config.max_norm
        for n in range(t * config.k, (t + 1) * config.k):
            net = model.extract(n)
            hidden_norms = [torch.linalg.vector_norm(m.weight, dim=1) for m in net.layers[:-1]]
            assert all((norms <= cap * (1 + 1e-6)).all() for norms in hidden_norms)
            assert hidden_norms[0].max().item() == pytest.approx(cap, rel=1e-6)
            output_norms = torch.linalg.vector_norm(net.layers[-1].weight, dim=1)
            assert output_norms.max().item() > cap * 1.01


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
    # Compiled code is cached per kernel path (tests/conftest.py): torch's own cache mixes
    # them up.
    data = synthetic_data(600)
    config = TrainConfig(
        hidden=(32, 16), dropout=0.0, batch_size=100, max_epochs=3, patience=5, k=3
    )
    eager = train_kfold(config, data)
    compiled = train_kfold(config, data, compile=True)
    # 600 images, k = 3: 400 training rows per fold, 4 steps an epoch. Two computations
    # in float32: figures within rounding (tests/rounding.py), and another best epoch only
    # where eager's own losses at the two are within rounding of each other.
    steps_per_epoch = 4
    for j in range(config.k):
        best, eager_losses = compiled.best_epochs[j], eager.curves["val_loss"][j]
        assert same_best_epoch(
            best, eager.best_epochs[j], eager_losses, torch.float32, steps_per_epoch
        )
        for curve in ("train_loss", "val_loss"):
            for epoch, (a, b) in enumerate(
                zip(compiled.curves[curve][j], eager.curves[curve][j], strict=True), start=1
            ):
                tolerance = loss_tolerance(torch.float32, epoch * steps_per_epoch)
                assert a == pytest.approx(b, rel=tolerance), (j, curve, epoch)
        if best == eager.best_epochs[j]:  # the same rows right, but near ties of logits
            _, val_rows = split_folds(len(data), config)
            with torch.no_grad():
                logits = eager.model.extract(j).eval()(data.x[val_rows[j]])
            rows = val_rows.shape[1]
            assert_same_count(
                round(compiled.fold_accuracies[j] * rows),
                round(eager.fold_accuracies[j] * rows),
                logits,
                best * steps_per_epoch,
            )


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
@pytest.mark.parametrize(
    "trials", [STACKED_TRIALS, FEATURE_TRIALS_ADAM], ids=["constant", "schedules-and-max-norm"]
)
@pytest.mark.parametrize("batch_size", [None, 200], ids=["full-batch", "mini-batch"])
def test_cuda_graph_epochs_give_the_eager_numbers(
    batch_size: int | None, trials: list[TrainConfig]
) -> None:
    """Whole epochs captured and replayed, for a stack of trials of different widths that
    stop at different epochs (so the stack shrinks and is captured again); the schedules'
    rates and the max-norm caps are read on the device, so replays follow them too."""
    data = cuda_copy(synthetic_data(2400, learnable=False))
    configs = [
        dataclasses.replace(
            c, dropout=0.0, input_dropout=0.0, batch_size=batch_size, max_epochs=40, patience=3
        )
        for c in trials
    ]
    eager = train_trials(configs, data, precision="fp32")
    graphed = train_trials(configs, data, precision="fp32", graphs=True)
    assert len({max(r.epochs_run) for r in eager}) > 1  # the stack did shrink
    # 2,400 images, k = 2: 1,200 training rows a fold, one step an epoch or six.
    steps_per_epoch = 1 if batch_size is None else 6
    tolerance = 2 * loss_tolerance(torch.float32, configs[0].max_epochs * steps_per_epoch)
    for a, b in zip(graphed, eager, strict=True):
        assert_same_best_epochs_but_for_ties(a, b, steps_per_epoch)
        assert a.fold_losses == pytest.approx(b.fold_losses, rel=tolerance)


def assert_same_best_epochs_but_for_ties(
    a: KFoldResult, b: KFoldResult, steps_per_epoch: int
) -> None:
    """Each fold's best epoch the same in `a` as in `b` (float32), except where `b`'s own
    validation losses at the two epochs are within rounding (`same_best_epoch`): a tie
    that rounding may break either way (on random labels the loss is nearly flat, and an
    H200 broke one so, 40 against 39, graphed epochs stepping with `StackedAdam` and eager
    ones with fused Adam). A fold with the same best epoch stopped at the same epoch."""
    for fold, (best_a, best_b) in enumerate(zip(a.best_epochs, b.best_epochs, strict=True)):
        losses = b.curves["val_loss"][fold]
        assert same_best_epoch(best_a, best_b, losses, torch.float32, steps_per_epoch), (
            fold,
            best_a,
            best_b,
        )
        if best_a == best_b:
            assert a.epochs_run[fold] == b.epochs_run[fold], fold


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
@pytest.mark.parametrize("trials", [STACKED_TRIALS, FEATURE_TRIALS], ids=["report", "wide"])
def test_stacked_trials_on_cuda_match_each_trained_alone(trials: list[TrainConfig]) -> None:
    """Each trial draws from its own CUDA generator, so stacked or alone it sees the same
    initial weights, batch order and dropout masks (input masks included)."""
    data = cuda_copy(synthetic_data(2400))
    configs = [dataclasses.replace(c, batch_size=200, max_epochs=6, patience=9) for c in trials]
    stacked = train_trials(configs, data, precision="fp32")
    for config, result in zip(configs, stacked, strict=True):
        alone = train_kfold(config, data, precision="fp32")
        assert result.best_epochs == alone.best_epochs
        assert result.fold_losses == pytest.approx(alone.fold_losses, rel=1e-4)


@pytest.mark.parametrize(
    "trials", [STACKED_TRIALS, FEATURE_TRIALS_ADAM], ids=["constant", "schedules-and-max-norm"]
)
def test_both_optimizers_give_each_trial_its_own_update_and_keep_it_through_a_selection(
    trials: list[TrainConfig],
) -> None:
    """`StackedAdam` (one update for the stack, for CUDA graphs) and `TrialOptimizers`
    (torch's per trial) step three trials alike — schedules and max-norm caps included —
    and after the stack drops its middle trial, the two survivors go on as if nothing had
    happened (each at its own point of its schedule)."""
    k = 2
    shapes = [net_shape(c) for c in trials]
    models = []
    for _ in range(2):
        model = StackedFFNN(shapes, k)
        model.reset_parameters([c.seed for c in trials])
        models.append(model)
    stacked = make_optimizer(models[0], trials, total_steps=5, capturable=True)
    per_trial = make_optimizer(models[1], trials, total_steps=5)
    # Each network alone, as the reference steps it on the same gradients.
    alone = [
        PlainTrainer(network_of(models[1], n, trials[n // k]), trials[n // k], 5)
        for n in range(models[1].n)
    ]
    generator = torch.Generator().manual_seed(0)

    def step_both(optimizers: list, models: list[StackedFFNN], networks: list[int]) -> None:
        grads = [torch.randn(p.shape, generator=generator) for p in models[0].parameters()]
        for optimizer, model in zip(optimizers, models, strict=True):
            for param, grad in zip(model.parameters(), grads, strict=True):
                param.grad = grad.clone()
            optimizer.step()
        per_trial = 2 * models[0].depth
        for position, n in enumerate(networks):
            t, j = divmod(position, k)
            own = grads[t * per_trial : (t + 1) * per_trial]
            linears = [m for m in alone[n].net if isinstance(m, torch.nn.Linear)]
            for i, linear in enumerate(linears):
                linear.weight.grad = own[i][j].T.contiguous()
                linear.bias.grad = own[len(linears) + i][j, 0].clone()
            alone[n].update()

    for _ in range(3):
        step_both([stacked, per_trial], models, list(range(models[0].n)))
    kept = [0, 2]
    smaller = [m.select(kept) for m in models]
    index = models[0].network_index(kept)
    stacked = stacked.select(smaller[0], kept, index)
    per_trial = per_trial.select(smaller[1], kept, index)
    for _ in range(2):
        step_both([stacked, per_trial], smaller, index.tolist())
    for a, b in zip(smaller[0].parameters(), smaller[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for position, n in enumerate(index.tolist()):
        for ours, ref in zip(
            smaller[1].extract(position).parameters(), alone[n].net.parameters(), strict=True
        ):
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)


def network_of(model: StackedFFNN, n: int, config: TrainConfig) -> torch.nn.Sequential:
    """Network n of a stack as the reference's `nn.Sequential`."""
    t, j = divmod(n, model.k)
    own = zip(model.weights_of(t), model.biases_of(t), strict=True)
    layers = [(w[j].T, b[j, 0]) for w, b in own]
    return network_from(config, [(w.detach(), b.detach()) for w, b in layers], torch.float32)


# T = 20 steps, warm-up 0.2: cosine warms up over W = 4 steps and decays over 16;
# one-cycle rises over R = round(0.3 · 20) = 6 steps and falls over 14.
E = 1 / 25 / 1e4
KNOWN_FACTORS = {
    "constant": {0: 1.0, 3: 1.0, 12: 1.0, 19: 1.0},
    "cosine": {
        0: 1 / 4,  # first step: (s + 1) / W
        3: 1.0,  # end of the warm-up
        4: 1.0,  # first step of the decay: cos(0)
        12: 0.5,  # the decay's midpoint
        19: 0.5 * (1 + math.cos(math.pi * 15 / 16)),  # last step, short of 0
    },
    "one_cycle": {
        0: 1 / 25,  # first step: the start
        3: 1 / 25 + (1 - 1 / 25) * 0.5,  # the rise's midpoint
        6: 1.0,  # the peak
        13: E + (1 - E) * 0.5,  # the fall's midpoint
        19: E + (1 - E) * 0.5 * (1 + math.cos(math.pi * 13 / 14)),  # last step
    },
}


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_lr_factors_take_their_documented_values_and_the_optimizers_step_by_them(
    schedule: str,
) -> None:
    total, warmup = 20, 0.2
    factors = lr_factors(schedule, warmup, total)
    assert factors.dtype == torch.float64 and factors.shape == (total,)
    for s, value in KNOWN_FACTORS[schedule].items():
        assert factors[s].item() == pytest.approx(value, rel=1e-12), s
    # Every step as the reference writes the formula out.
    expected = [lr_factor(schedule, warmup, total, s) for s in range(total)]
    assert factors.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert lr_factors(schedule, warmup, 1).tolist() == [1.0]  # one step: the configured rate

    # The optimizers step by them. With the same gradient of ±1 at every step and no
    # penalty, Adam's and Adamax's bias-corrected moments are exactly g and |g|, so step
    # s moves every weight by lr · factor(s) / (1 + 1e-8) (ε = 1e-8) against the sign.
    lr = 1e-2
    trials = [
        TrainConfig(hidden=(6, 4), optimizer=optimizer, lr=lr, weight_decay=0.0, dropout=0.0,
                    schedule=schedule, warmup=warmup, k=2, seed=seed)
        for seed, optimizer in enumerate(["adam", "adamax"])
    ]  # fmt: skip
    for capturable in (False, True):
        model = StackedFFNN([net_shape(c) for c in trials], 2)
        model.reset_parameters([c.seed for c in trials])
        model = model.to(torch.float64)
        optimizer = make_optimizer(model, trials, total_steps=total, capturable=capturable)
        signs = [torch.randn(p.shape, generator=torch.Generator().manual_seed(1)).sign()
                 for p in model.parameters()]  # fmt: skip
        for s in range(total):
            before = [p.detach().clone() for p in model.parameters()]
            for param, sign in zip(model.parameters(), signs, strict=True):
                param.grad = sign.to(torch.float64)
            optimizer.step()
            moved = lr * factors[s].item() / (1 + 1e-8)
            for param, was, sign in zip(model.parameters(), before, signs, strict=True):
                torch.testing.assert_close(
                    was - param.detach(), moved * sign.to(torch.float64), rtol=1e-9, atol=1e-15
                )
            if not capturable:  # and torch's optimizers hold that rate in their groups
                for trial in optimizer.optimizers:
                    assert trial.param_groups[0]["lr"] == pytest.approx(lr * factors[s].item())


@pytest.mark.parametrize("smoothing", [0.0, 0.1, 0.37])
def test_hand_written_loss_and_gradient_are_cross_entropy_with_label_smoothing(
    smoothing: float,
) -> None:
    generator = torch.Generator().manual_seed(5)
    logits = (4 * torch.randn(3, 17, 10, generator=generator, dtype=torch.float64)).requires_grad_()
    y = torch.randint(0, 10, (3, 17), generator=generator)
    grad = torch.empty(3, 17, 10, dtype=torch.float64)
    loss, correct = _cross_entropy_and_grad(logits.detach().clone(), y, grad, smoothing)

    expected = torch.stack(
        [F.cross_entropy(logits[j], y[j], label_smoothing=smoothing) for j in range(3)]
    )
    expected.sum().backward()
    torch.testing.assert_close(loss, expected.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grad, logits.grad, rtol=1e-10, atol=1e-14)
    assert correct.tolist() == (logits.argmax(dim=2) == y).sum(dim=1).tolist()
    if smoothing:  # it is not plain cross-entropy
        plain = F.cross_entropy(logits[0].detach(), y[0]).item()
        assert abs(loss[0].item() - plain) > 1e-3


def test_best_epochs_may_differ_only_on_a_tie_of_the_reference_s_own_losses() -> None:
    def result(best: list[int], run: list[int], val_loss: list[list[float]]) -> KFoldResult:
        return KFoldResult(
            config=TrainConfig(k=len(best)), fold_accuracies=[0.5] * len(best),
            fold_losses=[min(c) for c in val_loss], best_epochs=best, epochs_run=run,
            curves={"val_loss": val_loss}, seconds=1.0, device="cpu",
        )  # fmt: skip

    reference = result(
        [3, 2], [6, 5], [[2.0, 1.5, 1.2, 1.20001, 1.3, 1.4], [2.0, 1.0, 1.1, 1.2, 1.3]]
    )
    # Fold 0 broke the tie of epochs 3 and 4 the other way (1.2 against 1.20001).
    assert_same_best_epochs_but_for_ties(result([4, 2], [7, 5], [[0.0]] * 2), reference, 1)
    with pytest.raises(AssertionError):  # epochs 2 and 3 of fold 1 are no tie
        assert_same_best_epochs_but_for_ties(result([3, 3], [6, 6], [[0.0]] * 2), reference, 1)
    with pytest.raises(AssertionError):  # the same best epoch, but stopped elsewhere
        assert_same_best_epochs_but_for_ties(result([3, 2], [6, 9], [[0.0]] * 2), reference, 1)


# Trials as the seed study draws them (dropout 0.3–0.5, Adam or Adamax, all three of its
# activations, L2 penalties), stacked: the graphs' gate before a study must test these.
SEED_LIKE_TRIALS = [
    TrainConfig(hidden=(183, 43), activation="relu", dropout=0.35, optimizer="adam", lr=5e-3,
                weight_decay=1e-4, seed=21),
    TrainConfig(hidden=(90, 36), activation="leaky_relu", dropout=0.5, optimizer="adamax",
                lr=2e-3, weight_decay=1e-5, seed=22),
    TrainConfig(hidden=(250, 50), activation="hardswish", dropout=0.3, optimizer="adam",
                lr=1e-3, weight_decay=1e-3, seed=23),
]  # fmt: skip


@needs_cuda
def test_cuda_graph_epochs_of_seed_trials_with_dropout_reach_the_eager_accuracy(
    mnist: Mnist, caplog: pytest.LogCaptureFixture
) -> None:
    """The seed study's own kind of stack under graphs: dropout on, both optimizers, the
    report's activations, full batch, trials that stop at different epochs (so the stack
    shrinks and is captured again). Replays draw other masks, so the accuracy is compared,
    not the numbers; and a capture must not have fallen back to eager epochs."""
    data = to_device(mnist.train_images, mnist.train_labels, "cuda")
    configs = [
        dataclasses.replace(c, subset=12_000, batch_size=None, max_epochs=300, patience=10, k=5)
        for c in SEED_LIKE_TRIALS
    ]
    eager = train_trials(configs, data)
    with caplog.at_level("WARNING", logger="model.kfold"):
        graphed = train_trials(configs, data, graphs=True)
    assert not [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len({max(r.epochs_run) for r in graphed}) > 1  # the stack did shrink
    for a, b in zip(graphed, eager, strict=True):
        assert a.diverged is None
        assert a.mean_accuracy == pytest.approx(b.mean_accuracy, abs=0.01)


class _FailingCapture:
    """Stands in for `torch.cuda.graph`: the capture raises, as a kernel that cannot be
    captured makes it do."""

    def __init__(self, graph: object) -> None:
        pass

    def __enter__(self) -> None:
        raise RuntimeError("operation not permitted when stream is capturing\nmore detail")

    def __exit__(self, *exc: object) -> None:
        pass


def test_a_failed_capture_trains_the_stack_on_in_eager_epochs_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """No trial may fail because a capture did: the stack goes on eagerly, after one
    warning. CUDA is faked (its streams and graphs), so that the trainer's graph path runs
    on the CPU up to the capture, which raises."""

    class FakeStream:
        def __init__(self, device: object = None) -> None:
            pass

        def wait_stream(self, other: object) -> None:
            pass

    class FakeGraph:
        def register_generator_state(self, generator: torch.Generator) -> None:
            pass

    streams_made: list[FakeStream] = []

    def make_stream(device: object = None) -> FakeStream:
        streams_made.append(FakeStream())
        return streams_made[-1]

    monkeypatch.setattr(torch.cuda, "Stream", make_stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: FakeStream())
    monkeypatch.setattr(torch.cuda, "stream", lambda stream: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _FailingCapture)

    data = synthetic_data(600)
    configs = [dataclasses.replace(c, max_epochs=12, patience=20) for c in STACKED_TRIALS]
    with caplog.at_level("WARNING", logger="model.kfold"):
        trainer = kfold._Trainer(configs, data, "fp32", compile=False, graphs=True)
        graphed = trainer.run(1, None, None)
    eager = train_trials(configs, data)
    failures = [r for r in caplog.records if "capture failed" in r.getMessage()]
    assert len(failures) == 1
    assert "RuntimeError: operation not permitted" in failures[0].getMessage()
    assert "more detail" not in failures[0].getMessage()  # one line
    # One side stream for the trainer's life, not one per warm-up epoch.
    assert len(streams_made) == 1
    assert len(graphed) == len(configs)
    for a, b in zip(graphed, eager, strict=True):
        assert a.diverged is None and not a.halted
        assert a.epochs_run == [12] * a.config.k  # every epoch ran, past the failed capture
        # StackedAdam against the per-trial optimizers: Adam both, rounded differently.
        assert a.mean_accuracy == pytest.approx(b.mean_accuracy, abs=0.05)
