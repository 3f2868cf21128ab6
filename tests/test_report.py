"""After the search: retraining the best trial, the report page, optuna-dashboard."""

from __future__ import annotations

import html
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any
from wsgiref.util import setup_testing_defaults

import optuna
import pytest
import torch
from optuna.artifacts import get_all_artifact_meta
from optuna.trial import TrialState
from PIL import Image

from model.checkpoint import CheckpointError, load_checkpoint
from model.data import Mnist, default_root, to_device
from model.network import FFNN
from study.artifacts import (
    CURVES_JSON,
    CURVES_PNG,
    artifact_dir,
    open_artifact_store,
    read_curves,
)
from study.database import open_storage
from study.errors import StudyError
from study.objective import Objective
from study.presets import PRESETS
from study.reporting import build_report, retrained_network
from study.resilient_storage import ResilientRDBStorage
from study.retrain import best_finished_trial, retrain_best
from study.stored_paths import resolve_path
from study.studies import create_or_resume, load_study
from tests.conftest import synthetic_data
from tests.test_cli import run_cli
from viz.curves import pruner_means

optuna.logging.set_verbosity(optuna.logging.WARNING)
SMOKE = PRESETS["smoke"]
COLUMN_PX = 1100  # the report's column: the page body's max-width, 1100 px of content


def study_with_trials(db: str, name: str, n: int, *, artifacts: Path | None = None) -> Any:
    """A smoke study whose n trials really trained (on synthetic images, for speed)."""
    storage = open_storage(db, create=True)
    study, _ = create_or_resume(storage, name, SMOKE, budget=n, seed=2)
    store = open_artifact_store(artifacts) if artifacts else None
    objective = Objective(SMOKE, synthetic_data(4000), worker="test", artifacts=store)
    study.optimize(objective, n_trials=n)
    return storage, load_study(storage, name)


def test_workers_opening_the_artifact_store_at_once_all_get_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The race, as the fault tests met it: each worker found no folder, then one made it.
    store_dir = tmp_path / "optuna.db.artifacts"
    store_dir.mkdir()
    is_dir, looks = Path.is_dir, []

    def not_yet_there(self: Path) -> bool:  # the first look, before the other worker's mkdir
        looks.append(self)
        return len(looks) > 1 and is_dir(self)

    monkeypatch.setattr(Path, "is_dir", not_yet_there)
    assert open_artifact_store(store_dir) is not None
    monkeypatch.undo()
    (tmp_path / "a-file").write_text("not a folder")
    with pytest.raises(FileExistsError):
        open_artifact_store(tmp_path / "a-file")


def test_retrain_writes_a_checkpoint_and_metrics_that_agree_with_its_predictions(
    tmp_path: Path, mnist: Mnist
) -> None:
    storage, study = study_with_trials(f"sqlite:///{tmp_path / 'optuna.db'}", "s", 2)
    best = best_finished_trial(study)
    outcome = retrain_best(study, out_dir=tmp_path / "runs", device="cpu", data_root=default_root())

    payload = torch.load(outcome.checkpoint, weights_only=True)
    assert payload["config"]["n_units_l0"] == best.params["n_units_l0"]
    assert payload["meta"]["trial"] == best.number
    net = FFNN(
        [payload["config"]["n_units_l0"], payload["config"]["n_units_l1"]],
        payload["config"]["activation"],
        payload["config"]["dropout"],
    )
    net.load_state_dict(payload["state_dict"])
    test = to_device(mnist.test_images, mnist.test_labels, "cpu")
    with torch.no_grad():
        predictions = net.eval()(test.x).argmax(dim=1)

    metrics = json.loads(outcome.metrics_path.read_text())
    assert metrics["test_accuracy"] == pytest.approx((predictions == test.y).double().mean().item())
    confusion = torch.zeros(10, 10, dtype=torch.int64)
    for true, predicted in zip(test.y.tolist(), predictions.tolist(), strict=True):
        confusion[true, predicted] += 1
    assert metrics["confusion_matrix"] == confusion.tolist()
    assert metrics["epochs"] == round(sum(best.user_attrs["best_epochs"]) / 2)
    assert metrics["train_images"] == 4000 and metrics["test_images"] == 10_000
    assert len(metrics["train_loss"]) == metrics["epochs"]
    assert metrics["test_accuracy"] > 0.5

    rebuilt, config, _ = load_checkpoint(outcome.checkpoint)
    assert torch.equal(rebuilt(test.x).argmax(dim=1), predictions)
    assert config.hidden == (best.params["n_units_l0"], best.params["n_units_l1"])
    attrs = load_study(storage, "s").user_attrs
    assert attrs["test_accuracy"] == metrics["test_accuracy"]
    # Relative to the folder of the study's SQLite file (see study/stored_paths.py).
    assert (attrs["checkpoint"], attrs["metrics"]) == ("runs/best.pt", "runs/metrics.json")


