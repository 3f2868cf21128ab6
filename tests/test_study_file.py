"""Studies as files: the shipped presets draw what the code drew before they were files,
a user's file means what W&B's sweep vocabulary says, and a bad file is one line."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st

from model.data import default_root
from model.kfold import train_kfold
from study.database import open_storage
from study.presets import PRESETS
from study.sampler import draw_params
from study.space import GaussianPrior
from study.studies import create_or_resume, make_sampler
from study.study_file import StudyFileError, differences, parse_study
from tests.conftest import synthetic_data
from tests.rounding import assert_same_draws, stable_sort_ties
from tests.test_sampler import N_SE

optuna.logging.set_verbosity(optuna.logging.WARNING)

# 30 draws (seed 7) per preset and its settings, written by the code that built the
# presets in Python, just before they became files; on another CPU than the one that wrote
# them, drawn with the same tie order and compared within rounding (tests/rounding.py, 5
# and 6). The TPE presets' draws were written again under that tie order, with the files:
# `wide-smoke`'s from its 24th draw on are those.
BEFORE = json.loads((Path(__file__).parent / "preset_draws.json").read_text())


def preset_draws(name: str, n: int = 30, seed: int = 7) -> list[dict[str, Any]]:
    """What the shipped preset's own sampler draws first, in a tie order every CPU shares."""
    preset = PRESETS[name]
    sampler = make_sampler(preset.sampler, preset.space, seed, preset.n_prior_trials)
    with stable_sort_ties():
        return draw_params(preset.space, preset.defaults, n, seed, sampler=sampler)


@pytest.mark.parametrize("name", sorted(BEFORE))
def test_each_shipped_preset_draws_and_sets_exactly_what_the_code_did(name: str) -> None:
    preset = PRESETS[name]
    before = BEFORE[name]
    assert_same_draws(preset_draws(name), before["draws"])
    settings = before["settings"]
    assert preset.summary == settings["summary"]
    assert (preset.n_trials, preset.pruner, preset.sampler, preset.n_prior_trials,
            preset.ensemble) == (settings["n_trials"], settings["pruner"], settings["sampler"],
                                 settings["n_prior_trials"], settings["ensemble"])  # fmt: skip
    defaults = {**preset.defaults.params(), "batch_size": preset.defaults.batch_size,
                "subset": preset.defaults.subset, "max_epochs": preset.defaults.max_epochs,
                "patience": preset.defaults.patience, "k": preset.defaults.k,
                "fold_seed": preset.defaults.fold_seed, "seed": preset.defaults.seed,
                "warmup": preset.defaults.warmup}  # fmt: skip
    assert defaults == settings["defaults"]
    assert json.loads(json.dumps(preset.space.describe())) == settings["space"]
    assert preset.name == name and preset.text.startswith("#")


def test_a_stored_draw_compares_within_rounding_and_not_past_it() -> None:
    stored = [{"n_units_l0": 183, "activation": "relu", "dropout": 0.4}]
    assert_same_draws([{"n_units_l0": 183, "activation": "relu", "dropout": 0.4 + 1e-16}], stored)
    for wrong in (
        {"n_units_l0": 183, "activation": "relu", "dropout": 0.4 * (1 + 1e-10)},
        {"n_units_l0": 184, "activation": "relu", "dropout": 0.4},
        {"n_units_l0": 183.0, "activation": "relu", "dropout": 0.4},
        {"n_units_l0": 183, "activation": "relu6", "dropout": 0.4},
        {"activation": "relu", "n_units_l0": 183, "dropout": 0.4},
    ):
        with pytest.raises(AssertionError, match="draw 0"):
            assert_same_draws([wrong], stored)
    with pytest.raises(AssertionError, match="1 draws against 2 stored"):
        assert_same_draws(stored, stored * 2)


# --- what a file means ----------------------------------------------------------------

SEED_TEXT = PRESETS["seed"].text


