"""Trials resumed from a snapshot of their training (`model.trial_state`): each ends as it
would have without the interruption — in float64 the same best and last epochs exactly,
in float32 within rounding — whatever stack it resumes in."""

from __future__ import annotations

import dataclasses
import io

import pytest
import torch

from model.kfold import train_trials
from model.trial_state import SNAPSHOT_FORMAT, SnapshotError, TrialSnapshot
from tests.test_kfold import (
    DTYPES,
    FEATURES,
    TINY,
    assert_matches_reference,
    synthetic_in,
    training_dtype,
)


def saved_and_read(snapshot: TrialSnapshot) -> TrialSnapshot:
    """The snapshot after a trip through a checkpoint file, as a resumed worker reads it."""
    buffer = io.BytesIO()
    torch.save(snapshot.payload(), buffer)
    buffer.seek(0)
    return TrialSnapshot.from_payload(torch.load(buffer, weights_only=True))


def snapshots_by_epoch(configs: list, data) -> dict[int, dict[int, TrialSnapshot]]:  # type: ignore[type-arg]
    """Every trial's snapshot at the end of every epoch of an uninterrupted run."""
    taken: dict[int, dict[int, TrialSnapshot]] = {}
    train_trials(
        configs,
        data,
        checkpoint_every=0.0,
        on_checkpoint=lambda i, s: taken.setdefault(s.epoch, {}).__setitem__(i, s),
    )
    return taken


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "mini-batch"])
def test_trials_resumed_from_snapshots_each_match_their_folds_trained_alone(
    batch_size: int | None, dtype: str
) -> None:
    # Every optimizer, schedules, max-norm caps and dropouts, at four widths: the stack pads.
    configs = [
        dataclasses.replace(c, batch_size=batch_size, max_epochs=20, patience=3) for c in FEATURES
    ]
    data = synthetic_in(DTYPES[dtype], learnable=False)
    with training_dtype(DTYPES[dtype]):
        taken = snapshots_by_epoch(configs, data)
        assert sorted(taken[3]) == [0, 1, 2, 3]  # all four were training at epoch 3
        # The whole stack resumed together, as a worker's stack of retries is.
        resumed = train_trials(
            configs, data, resume=[saved_and_read(taken[3][i]) for i in range(4)]
        )
        # One trial resumed alone, and two in a stack of their own: other stacks than the
        # one they stopped in, so other paddings.
        alone = train_trials([configs[2]], data, resume=[saved_and_read(taken[5][2])])
        pair = train_trials(configs[:2], data, resume=[saved_and_read(taken[4][i]) for i in (0, 1)])
        # After some trials ended and the stack shrank.
        last = max(epoch for epoch, trials in taken.items() if len(trials) < 4)
        late = sorted(taken[last])
        shrunk = train_trials(
            [configs[i] for i in late], data, resume=[saved_and_read(taken[last][i]) for i in late]
        )
    assert len(late) < 4
    for result in [*resumed, *alone, *pair, *shrunk]:
        assert_matches_reference(result, data)


def test_a_snapshot_resumes_only_its_own_configuration_and_format() -> None:
    config = dataclasses.replace(TINY, max_epochs=8, patience=8)
    data = synthetic_in(torch.float32)
    snapshot = saved_and_read(snapshots_by_epoch([config], data)[2][0])
    assert snapshot.epoch == 2 and snapshot.optimizer_steps == 2 and snapshot.device == "cpu"
    with pytest.raises(SnapshotError, match=r"another configuration \(lr, seed\)"):
        train_trials([dataclasses.replace(config, lr=1e-3, seed=3)], data, resume=[snapshot])
    with pytest.raises(SnapshotError, match="another configuration"):
        train_trials([dataclasses.replace(config, hidden=(16, 9))], data, resume=[snapshot])
    payload = snapshot.payload()
    with pytest.raises(SnapshotError, match=f"format 0 and this version reads {SNAPSHOT_FORMAT}"):
        TrialSnapshot.from_payload({**payload, "format": 0})
    with pytest.raises(SnapshotError, match="lacks part"):
        TrialSnapshot.from_payload({k: v for k, v in payload.items() if k != "moments"})
    with pytest.raises(SnapshotError, match="not a trial checkpoint"):
        TrialSnapshot.from_payload([1, 2])
    shrunk = dataclasses.replace(snapshot, weights=[w[:, :3] for w in snapshot.weights])
    with pytest.raises(SnapshotError, match="shapes"):
        train_trials([config], data, resume=[shrunk])
    other = saved_and_read(snapshots_by_epoch([config], data)[3][0])
    with pytest.raises(SnapshotError, match="one epoch"):
        train_trials([config, config], data, resume=[snapshot, other])