def test_a_moved_study_folder_still_finds_its_checkpoint_from_any_folder(
    tmp_path: Path, mnist: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Run as the CLI does: a relative storage URL and --out, in the project's folder.
    root = default_root().resolve()
    project = tmp_path / "project"
    project.mkdir()
    monkeypatch.chdir(project)
    storage, study = study_with_trials("sqlite:///optuna.db", "s", 2)
    outcome = retrain_best(study, out_dir=Path("runs/s"), device="cpu", data_root=root)
    assert study.user_attrs["checkpoint"] == "runs/s/best.pt"
    expected = outcome.metrics["test_accuracy"]
    storage.engine.dispose()

    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    project.rename(moved)
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    db = f"sqlite:///{moved / 'optuna.db'}"
    study = load_study(open_storage(db, heartbeat=None, write=False), "s")
    retrained = retrained_network(study)
    assert retrained.network is not None, retrained.missing
    test = to_device(mnist.test_images, mnist.test_labels, "cpu")
    accuracy = (retrained.network(test.x).argmax(dim=1) == test.y).double().mean().item()
    assert accuracy == pytest.approx(expected)
    assert resolve_path(study, study.user_attrs["metrics"]) == moved / "runs/s/metrics.json"


def test_an_old_absolute_checkpoint_path_is_still_read_and_one_outside_is_kept_absolute(
    tmp_path: Path, mnist: Mnist
) -> None:
    (tmp_path / "db").mkdir()
    _, study = study_with_trials(f"sqlite:///{tmp_path / 'db' / 'optuna.db'}", "s", 1)
    outside = tmp_path / "scratch"
    outcome = retrain_best(study, out_dir=outside, device="cpu", data_root=default_root())
    assert study.user_attrs["checkpoint"] == str(outside.resolve() / "best.pt")
    assert retrained_network(study).network is not None
    # A study retrained before paths were stored relative holds an absolute one.
    (tmp_path / "db/runs").mkdir()
    inside = outcome.checkpoint.rename(tmp_path / "db" / "runs" / "best.pt")
    study.set_user_attr("checkpoint", str(inside.resolve()))
    assert retrained_network(study).network is not None
    study.set_user_attr("checkpoint", "runs/best.pt")
    assert retrained_network(study).network is not None
    inside.unlink()
    assert "run `mnist-study retrain`" in retrained_network(study).missing


def test_retraining_a_study_without_a_finished_trial_says_so(tmp_path: Path) -> None:
    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", create=True)
    study, _ = create_or_resume(storage, "empty", SMOKE)
    with pytest.raises(StudyError, match="'empty' has no finished trial to retrain yet"):
        retrain_best(study, out_dir=tmp_path / "runs", device="cpu", data_root=default_root())
    assert not (tmp_path / "runs").exists()


class _RunsCode:
    def __reduce__(self) -> tuple:
        return (os.system, ("touch pwned",))


def test_a_tampered_checkpoint_is_refused_without_running_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"format": "mnist-study/ffnn-1", "config": _RunsCode()}, evil)
    with pytest.raises(CheckpointError, match="not a checkpoint that loads safely"):
        load_checkpoint(evil)
    assert not (tmp_path / "pwned").exists()
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(garbage)