def test_a_study_file_s_comments_and_layout_are_no_difference_its_settings_are() -> None:
    reflowed = "# another comment\n" + SEED_TEXT.replace("min = 0.3", "min    =    0.3")
    assert differences(SEED_TEXT, reflowed) == []
    assert differences(SEED_TEXT, SEED_TEXT.replace("max = 0.5", "max = 0.45")) == [
        "parameters.dropout.max: 0.5 → 0.45"
    ]


def test_a_constant_is_not_searched_and_sets_the_training_value() -> None:
    text = SEED_TEXT.replace('values = ["adam", "adamax"]', 'value = "adamax"')
    preset = parse_study(text, "fixed")
    assert "optimizer" not in preset.space.distributions()
    assert preset.defaults.optimizer == "adamax"
    for params in draw_params(preset.space, preset.defaults, 20, 3):
        assert "optimizer" not in params
        assert preset.space.configure(params, preset.defaults).optimizer == "adamax"


def test_a_third_layer_on_the_compression_rule_gets_the_report_s_formula() -> None:
    preset = parse_study(SEED_TEXT.replace("value = 2", "value = 3"), "three")
    priors = preset.space.priors()
    r = 10 / 784
    for n, name in enumerate(("n_units_l0", "n_units_l1", "n_units_l2"), start=1):
        assert priors[name].mu == pytest.approx(784 * r ** (n / 4), rel=1e-12)
        assert priors[name].sigma == pytest.approx(784 * r ** (n / 3), rel=1e-12)
    # q_normal with min and max: redrawn until inside them, so no draw falls outside.
    narrow = parse_study(SEED_TEXT.replace("min = 1\nmax = 784", "min = 40\nmax = 200"), "n")
    draws = draw_params(narrow.space, narrow.defaults, 200, 5)
    assert {40 <= d[f"n_units_l{i}"] <= 200 for d in draws for i in (0, 1)} == {True}
    # Layer 2's prior, N(42.80, 10.00), has no mass to speak of in [150, 200].
    with pytest.raises(StudyFileError, match=r"n_units_l1's prior N\(42.80, 10.00\) puts"):
        parse_study(SEED_TEXT.replace("min = 1\nmax = 784", "min = 150\nmax = 200"), "n")


def test_a_conditional_parameter_must_say_when_it_is_asked_as_the_space_implies() -> None:
    wide = PRESETS["wide"].text
    unsaid = wide.replace('when = { parameter = "optimizer", values = ["sgd"] }\n', "")
    with pytest.raises(StudyFileError, match=r"parameters.sgd_lr: asked only when optimizer "
                       r"= sgd: say so with when = \{ parameter = \"optimizer\", values = "
                       r"\[\"sgd\"\] \}"):  # fmt: skip
        parse_study(unsaid, "wide")
    wrong = wide.replace('values = ["sgd"] }', 'values = ["adam"] }')
    with pytest.raises(StudyFileError, match=r"parameters\.sgd_lr\.when: this space asks for "
                       r"it when optimizer = sgd"):  # fmt: skip
        parse_study(wrong, "wide")


def test_probabilities_are_refused_rather_than_ignored() -> None:
    text = SEED_TEXT.replace('values = ["adam", "adamax"]',
                             'values = ["adam", "adamax"]\nprobabilities = [0.9, 0.1]')  # fmt: skip
    with pytest.raises(StudyFileError, match="probabilities: not supported"):
        parse_study(text, "p")


# --- each layer's own prior, W&B's way (issue 30) ---------------------------------------

# Issue 30's file: each parameter named as the study names it, a Gaussian prior of the
# user's own on the first layer, a flat range on the second; no [study] table, as a W&B
# sweep's parameters alone have none.
ISSUE_FILE = """
[parameters.n_units_l0]
distribution = "q_normal"
mu = 256
sigma = 64
q = 1
min = 1
max = 784

[parameters.n_units_l1]
distribution = "int_uniform"
min = 16
max = 64
"""


