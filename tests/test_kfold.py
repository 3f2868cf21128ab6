from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from model.config import ACTIVATIONS, TrainConfig
from model.data import DeviceData
from model.kfold import KFoldResult, Progress, split_folds, stack_key, train_kfold, train_trials
from tests.conftest import synthetic_data
from tests.reference import FoldRun, fold_indices, reference_kfold
from tests.rounding import (
    loss_tolerance,
    near_ties,
    same_best_epoch,
    weight_tolerance,
    within_rounding,
)

TINY = TrainConfig(
    hidden=(16, 8),
    activation="relu",
    dropout=0.0,
    optimizer="adam",
    lr=3e-3,
    weight_decay=1e-4,
    batch_size=None,
    max_epochs=40,
    patience=4,
    k=3,
)


def fold_val_loss(result: KFoldResult, data: DeviceData, j: int) -> float:
    _, val_rows = fold_indices(len(data), result.config)[j]
    net = result.model.extract(j).eval()
    with torch.no_grad():
        return F.cross_entropy(net(data.x[val_rows]), data.y[val_rows]).item()


# The trainer builds its model in torch's default dtype, and the CPU step computes in the
# model's: float64 compares best and stopping epochs exactly (rounding stays near 1e-13,
# far below any two epochs' difference); float32, the dtype users train in, compares
# within float32's rounding (tests/rounding.py).
DTYPES = {"float64": torch.float64, "float32": torch.float32}


@contextlib.contextmanager
def training_dtype(dtype: torch.dtype) -> Iterator[None]:
    """The trainer's model, bookkeeping and random draws in `dtype` for the block."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def synthetic_in(dtype: torch.dtype, n: int = 240, *, learnable: bool = True) -> DeviceData:
    data = synthetic_data(n, learnable=learnable)
    return DeviceData(x=data.x.to(dtype), y=data.y)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("learnable", [True, False], ids=["learnable", "random-labels"])
@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "mini-batch"])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_stacked_trainer_matches_each_fold_trained_alone(
    activation: str, batch_size: int | None, learnable: bool, dtype: str
) -> None:
    # 240 images, k = 3: 160 training rows per fold, so mini-batches of 40 are 4 steps.
    config = dataclasses.replace(
        TINY, activation=activation, dropout=0.3, batch_size=batch_size, max_epochs=25
    )
    data = synthetic_in(DTYPES[dtype], learnable=learnable)
    with training_dtype(DTYPES[dtype]):
        result = train_kfold(config, data)
    assert result.model.weights_of(0)[0].dtype == DTYPES[dtype]
    assert_matches_reference(result, data)


def assert_matches_reference(result: KFoldResult, data: DeviceData) -> None:
    """`result` is what `reference_kfold` gives for its configuration, in the dtype of
    `data`: in float64, each fold's best and last epochs exactly; in float32, a best epoch
    other than the reference's only where the reference's own losses at the two are
    within rounding of each other. Then, at the best epoch, its figures and weights, and
    its curves at every epoch, to within rounding (tests/rounding.py)."""
    config = result.config
    dtype = data.x.dtype
    exact = dtype == torch.float64
    # In float32 the reference trains on past its own stop: the trainer's best epoch may
    # be a later one, tied with the reference's best within rounding.
    runs = reference_kfold(config, data.x, data.y, run_out=not exact)
    n_train = len(fold_indices(len(data), config)[0][0])
    rows = n_train if config.full_batch else min(config.batch_size, n_train)
    steps_per_epoch = -(-n_train // rows)
    for j, run in enumerate(runs):
        best = result.best_epochs[j]
        if exact:
            assert_best_is_clear(run, dtype, steps_per_epoch)
            assert (best, result.epochs_run[j]) == (run.best_epoch, run.epochs), f"fold {j}"
        else:
            # Another best epoch only where the reference's own losses at the two are
            # within rounding of each other (random labels make flat stretches).
            assert same_best_epoch(
                best, run.best_epoch, run.curves["val_loss"], dtype, steps_per_epoch
            ), f"fold {j}: best epoch {best}, the reference's {run.best_epoch}"
            # Early stopping ends a fold `patience` epochs after its best.
            assert result.epochs_run[j] == min(best + config.patience, config.max_epochs)
        # Its figures are its curves' at its best epoch, as the reference's are.
        assert result.fold_losses[j] == result.curves["val_loss"][j][best - 1]
        assert result.fold_accuracies[j] == result.curves["val_accuracy"][j][best - 1]
        for name, reference_curve in run.curves.items():
            curve = result.curves[name][j]
            assert len(curve) == result.epochs_run[j]
            compared = zip(curve, reference_curve[: len(curve)], strict=True)
            for epoch, (ours, theirs) in enumerate(compared, start=1):
                steps = epoch * steps_per_epoch
                where = f"fold {j}, {name} at epoch {epoch}"
                if name.endswith("loss"):
                    assert ours == pytest.approx(theirs, rel=loss_tolerance(dtype, steps)), where
                else:
                    assert_same_count(ours, theirs, run.gaps[name][epoch - 1], dtype, steps, where)
        # The weights handed back are fold j's at its best epoch, at its own widths: on
        # average over the network within rounding of the reference's then (an epoch
        # moves them by about a step each, lr, far more), and scoring its validation rows
        # as the reference did then.
        ours = result.model.extract(j)
        assert ours.hidden == config.hidden
        theirs = run.net if exact else run.net_at(best)
        steps = best * steps_per_epoch
        difference = torch.cat(
            [
                (a - b).abs().flatten()
                for a, b in zip(ours.parameters(), theirs.parameters(), strict=True)
            ]
        )
        assert difference.mean() <= weight_tolerance(dtype, steps, config.lr, rows), f"fold {j}"
        assert fold_val_loss(result, data, j) == pytest.approx(
            run.curves["val_loss"][best - 1], rel=loss_tolerance(dtype, steps)
        ), f"fold {j}"


def assert_best_is_clear(run: FoldRun, dtype: torch.dtype, steps_per_epoch: int) -> None:
    """The premise of comparing best epochs exactly: no other epoch the reference ran has a
    validation loss within rounding of its best one's."""
    losses = run.curves["val_loss"][: run.epochs]
    for epoch, loss in enumerate(losses, start=1):
        if epoch != run.best_epoch:
            steps = max(epoch, run.best_epoch) * steps_per_epoch
            assert not within_rounding(loss, run.loss, dtype, steps), (epoch, run.best_epoch)