EVIL_NAME = "<script>alert('x')</script>"
SECTIONS = (
    "Learning curves of the best trial",
    "Receptive fields of the output neurons",
    "Gradient-ascent images",
    "Confusion matrix on the test set",
    "Misclassified test images",
    "Search: Optimization history",
    "Search: Parameter importances",
    "Search: Parallel coordinates",
    "Search: Slices per parameter",
    "Sampled n_units_l0 against its prior",
    "Sampled n_units_l1 against its prior",
)


def test_report_page_holds_every_figure_loads_nothing_and_escapes_the_study_name(
    tmp_path: Path, mnist: Mnist
) -> None:
    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    store_dir = artifact_dir(db)
    storage, study = study_with_trials(db, EVIL_NAME, 4, artifacts=store_dir)
    retrain_best(study, out_dir=tmp_path / "runs", device="cpu", data_root=default_root())
    study = load_study(storage, EVIL_NAME)
    page = build_report(
        study, storage, storage_url=db, out_dir=tmp_path / "report",
        artifact_dir=store_dir, data_root=default_root(),
    )  # fmt: skip
    text = page.read_text()
    for title in SECTIONS:
        assert f"<h2>{title}" in text, title
    assert '<p class="message">' not in text  # no part of the page is missing
    assert EVIL_NAME not in text
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    # Offline: no tag fetches anything; plotly's library is inlined once.
    assert not re.search(r"<(script|img|iframe|embed|source)[^>]*\ssrc=[\"']?(https?:)?//", text)
    assert not re.search(r"<link[^>]*href=", text)
    assert "@import" not in text
    assert len(re.findall(r"plotly\.js v\d+\.\d+\.\d+", text)) == 1
    assert text.count("Plotly.newPlot(") == 8
    assert "the seed report: 0.9798" in text
    for png in ("receptive_fields.png", "gradient_ascent.png", "misclassified.png"):
        assert (page.parent / png).read_bytes().startswith(b"\x89PNG")
        # No wider than the column, so shown at its own size, titles readable.
        assert Image.open(page.parent / png).width <= COLUMN_PX
    # Every picture links its file beside the page.
    links = re.findall(r'<a href="([^"]+)">', text)
    assert sorted(links) == ["gradient_ascent.png", "misclassified.png", "receptive_fields.png"]
    assert all((page.parent / link).is_file() for link in links)
    # Every interactive figure fits the column: no fixed width wider than it.
    layouts = plotly_layouts(text)
    assert len(layouts) == 8
    for layout in layouts:
        assert layout.get("width") is None or layout["width"] <= COLUMN_PX, layout.get("width")
    # Counts of trials are ticked in whole numbers.
    priors = [
        lay for lay in layouts if lay.get("yaxis", {}).get("title", {}).get("text") == "trials"
    ]
    assert len(priors) == 2
    assert all(isinstance(lay["yaxis"]["dtick"], int) for lay in priors)


def plotly_layouts(page: str) -> list[dict[str, Any]]:
    """The layout of every `Plotly.newPlot(id, data, layout, config)` on the page."""
    return [layout for _, layout in plotly_figures(page)]


def plotly_figures(page: str) -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """The data and layout of every `Plotly.newPlot(id, data, layout, config)` on the
    page, in page order."""
    decoder = json.JSONDecoder()
    figures = []
    for match in re.finditer(r"Plotly\.newPlot\(\s*", page):
        at = match.end()
        parts = []
        for _ in range(3):  # the element's id, the data, the layout
            part, at = decoder.raw_decode(page, at)
            parts.append(part)
            at = page.index(",", at) + 1
            while page[at].isspace():
                at += 1
        figures.append((parts[1], parts[2]))
    return figures


# --- a large study's page: drawn from a stated sample (study/trial_sample.py) ------------

# What a browser should be asked to open (issue 20).
PAGE_LIMIT_BYTES = 20_000_000


