"""Trials resumed from a snapshot of their training (`model.trial_state`): each ends as it
would have without the interruption — in float64 the same best and last epochs exactly,
in float32 within rounding — whatever stack it resumes in."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest
import torch
from optuna.artifacts import FileSystemArtifactStore
from optuna.trial import FrozenTrial, TrialState

from model.data import DeviceData, Mnist
from model.kfold import split_folds, steps_per_epoch, train_trials
from model.trial_state import SNAPSHOT_FORMAT, SnapshotError, TrialSnapshot
from study.checkpoints import CHECKPOINT_ATTR
from study.database import sqlite_file
from study.errors import StorageError, StudyError
from tests.conftest import synthetic_data
from tests.rounding import loss_tolerance, same_best_epoch
from tests.test_kfold import (
    DTYPES,
    FEATURES,
    TINY,
    assert_matches_reference,
    synthetic_in,
    training_dtype,
)
from tests.test_workers import (
    HEARTBEAT,
    WAIT_S,
    _no_strays,  # noqa: F401  (kills what a test started, pass or fail)
    assert_clean_logs,
    mnist_study,
    trials,
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
        checkpoint_due=lambda since_last: True,
        on_checkpoint=lambda snapshots: taken.update(
            {next(iter(snapshots.values())).epoch: snapshots}
        ),
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
    with pytest.raises(ValueError, match="one epoch"):
        train_trials([config, config], data, resume=[snapshot, other])


# Written by the trainer before the fused first layer (commit 3430d55), whose stacks were
# padded to their widest trial and cut each snapshot to the trial's own widths: two trials
# of different widths, optimizers and activations after epoch 3, float32, on the CPU.
PADDED_LAYOUT_SNAPSHOTS = Path(__file__).with_name("padded-layout-snapshots.pt")
PADDED_LAYOUT_TRIALS = [
    dataclasses.replace(TINY, hidden=(4, 3), k=2, dropout=0.3, max_epochs=20, patience=3, seed=5),
    dataclasses.replace(
        TINY, hidden=(3, 2), k=2, activation="silu", optimizer="adamax", lr=1e-2,
        max_epochs=20, patience=3, seed=6,
    ),
]  # fmt: skip


def test_checkpoints_of_the_padded_layout_resume_as_the_trials_would_have_gone_on() -> None:
    """A checkpoint from before the fused first layer resumes in today's stack: each
    trial ends as its folds trained alone by the reference would, and today's trainer,
    run from the start, stands where the old one stood at the checkpoint's epoch."""
    data = synthetic_data(240, learnable=False)
    payloads = torch.load(PADDED_LAYOUT_SNAPSHOTS, weights_only=True)
    old = [TrialSnapshot.from_payload(p) for p in payloads]
    assert [s.epoch for s in old] == [3, 3]
    for together in ([0, 1], [1]):  # the stack it stopped in, and a stack of its own
        resumed = train_trials(
            [PADDED_LAYOUT_TRIALS[i] for i in together], data, resume=[old[i] for i in together]
        )
        for result in resumed:
            assert_matches_reference(result, data)
    ours = snapshots_by_epoch(PADDED_LAYOUT_TRIALS, data)[3]
    for t, snapshot in enumerate(old):
        # Three float32 epochs of Adam apart, in another order of sums: about 1e-7.
        for a, b in zip(ours[t].weights, snapshot.weights, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# --- real processes: a trial cut short by SIGKILL, Ctrl-C or --timeout, then resumed ----

# The report's space on 1,000 images at full batch, trials of 80 epochs with early
# stopping (patience 20): a few seconds each, long enough to be cut mid-trial after a
# checkpoint. Dropout draws from each trial's random stream, which a resume must continue.
LONG_TRIALS = """
[study]
summary = "test: trials of a few seconds, to be cut and resumed"
n_trials = 1
sampler = "random"
pruner = "none"

[train]
subset = 1000
batch_size = "full"
max_epochs = 80
patience = 20
k = 2

[parameters.n_layers]
value = 2

[parameters.units]
distribution = "q_log_uniform_values"
q = 1
min = 32
max = 64

[parameters.activation]
values = ["relu", "leaky_relu", "hardswish"]

[parameters.optimizer]
values = ["adam", "adamax"]

[parameters.dropout]
distribution = "uniform"
min = 0.3
max = 0.5

[parameters.lr]
distribution = "log_uniform_values"
min = 1e-3
max = 1e-2

[parameters.weight_decay]
distribution = "log_uniform_values"
min = 1e-5
max = 1e-3
"""
MAX_EPOCHS, PATIENCE = 80, 20
EVERY = "0.3"  # seconds between checkpoints: several per trial
CUT_AT_EPOCH = 5  # where a trial is stopped by a signal, well before it can end (PATIENCE)


@dataclasses.dataclass(frozen=True)
class Reference:
    """Uninterrupted runs of the studies the tests cut: one trial alone, three stacked."""

    db: str
    space: Path
    artifacts: Path
    alone: FrozenTrial
    stacked: list[FrozenTrial]
    startup_s: float  # from `run` starting its worker to that worker's first trial


def run_args(space: Path, study: str, *extra: str) -> tuple[str, ...]:
    return ("run", "--space", str(space), "--study", study, "--seed", "3", "--workers", "1",
            "--heartbeat", HEARTBEAT, "--no-retrain", *extra)  # fmt: skip


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, mnist: Mnist) -> Reference:
    where = tmp_path_factory.mktemp("reference")
    space = where / "long.toml"
    space.write_text(LONG_TRIALS)
    db = f"sqlite:///{where / 'optuna.db'}"
    alone = mnist_study(*run_args(space, "alone", "--checkpoint-every", "0"), db=db,
                        log=where / "alone.log")  # fmt: skip
    spawned = time.time() + WAIT_S
    while alone.poll() is None and "worker(s):" not in (where / "alone.log").read_text():
        time.sleep(0.02)
    spawned = min(spawned, time.time())
    assert alone.wait(timeout=WAIT_S) == 0, (where / "alone.log").read_text()
    stacked = mnist_study(*run_args(space, "stacked", "--n-trials", "3", "--trials-per-worker",
                                    "3", "--checkpoint-every", "0"),
                          db=db, log=where / "stacked.log")  # fmt: skip
    assert stacked.wait(timeout=WAIT_S) == 0, (where / "stacked.log").read_text()
    (first,) = trials(db, "alone")
    return Reference(
        db,
        space,
        where / "optuna.db.artifacts",
        first,
        trials(db, "stacked"),
        first.datetime_start.timestamp() - spawned,
    )