def test_issue_30_s_file_draws_its_own_gaussian_on_layer_one_and_layer_two_flat() -> None:
    preset = parse_study(ISSUE_FILE, "my")
    assert preset.n_trials == 20  # the budget a file without one gets
    draws = draw_params(preset.space, preset.defaults, 1000, 0)
    assert {tuple(d) for d in draws} == {("n_units_l0", "n_units_l1")}
    first = np.array([d["n_units_l0"] for d in draws])
    # N(256, 64) rounded, redrawn into [1, 784]: the truncation moves it by under 0.01.
    assert first.mean() == pytest.approx(256, abs=N_SE * 64 / math.sqrt(1000))
    assert first.std(ddof=1) == pytest.approx(64, abs=N_SE * 64 / math.sqrt(2 * 1000))
    assert first.min() >= 1 and first.max() <= 784
    # Flat over 16-64: every one of its 49 widths, and nothing past them.
    second = [d["n_units_l1"] for d in draws]
    assert set(second) == set(range(16, 65))
    sd = math.sqrt((49**2 - 1) / 12)
    assert np.mean(second) == pytest.approx(40, abs=N_SE * sd / math.sqrt(1000))
    # What `space` prints beside them; each configuration is the drawn network.
    moments = preset.space.prior_moments()
    assert moments["n_units_l0"].kind == "N(256, 64) rounded, in [1, 784]"
    assert (moments["n_units_l0"].mean, moments["n_units_l0"].sd) == pytest.approx(
        (256.0088, 63.9830), abs=1e-4
    )
    assert moments["n_units_l1"].kind == "uniform integers [16, 64]"
    config = preset.space.configure(draws[0], preset.defaults)
    assert config.hidden == (draws[0]["n_units_l0"], draws[0]["n_units_l1"])
    # No [parameters.n_layers]: as deep as the layers the file gives.
    assert preset.space.n_layers == 2 and preset.space.priors() == {
        "n_units_l0": GaussianPrior(256.0, 64.0)
    }


def test_the_guide_s_example_of_each_layer_s_own_prior_is_issue_30_s_file() -> None:
    guide = (Path(__file__).parents[1] / "docs" / "search-space.md").read_text()
    block = guide.split("```toml\n# each-layer.toml\n", 1)[1].split("```", 1)[0]
    assert parse_study(block, "each-layer").space == parse_study(ISSUE_FILE, "my").space


def test_the_report_s_histograms_name_each_layer_s_own_distribution() -> None:
    from study.reporting import prior_sections

    text = ISSUE_FILE + (
        '[parameters.n_layers]\nvalue = 3\n[parameters.n_units_l2]\ndistribution = "q_normal"'
        "\nmu = 64\nsigma = 16\nq = 8\nmin = 8\nmax = 128\n"
    )
    preset = parse_study(text, "my")
    draws = draw_params(preset.space, preset.defaults, 200, 0)
    sections = prior_sections(preset.space, lambda name, _: [d[name] for d in draws])
    assert [s.title for s in sections] == [
        f"Sampled n_units_l{i} against its prior" for i in range(3)
    ]
    curves = [s.figure.data[1] for s in sections]  # type: ignore[union-attr]
    assert [c.name for c in curves] == [
        "the file's q_normal: N(256, 64) rounded, in [1, 784]",
        "the file's int_uniform: uniform integers [16, 64]",
        "the file's q_normal: N(64, 16) rounded to multiples of 8, in [8, 128]",
    ]
    # Each curve is the counts its prior expects per bin: 200 draws times the bin's share.
    for section, curve in zip(sections, curves, strict=True):
        width = section.figure.data[0].xbins.size  # type: ignore[union-attr]
        expected = dict(zip(curve.x, curve.y, strict=True))
        if curve.name.endswith("[1, 784]"):
            assert expected[256] == pytest.approx(200 * width / (64 * math.sqrt(2 * math.pi)),
                                                  rel=1e-3)  # fmt: skip
        elif "int_uniform" in curve.name:
            flat = [expected[n] for n in range(16, 65)]
            assert flat == pytest.approx([200 * width / 49] * 49)
            assert expected.get(15, 0.0) == expected.get(65, 0.0) == 0.0
        else:  # multiples of 8: each one's share spread over the 8 widths of its cell
            assert expected[64] == expected[61] == expected[67] > expected[80] > 0