def assert_same_count(
    ours: float, theirs: float, gaps: torch.Tensor, dtype: torch.dtype, steps: int, where: str
) -> None:
    """Two accuracies over the rows of `gaps` count the same rows right, but for rows the
    reference found within rounding of a tie (`near_ties`)."""
    rows = gaps.numel()
    assert ours * rows == pytest.approx(round(ours * rows), abs=1e-3), where  # a whole count
    assert abs(round(ours * rows) - round(theirs * rows)) <= near_ties(gaps, dtype, steps), where


STACKED = [
    # Widths differ (so the stack pads), and so do activation, dropout, optimizer, learning
    # rate, penalty and seed; random labels make the folds stop at different epochs.
    dataclasses.replace(TINY, hidden=(16, 8), activation="silu", dropout=0.3, seed=5),
    dataclasses.replace(
        TINY, hidden=(9, 14), activation="relu", dropout=0.0, optimizer="adamax", lr=1e-2,
        weight_decay=0.0, seed=6,
    ),
    dataclasses.replace(TINY, hidden=(21, 5), activation="leaky_relu", dropout=0.5, lr=5e-3),
    dataclasses.replace(TINY, hidden=(12, 12), activation="relu", dropout=0.2, seed=8),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "mini-batch"])
def test_stacked_trials_each_match_their_folds_trained_alone(
    batch_size: int | None, dtype: str
) -> None:
    configs = [
        dataclasses.replace(c, batch_size=batch_size, max_epochs=30, patience=3) for c in STACKED
    ]
    data = synthetic_in(DTYPES[dtype], learnable=False)
    ended: list[tuple[int, int]] = []  # (trial, epochs it ran) in the order they ended
    with training_dtype(DTYPES[dtype]):
        results = train_trials(
            configs, data, on_result=lambda i, r: ended.append((i, max(r.epochs_run)))
        )
    assert sorted(i for i, _ in ended) == [0, 1, 2, 3]
    assert [epochs for _, epochs in ended] == sorted(epochs for _, epochs in ended)
    assert len({epochs for _, epochs in ended}) > 1  # trials ended apart: the stack shrank
    for config, result in zip(configs, results, strict=True):
        assert result.config == config
        assert_matches_reference(result, data)