def filled_study(url: str, n: int) -> tuple[ResilientRDBStorage, optuna.Study]:
    """A quick-preset study of `n` finished trials written straight into the database, as
    the scale benchmark writes them (a second or two, where training them would take hours)."""
    from benchmarks.scale import fill

    storage = open_storage(url, create=True)
    study, _ = create_or_resume(storage, "big", PRESETS["quick"], budget=n, seed=1)
    fill(storage, study, n)
    return storage, load_study(storage, "big")


def page_sections(page: str) -> dict[str, tuple[str, list[tuple[list[Any], dict[str, Any]]]]]:
    """Each section's note and figures (data, layout), by its title."""
    sections = {}
    for chunk in page.split("<h2>")[1:]:
        title, body = chunk.split("</h2>", 1)
        note = re.search(r'^\s*<p class="note">(.*?)</p>', body)
        sections[html.unescape(title)] = (
            html.unescape(note.group(1)) if note else "",
            plotly_figures(body),
        )
    return sections


def summary_rows(page: str) -> dict[str, str]:
    return {
        html.unescape(k): html.unescape(v)
        for k, v in re.findall(r"<tr><td>(.*?)</td><td>(.*?)</td></tr>", page)
    }


def build(storage: ResilientRDBStorage, url: str, out: Path, **thresholds: int) -> str:
    study = load_study(storage, "big")
    page = build_report(
        study, storage, storage_url=url, out_dir=out, artifact_dir=out,
        data_root=default_root(), **thresholds,
    )  # fmt: skip
    assert page.stat().st_size <= PAGE_LIMIT_BYTES
    return page.read_text()