def test_a_layer_of_its_own_in_a_searched_depth_is_asked_only_below_the_depth() -> None:
    text = (
        '[study]\nn_trials = 2\n[parameters.n_layers]\ndistribution = "int_uniform"\n'
        'min = 1\nmax = 3\n[parameters.n_units_l0]\ndistribution = "q_log_normal"\nmu = 5.0\n'
        "sigma = 0.5\n[parameters.n_units_l1]\nvalue = 64\n"
        'when = { parameter = "n_layers", values = [2, 3] }\n'
        '[parameters.n_units_l2]\ndistribution = "q_uniform"\nmin = 8\nmax = 32\nq = 8\n'
        'when = { parameter = "n_layers", values = [3] }\n'
    )
    preset = parse_study(text, "deep")
    draws = draw_params(preset.space, preset.defaults, 200, 1)
    assert {d["n_layers"] for d in draws} == {1, 2, 3}
    for d in draws:
        # A fixed width is never asked for; every trial deep enough has it.
        assert set(d) == {"n_layers", "n_units_l0"} | ({"n_units_l2"} if d["n_layers"] == 3
                                                       else set())  # fmt: skip
        hidden = preset.space.configure(d, preset.defaults).hidden
        assert hidden == (d["n_units_l0"], 64, d.get("n_units_l2", 0))[: d["n_layers"]]
        assert d.get("n_units_l2", 8) in (8, 16, 24, 32)
    assert preset.space.widest() == (8192, 64, 32)  # a log-normal without min, max: [1, 8192]


def test_today_s_units_and_ranges_keep_today_s_space_beside_the_new_tables() -> None:
    """The forms files had before layers had tables of their own build the fields they
    built, with nothing of their own: their studies, stored as text, load as they were."""
    for text in (*(p.text for p in PRESETS.values()), USER_FILE):
        space = parse_study(text, "before").space
        assert (space.own, space.fixed_units) == ((), ())
    # Only a distribution that the field does not mean is one of its own.
    lr = SEED_TEXT.replace('distribution = "log_uniform_values"\nmin = 1e-4',
                           'distribution = "uniform"\nmin = 1e-4')  # fmt: skip
    space = parse_study(lr, "lr").space
    assert [name for name, _ in space.own] == ["lr"]
    assert space.distributions()["lr"] == optuna.distributions.FloatDistribution(1e-4, 1e-2)


# --- random files: each trains one tiny trial or is refused in one line ----------------