FEATURES = [
    # Every setting beyond the report's, spread over a stack of different widths: input
    # dropout, max-norm caps that bind (initial incoming-weight norms are about 0.58),
    # AdamW, SGD with Nesterov momentum, cosine and one-cycle schedules, label smoothing.
    dataclasses.replace(
        TINY, hidden=(16, 8), activation="silu", dropout=0.3, input_dropout=0.2,
        optimizer="adamw", weight_decay=1e-2, schedule="cosine", warmup=0.1,
        label_smoothing=0.1, seed=5,
    ),
    dataclasses.replace(
        TINY, hidden=(9, 14), activation="relu", dropout=0.0, optimizer="sgd", lr=0.05,
        weight_decay=1e-3, schedule="one_cycle", max_norm=0.5, seed=6,
    ),
    dataclasses.replace(
        TINY, hidden=(21, 5), activation="leaky_relu", dropout=0.5, input_dropout=0.1,
        lr=5e-3, max_norm=0.45, schedule="cosine", label_smoothing=0.2, seed=7,
    ),
    dataclasses.replace(
        TINY, hidden=(12, 12), activation="relu", dropout=0.2, optimizer="adamax", lr=1e-2,
        schedule="one_cycle", input_dropout=0.3, seed=8,
    ),
]  # fmt: skip


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "mini-batch"])
def test_stacked_trials_with_every_new_setting_each_match_their_folds_trained_alone(
    batch_size: int | None, dtype: str
) -> None:
    configs = [
        dataclasses.replace(c, batch_size=batch_size, max_epochs=20, patience=3) for c in FEATURES
    ]
    data = synthetic_in(DTYPES[dtype], learnable=False)
    ended: list[int] = []
    with training_dtype(DTYPES[dtype]):
        results = train_trials(
            configs, data, on_result=lambda i, r: ended.append(max(r.epochs_run))
        )
    assert len(set(ended)) > 1  # trials ended apart: the stack shrank mid-schedule
    for config, result in zip(configs, results, strict=True):
        assert result.config == config
        assert_matches_reference(result, data)
        if config.max_norm is not None:  # the cap bound on the first layer's units
            norms = torch.linalg.vector_norm(result.model.weights_of(0)[0], dim=1)
            assert norms.max().item() == pytest.approx(config.max_norm, rel=1e-5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "mini-batch"])
def test_networks_of_one_hidden_layer_match_their_folds_trained_alone(
    batch_size: int | None, dtype: str
) -> None:
    configs = [
        dataclasses.replace(c, hidden=c.hidden[:1], batch_size=batch_size, max_epochs=12)
        for c in FEATURES
    ]
    assert TrainConfig().with_params({"n_layers": 1, "n_units_l0": 16}).hidden == (16,)
    data = synthetic_in(DTYPES[dtype])
    with training_dtype(DTYPES[dtype]):
        results = train_trials(configs, data)
    for config, result in zip(configs, results, strict=True):
        assert result.config == config and result.model.depth == 2
        assert_matches_reference(result, data)


def test_a_halted_trial_leaves_the_stack_alone_and_matches_its_lone_run() -> None:
    configs = [dataclasses.replace(c, max_epochs=12, patience=20) for c in STACKED[:3]]
    data = synthetic_data(240)
    heard: dict[int, list[int]] = {0: [], 1: [], 2: []}

    def halt_trial_1_at_epoch_4(trial: int, progress: Progress) -> bool:
        heard[trial].append(progress.epoch)
        return trial == 1 and progress.epoch == 4

    results = train_trials(configs, data, on_progress=halt_trial_1_at_epoch_4)
    assert heard == {0: list(range(1, 13)), 1: [1, 2, 3, 4], 2: list(range(1, 13))}
    assert [r.halted for r in results] == [False, True, False]
    assert results[1].epochs_run == [4, 4, 4]
    alone = train_kfold(configs[1], data, on_progress=lambda p: p.epoch == 4)
    assert results[1].fold_losses == pytest.approx(alone.fold_losses, rel=1e-5)
    for trial in (0, 2):
        alone = train_kfold(configs[trial], data)
        assert results[trial].epochs_run == alone.epochs_run == [12, 12, 12]
        assert results[trial].fold_losses == pytest.approx(alone.fold_losses, rel=1e-5)
        assert results[trial].curves["val_loss"] == [
            pytest.approx(curve, rel=1e-5) for curve in alone.curves["val_loss"]
        ]


def test_only_configurations_of_one_protocol_stack() -> None:
    data = synthetic_data(60)
    with pytest.raises(ValueError, match="one depth, k"):
        train_trials([TINY, dataclasses.replace(TINY, k=2)], data)
    with pytest.raises(ValueError, match="one depth, k"):
        train_trials([TINY, dataclasses.replace(TINY, hidden=(4, 4, 4))], data)
    assert stack_key(TINY) == stack_key(dataclasses.replace(TINY, hidden=(3, 2), lr=0.1, seed=9))


def test_early_stopping_stops_a_fold_and_restores_its_best_weights() -> None:
    # Random labels: the network can only memorise, so validation loss turns upward.
    data = synthetic_data(240, learnable=False)
    config = dataclasses.replace(TINY, lr=1e-2, max_epochs=200)
    result = train_kfold(config, data)
    for j in range(config.k):
        curve = result.curves["val_loss"][j]
        best = result.best_epochs[j]
        assert result.epochs_run[j] == best + config.patience < config.max_epochs
        assert len(curve) == result.epochs_run[j]
        assert curve[best - 1] == min(curve)
        assert curve[-1] > curve[best - 1]
        # The returned weights are the best epoch's, not the last epoch's.
        assert fold_val_loss(result, data, j) == pytest.approx(result.fold_losses[j], rel=1e-5)
        assert result.fold_losses[j] == pytest.approx(curve[best - 1])