def checkpointed(db: str, study: str, proc: subprocess.Popen, count: int) -> list[FrozenTrial]:
    """Waits until `count` running trials each hold a checkpoint; those trials."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before its trials were checkpointed"
        with contextlib.suppress(StorageError, StudyError):
            held = [
                t
                for t in trials(db, study)
                if t.state == TrialState.RUNNING and t.system_attrs.get(CHECKPOINT_ATTR)
            ]
            if len(held) >= count:
                return held
        time.sleep(0.05)
    raise AssertionError(f"{count} checkpointed trials were not seen")


def assert_resumed_as_uninterrupted(
    db: str, study: str, reference: Reference, uninterrupted: list[FrozenTrial]
) -> None:
    """Each reference trial's retry resumed from a checkpoint of the trial it retries and
    ended as the uninterrupted run did: the same best epoch (or one the reference found
    within float32's rounding of it), early stopping `PATIENCE` epochs later, the same
    figures and intermediate values within rounding; and no checkpoint is left."""
    done = trials(db, study)
    finished = [t for t in done if t.state == TrialState.COMPLETE]
    assert len(finished) == len(uninterrupted), [t.state for t in done]
    for before, trial in zip(uninterrupted, finished, strict=True):
        assert trial.params == before.params
        resumed = trial.user_attrs["resumed_from"]
        failed = done[resumed["trial"]]
        assert failed.state == TrialState.FAIL and failed.params == trial.params
        assert trial.user_attrs["epochs_saved"] == resumed["epoch"]
        assert 1 <= resumed["epoch"] < max(trial.user_attrs["epochs_run"])
        curves = json.loads((reference.artifacts / curves_id(before)).read_text())
        for j, (best, reference_best) in enumerate(
            zip(trial.user_attrs["best_epochs"], before.user_attrs["best_epochs"], strict=True)
        ):
            losses = curves["curves"]["val_loss"][j]
            assert same_best_epoch(best, reference_best, losses, torch.float32, 1), f"fold {j}"
            assert trial.user_attrs["epochs_run"][j] == min(best + PATIENCE, MAX_EPOCHS)
        steps = max(trial.user_attrs["epochs_run"])
        rounding = loss_tolerance(torch.float32, steps)
        # An accuracy may differ by a validation row (of 500) whose top logits tie.
        assert trial.value == pytest.approx(before.value, rel=rounding, abs=1 / 500)
        assert trial.params == before.params
        assert sorted(trial.intermediate_values) == sorted(before.intermediate_values)
    assert not list(Path(f"{sqlite_file(db)}.artifacts").glob("checkpoint-*"))


def curves_id(trial: FrozenTrial) -> str:
    """The artifact holding `trial`'s curves.json."""
    for key, meta in trial.system_attrs.items():
        if key.startswith("artifacts:") and json.loads(meta)["filename"] == "curves.json":
            return json.loads(meta)["artifact_id"]
    raise AssertionError(f"trial {trial.number} has no curves")


def killed(proc: subprocess.Popen, log: Path) -> None:
    """SIGKILL `run` and its workers at once, as a machine that is lost."""
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def reached_epoch(db: str, study: str, proc: subprocess.Popen, epoch: int) -> None:
    """Waits until a running trial has reported `epoch` epochs (none checkpointed)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before a trial reached the epoch"
        with contextlib.suppress(StorageError, StudyError):
            if any(
                t.state == TrialState.RUNNING and len(t.intermediate_values) >= epoch
                for t in trials(db, study)
            ):
                return
        time.sleep(0.02)
    raise AssertionError(f"no trial was seen at epoch {epoch}")


def interrupted(proc: subprocess.Popen, log: Path) -> None:
    """Ctrl-C on `run`: it exits 130, its worker having checkpointed the trial at the end
    of its epoch and queued it again."""
    os.kill(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=60) == 130, log.read_text()
    assert "trial 0 was checkpointed on SIGINT and is queued again" in log.read_text()


def cut_then_rerun(
    tmp_path: Path,
    args: tuple[str, ...],
    study: str,
    checkpointed_trials: int,
    cut: Callable[[subprocess.Popen, Path], None],
) -> tuple[str, Path]:
    """`run` cut by `cut` once its trials each hold a checkpoint (with no checkpoint
    asked for, once a trial is a few epochs in), then the same command run to the end
    (exit 0); the database and the second run's log."""
    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    first = tmp_path / "run1.log"
    running = mnist_study(*args, db=db, log=first, new_session=True)
    if checkpointed_trials:
        checkpointed(db, study, running, count=checkpointed_trials)
    else:
        reached_epoch(db, study, running, CUT_AT_EPOCH)
    cut(running, first)
    second = tmp_path / "run2.log"
    rerun = mnist_study(*args, db=db, log=second)
    assert rerun.wait(timeout=WAIT_S) == 0, second.read_text()
    return db, second


def test_a_killed_run_s_trial_resumes_from_its_checkpoint_and_ends_as_without(
    reference: Reference, tmp_path: Path
) -> None:
    args = run_args(reference.space, "alone", "--checkpoint-every", EVERY)
    db, log = cut_then_rerun(tmp_path, args, "alone", 1, killed)
    assert_clean_logs(log)
    assert_resumed_as_uninterrupted(db, "alone", reference, [reference.alone])


def test_a_stack_of_three_killed_resumes_each_trial_from_its_checkpoint(
    reference: Reference, tmp_path: Path
) -> None:
    args = run_args(reference.space, "stacked", "--n-trials", "3", "--trials-per-worker", "3",
                    "--checkpoint-every", EVERY)  # fmt: skip
    db, log = cut_then_rerun(tmp_path, args, "stacked", 3, killed)
    assert_clean_logs(log)
    assert_resumed_as_uninterrupted(db, "stacked", reference, reference.stacked)


def test_ctrl_c_then_the_same_command_resumes_the_trial_from_the_epoch_it_reached(
    reference: Reference, tmp_path: Path
) -> None:
    """No periodic checkpoint falls inside the trial (the default, 60 s): the one taken
    at the end of the epoch the signal came in is what it resumes from."""
    args = run_args(reference.space, "alone")
    db, log = cut_then_rerun(tmp_path, args, "alone", 0, interrupted)
    text = log.read_text()
    resumed_at = int(re.search(r"trial 1 resumes trial 0 from its checkpoint at epoch (\d+)",
                               text).group(1))  # fmt: skip
    assert resumed_at >= CUT_AT_EPOCH
    assert_resumed_as_uninterrupted(db, "alone", reference, [reference.alone])


def test_a_worker_s_sigterm_checkpoints_at_the_epoch_and_a_second_signal_stops_at_once(
    reference: Reference, tmp_path: Path
) -> None:
    """A worker of its own (a SLURM task's) takes SIGTERM as `run` takes Ctrl-C: the
    trial is checkpointed at its epoch's end and queued again, the worker exits 130, and
    the next worker resumes it. Two signals at once (SIGTERM, then SIGINT) stop it at
    once: the trial is queued again with no checkpoint of its own, and its retry resumes
    from the first checkpoint again."""
    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    # The study, made by a run that stops at once (its budget is met before it starts).
    made = mnist_study(*run_args(reference.space, "alone", "--timeout", "0.001"), db=db,
                       log=tmp_path / "made.log")  # fmt: skip
    assert made.wait(timeout=WAIT_S) == 0, (tmp_path / "made.log").read_text()
    saved: dict | None = None  # the checkpoint the first signal took
    for attempt, signals in enumerate([(signal.SIGTERM,), (signal.SIGTERM, signal.SIGINT)]):
        log = tmp_path / f"worker{attempt}.log"
        proc = mnist_study("worker", "--study", "alone", "--heartbeat", HEARTBEAT, db=db, log=log)
        # A retry carries its predecessor's values up to the checkpoint: wait for new ones.
        reached_epoch(db, "alone", proc, CUT_AT_EPOCH + (0 if saved is None else saved["epoch"]))
        # Stopped while they are sent, so both arrive before it runs another line.
        os.kill(proc.pid, signal.SIGSTOP)
        for signum in signals:
            os.kill(proc.pid, signum)
        os.kill(proc.pid, signal.SIGCONT)
        assert proc.wait(timeout=60) == 130, log.read_text()
        text = log.read_text()
        assert "mnist-study worker: interrupted" in text and "Traceback" not in text
        *_, cut, retry = trials(db, "alone")
        assert cut.state == TrialState.FAIL and retry.state == TrialState.WAITING
        if saved is None:
            assert f"trial {cut.number} was checkpointed on SIGTERM and is queued again" in text
            saved = cut.system_attrs[CHECKPOINT_ATTR]
            assert saved["epoch"] >= CUT_AT_EPOCH
        else:
            assert f"trial {cut.number} was interrupted and is queued again" in text
            # No checkpoint of its own: it holds the one it resumed from, as its retry does.
            assert cut.system_attrs[CHECKPOINT_ATTR] == saved
            assert f"resumes trial 0 from its checkpoint at epoch {saved['epoch']}" in text
        assert retry.system_attrs[CHECKPOINT_ATTR] == saved
    log = tmp_path / "last.log"
    last = mnist_study("worker", "--study", "alone", "--heartbeat", HEARTBEAT, db=db, log=log)
    assert last.wait(timeout=WAIT_S) == 0, log.read_text()
    finished = [t for t in trials(db, "alone") if t.state == TrialState.COMPLETE]
    assert len(finished) == 1 and finished[0].params == reference.alone.params


def test_a_trial_cut_by_timeout_is_checkpointed_at_the_deadline_and_resumed(
    reference: Reference, tmp_path: Path
) -> None:
    """No periodic checkpoint: the one taken at the deadline is what the trial resumes
    from. The deadline is aimed at the middle of the trial by the reference's timings; a
    machine whose pace changed meanwhile may make it miss (the trial ends first, or the
    worker starts after it), and then it is aimed again from what that run showed."""
    trial_s = float(reference.alone.user_attrs["seconds"])
    timeout = reference.startup_s + trial_s / 2
    for attempt in range(4):
        db = f"sqlite:///{tmp_path / f'optuna{attempt}.db'}"
        log = tmp_path / f"run{attempt}.log"
        args = run_args(reference.space, "alone")
        cut = mnist_study(*args, "--timeout", f"{timeout:.2f}", db=db, log=log)
        assert cut.wait(timeout=WAIT_S) == 0, log.read_text()
        text = log.read_text()
        if "trial 0 was checkpointed at the deadline and is queued again" in text:
            break
        (first,) = trials(db, "alone") or [None]
        # Ended before the deadline: aim earlier; never started: later.
        timeout += -trial_s / 3 if first is not None else trial_s / 3
    else:
        raise AssertionError(f"no deadline fell inside the trial: {text}")
    assert "stopped by --timeout" in text
    rerun = mnist_study(*args, db=db, log=tmp_path / "run2.log")
    assert rerun.wait(timeout=WAIT_S) == 0, (tmp_path / "run2.log").read_text()
    assert_resumed_as_uninterrupted(db, "alone", reference, [reference.alone])


# --- checkpoints that cannot be used ------------------------------------------------------


def damaged(kind: str, path: Path, snapshot: TrialSnapshot) -> None:
    if kind == "missing":
        path.unlink()
    elif kind == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "another version":
        torch.save({**snapshot.payload(), "format": SNAPSHOT_FORMAT + 1}, path)
    elif kind == "not ours":
        path.write_bytes(b"PK\x03\x04 some other archive")


@pytest.mark.parametrize(
    ("kind", "why"),
    [
        ("usable", None),
        ("missing", "is missing from the artifact store"),
        ("truncated", "cannot be read"),
        ("another version", f"is of format {SNAPSHOT_FORMAT + 1} and this version reads"),
        ("not ours", "cannot be read"),
        ("another configuration", r"was written for another configuration \(lr\)"),
    ],
)
def test_a_retry_resumes_its_predecessor_s_checkpoint_or_says_in_one_line_why_not(
    kind: str, why: str | None, tmp_path: Path
) -> None:
    """A retried trial takes over the checkpoint of the trial it retries, with its
    intermediate values up to there; one that is missing, damaged, of another format or
    of another configuration is dropped with one line, and the trial starts from 0."""
    from study.checkpoints import EPOCHS_SAVED, RESUMED_FROM, Checkpoints
    from study.studies import requeue

    config = dataclasses.replace(TINY, max_epochs=8, patience=8)
    snapshot = snapshots_by_epoch([config], synthetic_in(torch.float32))[3][0]
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    store = FileSystemArtifactStore(tmp_path)
    lines: list[str] = []
    checkpoints = Checkpoints(store, log=lines.append)
    first = study.ask()
    for epoch in range(1, 6):
        first.report(0.1 * epoch, epoch)
    checkpoints.save(first, snapshot)
    study.tell(first, state=TrialState.FAIL)
    requeue(study, first.number)
    retry = study.ask()
    (written,) = tmp_path.glob("checkpoint-*")
    damaged(kind, written, snapshot)
    wanted = dataclasses.replace(config, lr=1e-3) if kind == "another configuration" else config
    resumed = checkpoints.resume_point(retry, wanted, torch.device("cpu"))
    frozen = study.get_trials()[retry.number]
    if why is None:
        assert (
            resumed is not None
            and resumed.epoch == 3
            and lines == ["trial 1 resumes trial 0 from its checkpoint at epoch 3"]
        )
        assert frozen.user_attrs[RESUMED_FROM] == {
            "trial": 0,
            "epoch": 3,
            "seconds": round(snapshot.seconds, 3),
        }
        assert frozen.user_attrs[EPOCHS_SAVED] == 3
        assert frozen.intermediate_values == {1: 0.1, 2: 0.2, 3: pytest.approx(0.3)}
        checkpoints.discard(retry)  # told next: the file goes, and its name
        assert not list(tmp_path.glob("checkpoint-*"))
        assert study.get_trials()[retry.number].system_attrs[CHECKPOINT_ATTR] is None
    else:
        assert resumed is None
        assert len(lines) == 1, lines
        assert re.fullmatch(
            rf"trial 1 starts from epoch 0: the checkpoint trial 0 left at epoch 3 {why}.*",
            lines[0],
        ), lines
        assert RESUMED_FROM not in frozen.user_attrs and not frozen.intermediate_values
        assert not list(tmp_path.glob("checkpoint-*"))  # a useless file is not kept


def test_a_retry_of_a_retry_resumes_from_the_latest_checkpoint_of_the_chain(
    tmp_path: Path,
) -> None:
    """Optuna's retry copies the retried trial's attributes, and names the first trial
    of the chain as `failed_trial`: the retry of a retry must still resume from its own
    predecessor's latest checkpoint, and the chain holds one file at a time."""
    from study.checkpoints import EPOCHS_SAVED, RESUMED_FROM, Checkpoints
    from study.studies import requeue

    config = dataclasses.replace(TINY, max_epochs=8, patience=8)
    taken = snapshots_by_epoch([config], synthetic_in(torch.float32))
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    lines: list[str] = []
    checkpoints = Checkpoints(FileSystemArtifactStore(tmp_path), log=lines.append)
    cpu = torch.device("cpu")

    first = study.ask()
    checkpoints.save(first, taken[2][0])
    study.tell(first, state=TrialState.FAIL)
    requeue(study, first.number)
    second = study.ask()
    assert checkpoints.resume_point(second, config, cpu).epoch == 2  # type: ignore[union-attr]
    checkpoints.save(second, taken[5][0])
    assert [p.name for p in tmp_path.glob("checkpoint-*")] == [
        f"checkpoint-{second._trial_id}-epoch-5"
    ]
    study.tell(second, state=TrialState.FAIL)
    requeue(study, second.number)
    third = study.ask()
    assert study.get_trials()[third.number].system_attrs["failed_trial"] == 0  # the chain's first
    resumed = checkpoints.resume_point(third, config, cpu)
    assert resumed is not None and resumed.epoch == 5
    assert study.get_trials()[third.number].user_attrs[RESUMED_FROM]["trial"] == 1
    assert lines[-1] == "trial 2 resumes trial 1 from its checkpoint at epoch 5"

    # A retry whose checkpoint is gone starts afresh, and says it resumed nothing, though
    # it was queued with its predecessor's `resumed_from`.
    study.tell(third, state=TrialState.FAIL)
    requeue(study, third.number)
    for path in tmp_path.glob("checkpoint-*"):
        path.unlink()
    fourth = study.ask()
    assert checkpoints.resume_point(fourth, config, cpu) is None
    attrs = study.get_trials()[fourth.number].user_attrs
    assert (attrs[RESUMED_FROM], attrs[EPOCHS_SAVED]) == (None, 0)
    assert (
        "trial 3 starts from epoch 0: the checkpoint trial 2 left at epoch 5 is missing"
        in (lines[-1])
    )


@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "mini-batch"])
def test_trials_resume_under_the_graph_path_s_optimizer_as_well(
    batch_size: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under `--cuda-graphs` a stack steps with `StackedAdam`, whose moments live in one
    stacked tensor per parameter: its snapshots resume too (here on the CPU, where the
    trainer is made to use it), and one taken under torch's optimizers resumes under it."""
    from model import kfold, optimizers

    def stacked(model, configs, *, total_steps: int, capturable: bool = False):  # type: ignore[no-untyped-def]
        return optimizers.StackedAdam(model, configs, total_steps)

    configs = [
        dataclasses.replace(c, batch_size=batch_size, max_epochs=20, patience=3)
        for c in FEATURES
        if c.optimizer in ("adam", "adamax")
    ]
    data = synthetic_in(torch.float64, learnable=False)
    with training_dtype(torch.float64):
        eager = snapshots_by_epoch(configs, data)  # torch's fused Adam and Adamax
        monkeypatch.setattr(kfold, "make_optimizer", stacked)
        graph_path = snapshots_by_epoch(configs, data)
        from_graph_path = train_trials(
            configs, data, resume=[saved_and_read(graph_path[3][i]) for i in range(2)]
        )
        from_eager = train_trials(
            configs, data, resume=[saved_and_read(eager[3][i]) for i in range(2)]
        )
    assert len(configs) == 2
    for result in [*from_graph_path, *from_eager]:
        assert_matches_reference(result, data)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("batch_size", [None, 40], ids=["full-batch", "mini-batch"])
def test_cuda_trials_resumed_from_snapshots_end_as_the_uninterrupted_run(
    batch_size: int | None,
) -> None:
    """On a GPU (eager epochs; the random streams are CUDA generators, whose state a
    snapshot carries too), in float64: the same best and last epochs, the same losses
    within rounding. Under CUDA graphs a resumed trial with dropout draws other masks
    after its resume point (its two warm-up epochs are eager, where replays would have
    run), as graph replays already do against eager epochs."""
    configs = [
        dataclasses.replace(c, batch_size=batch_size, max_epochs=20, patience=3) for c in FEATURES
    ]
    cpu = synthetic_in(torch.float64, learnable=False)
    data = DeviceData(x=cpu.x.cuda(), y=cpu.y.cuda())
    with training_dtype(torch.float64):
        taken = snapshots_by_epoch(configs, data)
        whole = train_trials(configs, data)
        resumed = train_trials(
            configs, data, resume=[saved_and_read(taken[3][i]) for i in range(4)]
        )
    for a, b in zip(whole, resumed, strict=True):
        assert (a.best_epochs, a.epochs_run) == (b.best_epochs, b.epochs_run)
        n_train = split_folds(len(data), a.config)[0].shape[1]
        steps = max(a.epochs_run) * steps_per_epoch(n_train, batch_size or n_train)
        assert b.fold_losses == pytest.approx(
            a.fold_losses, rel=loss_tolerance(torch.float64, steps)
        )