def to_toml(data: dict[str, Any]) -> str:
    """The few TOML shapes a study file has: tables of scalars, lists and inline tables."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, float) and not math.isfinite(v):
            return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(k)} = {value(x)}" for k, x in v.items()) + " }"
        return repr(v)

    lines: list[str] = []

    def table(name: str, body: dict[str, Any]) -> None:
        lines.append(f"[{name}]")
        nested = {k: v for k, v in body.items() if isinstance(v, dict) and name == "parameters"}
        for key, v in body.items():
            if key not in nested:
                lines.append(f"{json.dumps(key)} = {value(v)}")
        for key, v in nested.items():
            table(f"parameters.{json.dumps(key)}", v)

    for name, body in data.items():
        if isinstance(body, dict):
            table(json.dumps(name) if name != "parameters" else name, body)
        else:
            lines.insert(0, f"{json.dumps(name)} = {value(body)}")
    return "\n".join(lines) + "\n"


BASE = {
    "study": {"n_trials": 3, "sampler": "random", "pruner": "none"},
    "train": {"subset": 40, "batch_size": 10, "max_epochs": 2, "patience": 2, "k": 2},
    "parameters": {
        "n_layers": {"distribution": "int_uniform", "min": 1, "max": 3},
        "units": {"distribution": "q_normal", "rule": "compression", "q": 1, "min": 1,
                  "max": 784},
        "activation": {"values": ["relu", "silu"]},
        "optimizer": {"values": ["adam", "sgd"]},
        "dropout": {"distribution": "uniform", "min": 0.0, "max": 0.5},
        "lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2,
               "when": {"parameter": "optimizer", "values": ["adam"]}},
        "sgd_lr": {"distribution": "log_uniform_values", "min": 1e-3, "max": 0.3,
                   "when": {"parameter": "optimizer", "values": ["sgd"]}},
        "weight_decay": {"value": 0.0},
        "use_max_norm": {"values": [False, True]},
        "max_norm": {"distribution": "uniform", "min": 1.0, "max": 3.0,
                     "when": {"parameter": "use_max_norm", "values": [True]}},
        "batch_size": {"values": [10, 20]},
    },
}  # fmt: skip
LEAF = (
    st.integers(-3, 5000) | st.floats(allow_nan=True) | st.floats(-1, 2) | st.booleans()
    | st.sampled_from(["relu", "adam", "sgd", "uniform", "q_normal", "compression", "all",
                       "full", "int_uniform", "log_uniform_values", "q_uniform", "normal",
                       "log_normal", "q_log_normal", "q_log_uniform_values", "x"])
    | st.lists(st.integers(0, 600) | st.sampled_from(["relu", "adam"]), max_size=3)
)  # fmt: skip
KEYS = sorted({"value", "values", "distribution", "min", "max", "q", "mu", "sigma", "r",
               "rule", "when", "probabilities", "n_trials", "k", "subset", "max_epochs",
               "batch_size", "dropout", "lr", "sampler", "pruner", "nonsense"})  # fmt: skip
# Each layer's own table, as a W&B user writes one (issue 30), and the continuous
# parameters' other distributions: what a random file may put in place of the base's.
LAYER_TABLES = [
    {"distribution": "q_normal", "mu": 256, "sigma": 64, "q": 1, "min": 1, "max": 784},
    {"distribution": "int_uniform", "min": 16, "max": 64},
    {"distribution": "q_uniform", "min": 8, "max": 64, "q": 8},
    {"distribution": "q_log_uniform_values", "min": 16, "max": 256, "q": 1},
    {"distribution": "q_log_normal", "mu": 4.0, "sigma": 0.5, "q": 1},
    {"value": 32},
]
RANGE_TABLES = {
    "dropout": [
        {"distribution": "q_uniform", "min": 0.0, "max": 0.5, "q": 0.05},
        {"distribution": "normal", "mu": 0.3, "sigma": 0.1, "min": 0.0, "max": 0.5},
        {"distribution": "q_normal", "mu": 0.3, "sigma": 0.1, "q": 0.05, "min": 0.0,
         "max": 0.5},
        {"distribution": "log_normal", "mu": -1.5, "sigma": 0.5},
        {"distribution": "q_log_normal", "mu": -1.5, "sigma": 0.5, "q": 0.01},
    ],
    "lr": [
        {"distribution": "log_normal", "mu": -6.9, "sigma": 1.0, "min": 1e-4, "max": 1e-2},
        {"distribution": "q_log_normal", "mu": -6.9, "sigma": 1.0, "q": 1e-4, "min": 1e-4,
         "max": 1e-2},
        {"distribution": "uniform", "min": 1e-4, "max": 1e-2},
    ],
    "max_norm": [
        {"distribution": "normal", "mu": 2.0, "sigma": 0.5, "min": 1.0, "max": 3.0},
        {"distribution": "q_uniform", "min": 1.0, "max": 3.0, "q": 0.5},
    ],
}  # fmt: skip


@st.composite
def study_files(draw: st.DrawFn) -> dict[str, Any]:
    """The base file, perhaps with each layer's own table in place of [parameters.units]
    and other distributions for the continuous parameters; then up to three changes: a
    key set to a random value, removed, or a whole parameter table dropped; so files valid
    and almost valid."""
    data = copy.deepcopy(BASE)
    parameters = data["parameters"]
    if draw(st.booleans()):
        del parameters["units"]
        for i in range(3):  # n_layers is 1 to 3: layer i is asked when it is deeper than i
            table = copy.deepcopy(draw(st.sampled_from(LAYER_TABLES)))
            if i > 0:
                table["when"] = {"parameter": "n_layers", "values": list(range(i + 1, 4))}
            parameters[f"n_units_l{i}"] = table
    for name, tables in RANGE_TABLES.items():
        if draw(st.booleans()):
            when = parameters[name].get("when")
            parameters[name] = copy.deepcopy(draw(st.sampled_from(tables)))
            if when is not None:
                parameters[name]["when"] = when
    for _ in range(draw(st.integers(0, 3))):
        section = draw(st.sampled_from(["study", "train", "parameters"]))
        if section == "parameters":
            name = draw(st.sampled_from(sorted(data["parameters"])))
            target = data["parameters"][name]
            if draw(st.booleans()) and len(data["parameters"]) > 1:
                del data["parameters"][name]
                continue
        else:
            target = data[section]
        key = draw(st.sampled_from(KEYS))
        if draw(st.integers(0, 3)) == 0:
            target.pop(key, None)
        else:
            target[key] = draw(LEAF)
    return data


@settings(max_examples=150, deadline=None, database=None)
@given(data=study_files())
def test_random_study_files_train_a_tiny_trial_or_are_refused_in_one_line(
    data: dict[str, Any],
) -> None:
    text = to_toml(data)
    try:
        preset = parse_study(text, "random")
    except StudyFileError as exc:
        message = str(exc)
        assert "\n" not in message and message.startswith("the study file: "), message
        event("refused")
        return
    event("trained")
    own = {name for name, _ in preset.space.own}
    event(f"layers of their own: {any(n.startswith('n_units_l') for n in own)}")
    event(f"other distributions of their own: {bool(own & set(RANGE_TABLES))}")
    sampler = make_sampler(preset.sampler, preset.space, 1, preset.n_prior_trials)
    [params] = draw_params(preset.space, preset.defaults, 1, 1, sampler=sampler)
    config = preset.space.configure(params, preset.defaults)
    result = train_kfold(
        dataclasses.replace(config, subset=None, k=2), TINY, on_progress=lambda _: True
    )
    assert len(result.fold_accuracies) == 2


TINY = synthetic_data(40)


# --- a study from a user's file, joined by a worker that has no file ------------------

USER_FILE = """
[study]
summary = "three layers on the compression rule, a narrower dropout"
n_trials = 4
[train]
subset = 1000
batch_size = "full"
max_epochs = 2
patience = 2
k = 2
[parameters.n_layers]
value = 3
[parameters.units]
distribution = "q_normal"
rule = "compression"
q = 1
min = 1
max = 784
[parameters.activation]
values = ["relu", "hardswish"]
[parameters.optimizer]
value = "adam"
[parameters.dropout]
distribution = "uniform"
min = 0.35
max = 0.45
[parameters.lr]
distribution = "log_uniform_values"
min = 1e-4
max = 1e-2
"""


def mnist_study(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "study", *args, "--root", str(default_root().resolve())],
        cwd=cwd, capture_output=True, text=True, timeout=300,
    )  # fmt: skip


def test_a_study_from_a_file_runs_and_a_worker_without_the_file_joins_its_space(
    tmp_path: Path, mnist: object
) -> None:
    (tmp_path / "mine.toml").write_text(USER_FILE)
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    ran = mnist_study("run", "--space", "mine.toml", "--storage", url, "--workers", "2",
                      "--no-retrain", cwd=tmp_path)  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    assert "study mnist-mine: preset mine" in ran.stdout

    # Another host: no file, only the database, and a larger budget.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    study = optuna.load_study(study_name="mnist-mine", storage=url)
    study.set_user_attr("budget", 6)
    joined = mnist_study("worker", "--study", "mnist-mine", "--storage", url, cwd=elsewhere)
    assert joined.returncode == 0, joined.stderr
    trials = optuna.load_study(study_name="mnist-mine", storage=url).get_trials()
    assert len(trials) == 6
    preset = parse_study(USER_FILE, "mine")
    expected = draw_params(preset.space, preset.defaults, 6, study.user_attrs["seed"])
    assert [t.params for t in trials] == expected  # the same space, the same seeded draws
    assert {tuple(sorted(t.params)) for t in trials} == {
        ("activation", "dropout", "lr", "n_units_l0", "n_units_l1", "n_units_l2")
    }
    assert study.user_attrs["study_file"] == USER_FILE

    # Resuming with another file is refused, naming the difference; nothing runs.
    (tmp_path / "mine.toml").write_text(USER_FILE.replace("max = 0.45", "max = 0.5"))
    refused = mnist_study("run", "--space", "mine.toml", "--storage", url, "--n-trials", "8",
                          cwd=tmp_path)  # fmt: skip
    assert refused.returncode == 2
    assert "it differs in parameters.dropout.max: 0.45 → 0.5" in refused.stderr
    assert len(optuna.load_study(study_name="mnist-mine", storage=url).get_trials()) == 6


# Issue 30's layers, and a continuous parameter's own prior, in the tiniest study that
# trains.
LAYERS_FILE = (
    """