def test_reading_back_rarely_gives_the_same_numbers_as_every_epoch() -> None:
    data = synthetic_data(240, learnable=False)
    config = dataclasses.replace(TINY, lr=1e-2, max_epochs=60)
    every_epoch = train_kfold(config, data, sync_every=1)
    every_seventh = train_kfold(config, data, sync_every=7)
    # Exactly: one process, one thread count, the same products in the same order; only
    # when the host reads the numbers back differs.
    assert every_seventh.best_epochs == every_epoch.best_epochs
    assert every_seventh.epochs_run == every_epoch.epochs_run
    assert every_seventh.fold_losses == every_epoch.fold_losses
    assert every_seventh.curves == every_epoch.curves
    for p, q in zip(every_epoch.model.parameters(), every_seventh.model.parameters(), strict=True):
        assert torch.equal(p, q)


def test_same_config_and_seed_give_the_same_numbers_and_another_seed_does_not() -> None:
    data = synthetic_data(300)
    config = dataclasses.replace(TINY, dropout=0.3, batch_size=32, max_epochs=5)
    a, b = train_kfold(config, data), train_kfold(config, data)
    # Exactly: the same computation twice in one process, so rounded the same way.
    assert a.fold_accuracies == b.fold_accuracies
    assert a.curves == b.curves
    c = train_kfold(dataclasses.replace(config, seed=1), data)
    assert c.curves != a.curves


def test_minibatch_training_learns_and_records_one_curve_point_per_epoch() -> None:
    data = synthetic_data(600)
    config = dataclasses.replace(TINY, batch_size=50, max_epochs=15, patience=15, lr=1e-2)
    result = train_kfold(config, data)
    assert result.epochs_run == [15, 15, 15]
    assert all(len(c) == 15 for c in result.curves["train_loss"])
    assert all(c[-1] < c[0] for c in result.curves["train_loss"])
    assert result.mean_accuracy > 0.3  # 10 classes: chance is 0.1
    assert result.diverged is None and not result.halted


def test_divergence_ends_the_run_with_a_result_saying_so() -> None:
    # Pixels of 3e38: the first layer's products overflow float32.
    data = synthetic_data(120)
    data = DeviceData(x=data.x * 3e38, y=data.y)
    config = dataclasses.replace(TINY, max_epochs=50)
    result = train_kfold(config, data)
    assert result.diverged is not None
    assert "non-finite" in result.diverged
    assert max(result.epochs_run) < config.max_epochs


def test_the_caller_can_halt_training_between_epochs() -> None:
    data = synthetic_data(120)
    seen: list[int] = []

    def stop_at_third(progress) -> bool:
        seen.append(progress.epoch)
        assert 0.0 <= progress.mean_accuracy <= 1.0
        return progress.epoch == 3

    result = train_kfold(dataclasses.replace(TINY, patience=40), data, on_progress=stop_at_third)
    assert seen == [1, 2, 3]
    assert result.halted
    assert result.epochs_run == [3, 3, 3]


def test_folds_partition_the_subset_and_are_the_same_for_every_configuration() -> None:
    config = TrainConfig(k=5, subset=1003, fold_seed=7)
    train, val = split_folds(60_000, config)
    assert val.shape == (5, 200) and train.shape == (5, 800)
    used = val.flatten()
    assert used.unique().numel() == 1000  # the 3 left over are dropped
    for j in range(5):
        assert set(train[j].tolist()).isdisjoint(val[j].tolist())
        assert set(train[j].tolist()) | set(val[j].tolist()) == set(used.tolist())
    other = dataclasses.replace(config, hidden=(10,), lr=0.1, seed=3)
    assert torch.equal(split_folds(60_000, other)[1], val)
    assert not torch.equal(split_folds(60_000, dataclasses.replace(config, fold_seed=8))[1], val)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_trainer_matches_the_cpu_trainer() -> None:
    cpu = synthetic_data(240)
    gpu = DeviceData(x=cpu.x.cuda(), y=cpu.y.cuda())
    # Early stopping bookkept on the device, read back every 5 epochs, in fp32.
    a, b = train_kfold(TINY, cpu), train_kfold(TINY, gpu, sync_every=5, precision="fp32")
    assert a.best_epochs == b.best_epochs
    assert a.fold_losses == pytest.approx(b.fold_losses, rel=1e-3)