def test_a_study_over_the_threshold_is_drawn_from_a_stated_sample_and_one_under_it_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances

    from study.trial_sample import LARGE_STUDY_TRIALS, SAMPLE_SEED, draw_sample

    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    storage, study = filled_study(url, 600)
    # The whole study, read the slow way, to hold the page to.
    every = study.get_trials(deepcopy=False)
    complete = [t for t in every if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value)
    finished = len(every) - sum(1 for t in every if "retry_history" in t.system_attrs)
    assert 400 < finished < LARGE_STUDY_TRIALS
    # Which trials the importances are computed on.
    evaluated: list[list[int]] = []
    evaluate = PedAnovaImportanceEvaluator.evaluate

    def recording(self: Any, study: optuna.Study, *args: Any, **kwargs: Any) -> Any:
        evaluated.append([t.number for t in study.get_trials(states=(TrialState.COMPLETE,))])
        return evaluate(self, study, *args, **kwargs)

    monkeypatch.setattr(PedAnovaImportanceEvaluator, "evaluate", recording)

    large = build(storage, url, tmp_path / "large", large_above=400, sample_size=150)
    sample = draw_sample(study, storage, 150)
    numbers = sorted(t.number for t in sample.study.get_trials())
    complete_numbers = {t.number for t in complete}
    # 150 complete trials drawn, and the best one, added if the draw missed it.
    assert sample.drawn == 150 and sample.complete == len(complete)
    assert len(numbers) == sample.size == 150 + (sample.best_added is not None)
    assert set(numbers) <= complete_numbers and best.number in numbers
    # The same seed draws the same trials: the page is the same twice.
    again = draw_sample(study, storage, 150, seed=SAMPLE_SEED)
    assert sorted(t.number for t in again.study.get_trials()) == numbers
    # A picture of the study: nothing can be written into it.
    with pytest.raises(TypeError, match="read-only"):
        sample.study.ask()
    assert len(storage.get_all_trials(study._study_id)) == len(every)

    # The page says so, with the numbers, in its summary and above each sampled plot.
    stated = (
        f"a random sample of 150 of the study's {len(complete):,} complete trials "
        f"(seed {SAMPLE_SEED})"
    )
    rows = summary_rows(large)
    assert rows["search plots"].startswith(f"drawn from {stated}")
    assert (
        f"the study has {finished:,} finished trials, over the 400 above which"
        in (rows["search plots"])
    )
    sections = page_sections(large)
    for title in ("Parameter importances", "Parallel coordinates", "Slices per parameter"):
        assert sections[f"Search: {title}"][0].startswith(f"Drawn from {stated}"), title
    importances_note, [(bars, _)] = sections["Search: Parameter importances"]
    assert f"The importances are computed on those {sample.size} trials." in importances_note
    # ...and they were: on the sample's trials, and so not the study's.
    assert evaluated == [numbers]
    on_sample = get_param_importances(sample.study)
    shown = dict(zip(bars[0]["y"], bars[0]["x"], strict=True))
    assert shown == pytest.approx(on_sample, abs=1e-9)
    assert shown != pytest.approx(get_param_importances(study), abs=1e-9)
    # Each slice panel holds the sample's trials, not the study's.
    _, [(slices, _)] = sections["Search: Slices per parameter"]
    assert {len(trace["x"]) for trace in slices if trace.get("name") == "Feasible Trial"} == {
        sample.size
    }
    # The history: the sampled trials as points under their own numbers, and the best value
    # so far over every complete trial (the steps where it rose), ending at the study's best.
    _, [(history, _)] = sections["Search: Optimization history"]
    points, line = history
    assert sorted(points["x"]) == numbers
    rises, so_far = [], float("-inf")
    for t in complete:
        if t.value > so_far:
            so_far = t.value
            rises.append((t.number, t.value))
    rises.append((complete[-1].number, best.value))
    assert list(zip(line["x"], line["y"], strict=True)) == rises
    # The priors' histograms still count every trial, in the database.
    _, [(prior, _)] = sections["Sampled n_units_l0 against its prior"]
    counted = dict(zip(prior[0]["x"], prior[0]["y"], strict=True))
    assert counted == Counter(t.params["n_units_l0"] for t in every)
    total = sum(t.user_attrs.get("seconds", 0.0) for t in every)
    assert rows["total training time"] == f"{total / 60:.1f} min over all trials"

    # Under the threshold (the default, 5,000), the page is drawn from every trial, as it
    # always was: Optuna's own history, slices of every complete trial, every value.
    small = build(storage, url, tmp_path / "small")
    assert "search plots" not in summary_rows(small) and "random sample" not in small
    sections = page_sections(small)
    assert not any(note.startswith("Drawn") for note, _ in sections.values())
    _, [(history, _)] = sections["Search: Optimization history"]
    assert sorted(history[0]["x"]) == sorted(complete_numbers)
    _, [(slices, _)] = sections["Search: Slices per parameter"]
    assert {len(trace["x"]) for trace in slices if trace.get("name") == "Feasible Trial"} == {
        len(complete)
    }
    _, [(prior, _)] = sections["Sampled n_units_l0 against its prior"]
    assert sorted(prior[0]["x"]) == sorted(t.params["n_units_l0"] for t in every)
    assert summary_rows(small)["total training time"] == rows["total training time"]


def test_a_sampled_page_stays_the_same_size_at_three_times_the_trials(tmp_path: Path) -> None:
    from study.trial_sample import draw_sample

    sizes = {}
    for n in (600, 1800):
        url = f"sqlite:///{tmp_path / f'{n}.db'}"
        storage, study = filled_study(url, n)
        page = build(storage, url, tmp_path / str(n), large_above=400, sample_size=150)
        sizes[n] = len(page)
        # One point per sampled trial in each parameter's panel, whatever the study's size.
        sample = draw_sample(study, storage, 150)
        _, [(slices, _)] = page_sections(page)["Search: Slices per parameter"]
        n_params = len(PRESETS["quick"].space.distributions())
        assert sum(len(trace["x"]) for trace in slices) == n_params * sample.size
    assert abs(sizes[1800] - sizes[600]) < 0.01 * sizes[600]