[study]
summary = "a Gaussian prior of its own on layer 1, layer 2 flat, a normal dropout"
n_trials = 2
[train]
subset = 400
batch_size = "full"
max_epochs = 1
patience = 1
k = 2
"""
    + ISSUE_FILE
    + """
[parameters.optimizer]
value = "adam"
[parameters.dropout]
distribution = "q_normal"
mu = 0.4
sigma = 0.05
q = 0.01
min = 0.3
max = 0.5
[parameters.lr]
distribution = "log_normal"
mu = -5.8
sigma = 0.5
min = 1e-4
max = 1e-2
"""
)


def test_a_study_of_each_layer_s_own_prior_runs_and_a_worker_without_the_file_draws_the_same(
    tmp_path: Path, mnist: object
) -> None:
    # Made from the file as `run --space` makes a study (the test above runs that command
    # itself); one worker process on another host then trains it from the database alone.
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    create_or_resume(
        open_storage(url, create=True), "mnist-layers", parse_study(LAYERS_FILE, "layers"),
        budget=4, seed=3,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"  # another host: no file, only the database
    elsewhere.mkdir()
    joined = mnist_study("worker", "--study", "mnist-layers", "--storage", url, cwd=elsewhere)
    study = optuna.load_study(study_name="mnist-layers", storage=url)
    assert joined.returncode == 0, joined.stderr
    trials = optuna.load_study(study_name="mnist-layers", storage=url).get_trials()
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    preset = parse_study(LAYERS_FILE, "layers")
    expected = draw_params(preset.space, preset.defaults, 4, study.user_attrs["seed"])
    assert [t.params for t in trials] == expected  # the same priors, the same seeded draws
    for t in trials:
        assert 16 <= t.params["n_units_l1"] <= 64 and 0.3 <= t.params["dropout"] <= 0.5
        assert t.params["dropout"] == round(t.params["dropout"], 2)  # on its grid of 0.01
    # What the study stores of its priors: each one's own distribution.
    assert study.user_attrs["priors"]["n_units_l0"] == {
        "distribution": "normal", "mu": 256.0, "sigma": 64.0
    }  # fmt: skip
    assert study.user_attrs["priors"]["lr"]["distribution"] == "log_normal"
    assert study.user_attrs["space"]["n_units_l0"]["prior"]["kind"] == (
        "N(256, 64) rounded, in [1, 784]"
    )