def test_the_dashboard_curves_show_the_intermediate_values_and_read_at_their_size(
    tmp_path: Path,
) -> None:
    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    store_dir = artifact_dir(db)
    storage, study = study_with_trials(db, "s", 3, artifacts=store_dir)
    store = open_artifact_store(store_dir, create=False)
    for trial in study.get_trials():
        curves = read_curves(store, storage, trial)["curves"]
        # The dashed line of the curves' third panel is what the trial reported.
        reported = [trial.intermediate_values[e] for e in sorted(trial.intermediate_values)]
        assert pruner_means(curves["val_loss"], curves["val_accuracy"]) == pytest.approx(reported)
        (picture,) = [
            m for m in get_all_artifact_meta(trial, storage=storage) if m.filename == CURVES_PNG
        ]
        with store.open_reader(picture.artifact_id) as reader:
            width, height = Image.open(io.BytesIO(reader.read())).size
        assert width >= 1500 and height >= 500


def wsgi_get(app: Any, path: str) -> Any:
    environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET"}
    setup_testing_defaults(environ)
    status: list[str] = []

    def start_response(code: str, headers: list, exc_info: Any = None) -> Any:
        status.append(code)
        return lambda data: None

    body = b"".join(app(environ, start_response))
    assert status[0].startswith("200"), (path, status, body[:300])
    return json.loads(body)


def test_dashboard_api_shows_trials_with_their_figures_while_a_worker_writes(
    tmp_path: Path, mnist: Mnist
) -> None:
    from optuna_dashboard import wsgi

    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    create_or_resume(open_storage(db, create=True), "live", SMOKE, budget=40, seed=9)
    env = {**os.environ, "MNIST_STUDY_STORAGE": db}
    worker = subprocess.Popen(
        [sys.executable, "-m", "study", "worker", "--study", "live", "--threads", "1",
         "--root", str(default_root().resolve()), "--quiet"],
        env=env, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        storage = open_storage(db, heartbeat=None)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            done = [
                t
                for t in load_study(storage, "live").get_trials()
                if t.state == TrialState.COMPLETE
            ]
            if len(done) >= 2:
                break
            time.sleep(0.2)
        app = wsgi(storage, artifact_store=open_artifact_store(artifact_dir(db), create=False))
        studies = wsgi_get(app, "/api/studies")["study_summaries"]
        (entry,) = [s for s in studies if s["study_name"] == "live"]
        detail = wsgi_get(app, f"/api/studies/{entry['study_id']}")
        assert worker.poll() is None, "the worker should still be writing"
    finally:
        worker.send_signal(signal.SIGTERM)
        worker.wait(timeout=60)
    finished = [t for t in detail["trials"] if t["state"] == "Complete"]
    assert len(finished) >= 2
    for trial in finished:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        assert {"fold_accuracies", "best_epochs", "device", "worker", "seconds"} <= set(attrs)
        assert trial["intermediate_values"], "running mean accuracy per epoch"
        assert {a["filename"] for a in trial["artifacts"]} == {CURVES_JSON, CURVES_PNG}
    study_attrs = {a["key"]: a["value"] for a in detail["user_attrs"]}
    assert "n_units_l0" in study_attrs["priors"]


@pytest.mark.parametrize(
    ("host", "warned"), [(None, False), ("127.0.0.1", False), ("0.0.0.0", True)]
)
def test_the_dashboard_binds_this_machine_only_unless_told_and_then_warns(
    host: str | None, warned: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    import optuna_dashboard

    from study.cli import main

    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    create_or_resume(open_storage(db, create=True), "s", SMOKE, budget=1)
    served = {}
    monkeypatch.setattr(optuna_dashboard, "run_server", lambda storage, **kw: served.update(kw))
    argv = ["dashboard", "--storage", db, "--port", "8123"] + (["--host", host] if host else [])
    assert main(argv) == 0
    assert served["host"] == (host or "127.0.0.1") and served["port"] == 8123
    err = capsys.readouterr().err
    assert ("warning" in err and "no authentication" in err) is warned, err


def run_study_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, "--root", str(default_root().resolve()), cwd=cwd)


SCHEDULED = {
    "n_layers": 1,
    "n_units_l0": 48,
    "subset": 3000,
    "batch_size": 100,
    "max_epochs": 3,
    "k": 2,
    "schedule": "one_cycle",
    "input_dropout": 0.1,
    "max_norm": 2.0,
    "label_smoothing": 0.05,
    "optimizer": "adamw",
    "lr": 3e-3,
}


def test_retrain_params_trains_one_configuration_and_its_fold_ensemble_without_a_study(
    tmp_path: Path, mnist: Mnist, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The retrain's cross-validation is run again below, in this process, and compared
    # exactly: so at this process's thread count. How MKL and torch split a product or a
    # sum among threads is theirs to choose per CPU; here this configuration gave the same
    # bits at 1 to 8 threads, but a full-batch one on 1,500 images moved its validation
    # losses by 1e-7 from 4 threads on, enough to tip a near tie.
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))
    done = run_study_cli(
        "retrain", "--params", json.dumps(SCHEDULED), "--ensemble", "--out", "out", "--json",
        "--device", "cpu", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics == json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert not (tmp_path / "optuna.db").exists()  # no study was made
    assert metrics["params"] == SCHEDULED and metrics["preset"] == "quick"
    assert metrics["epochs"] == 3 and len(metrics["train_loss"]) == 3
    assert metrics["train_images"] == 3000
    assert metrics["config"]["n_layers"] == 1 and metrics["config"]["schedule"] == "one_cycle"

    # The single network: the checkpoint's predictions give the recorded accuracy.
    net, config, _ = load_checkpoint(tmp_path / "out" / "best.pt")
    assert config.hidden == (48,) and config.input_dropout == 0.1
    test = to_device(mnist.test_images, mnist.test_labels, "cpu")
    with torch.no_grad():
        single = net(test.x).argmax(dim=1)
    assert metrics["test_accuracy"] == pytest.approx((single == test.y).double().mean().item())
    assert metrics["test_accuracy"] > 0.8

    # The ensemble: the same configuration's k fold networks (its cross-validation, run
    # again here), each network's softmax averaged by hand.
    from model.kfold import train_kfold

    ensemble = metrics["ensemble"]
    folds = train_kfold(config, to_device(mnist.train_images, mnist.train_labels, "cpu"))
    assert ensemble["fold_accuracies"] == pytest.approx(folds.fold_accuracies, abs=1e-6)
    assert ensemble["networks"] == 2 == folds.model.n
    with torch.no_grad():
        probabilities = sum(
            folds.model.extract(j).eval()(test.x).softmax(dim=1) for j in range(folds.model.n)
        )
    voted = probabilities.argmax(dim=1)
    assert ensemble["test_accuracy"] == pytest.approx((voted == test.y).double().mean().item())
    # Two networks that disagree somewhere: the vote is not simply one of them.
    assert not torch.equal(voted, single)


def test_retrain_params_refuses_what_does_not_go_together_in_one_line(tmp_path: Path) -> None:
    for args, message in (
        (["--params", "{}", "--study", "s"], "--params and --study: give one"),
        (["--preset", "seed"], "--preset goes with --params"),
        (["--params", '{"schedule": "linear"}'], "schedule = 'linear': must be one of"),
        (["--params", '{"n_layers": 5}'], "n_layers = 5: must be in [1, 2]"),
    ):
        done = run_study_cli("retrain", *args, "--device", "cpu", cwd=tmp_path)
        assert done.returncode == 2, (args, done.stderr)
        assert done.stderr.count("\n") == 1 and message in done.stderr, done.stderr
        assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_scheduled_trial_retrains_for_its_schedule_and_a_constant_one_for_its_best_epochs() -> (
    None
):
    from model.config import TrainConfig
    from study.retrain import final_epochs

    constant = TrainConfig(max_epochs=30)
    assert final_epochs(constant, [4, 7]) == (6, "mean of the folds' best epochs [4, 7], rounded")
    cosine = TrainConfig(max_epochs=30, schedule="cosine")
    assert final_epochs(cosine, [4, 7])[0] == 30
    assert final_epochs(constant, None)[0] == 30
