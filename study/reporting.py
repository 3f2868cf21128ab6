"""`mnist-study report`: everything about one study on one page, `reports/<study>/index.html`.

This module gathers what the study holds — its trials and settings from the storage, the
best trial's learning curves from the artifact store, the retrained network from its
checkpoint — and hands the pieces to `viz`, which draws them. Parts that are not there
yet (no retrain, no curves) say so on the page instead of failing it.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import torch
from optuna.distributions import IntDistribution
from optuna.storages import BaseStorage
from optuna.trial import TrialState

from model.checkpoint import CheckpointMissing, load_checkpoint
from model.data import DataError, load_mnist, to_device
from model.network import FFNN
from model.retrain import predict
from study.artifacts import open_artifact_store, read_curves
from study.budget import backing_storage, count_trials
from study.errors import redact
from study.priors import GaussianPrior, grid_masses
from study.resilient_storage import ResilientRDBStorage
from study.space import SearchSpace, int_masses
from study.stored_paths import resolve_path
from study.studies import STUDY_FILE, study_preset
from study.trial_sample import LARGE_STUDY_TRIALS, SAMPLE_TRIALS, StudySample, draw_sample
from viz.curves import learning_curves_figure
from viz.gradient_ascent import PLAIN, REGULARISED, gradient_ascent
from viz.grid import image_grid_png
from viz.mistakes import confusion_figure, misclassified_png
from viz.receptive_fields import receptive_fields
from viz.report import Section, write_report
from viz.study_plots import prior_figure, sampled_history_figure, search_figures, target_name

# The seed report's test accuracy, for comparison on the page.
SEED_REPORT_TEST_ACCURACY = 0.9798
DIGITS = [str(d) for d in range(10)]


def build_report(
    study: optuna.Study,
    storage: BaseStorage,
    *,
    storage_url: str,
    out_dir: Path,
    artifact_dir: Path,
    data_root: Path,
    network: RetrainedNetwork | None = None,
    large_above: int = LARGE_STUDY_TRIALS,
    sample_size: int = SAMPLE_TRIALS,
) -> Path:
    """Write the study's page into `out_dir`; return the path of `index.html`.

    `network` is `retrained_network(study)` when the caller has already loaded it. A study
    in our database with more than `large_above` finished trials is drawn from a random
    sample of `sample_size` of its complete trials, which the page states
    (`study.trial_sample`); a smaller one from every trial.
    """
    attrs = study.user_attrs
    preset = study_preset(study)
    counts = count_trials(study)
    database = backing_storage(study)
    large = isinstance(database, ResilientRDBStorage) and counts.finished > large_above
    sample = draw_sample(study, database, sample_size) if large else None
    # Below the threshold every trial is read whole, as the page always was.
    trials = None if large else study.get_trials(deepcopy=False)
    best = counts.best
    metrics = _read_metrics(study)
    images: dict[str, bytes] = {}
    sections: list[Section] = []

    curves = None
    if best is not None:
        store = open_artifact_store(artifact_dir, create=False)
        curves = read_curves(store, storage, best)
    final_loss = metrics.get("train_loss") if metrics else None
    if curves is not None and best is not None:
        sections.append(
            Section(
                f"Learning curves of the best trial ({best.number})",
                "Every fold's training (solid) and validation (dashed) loss and accuracy per "
                "epoch; a star marks the epoch whose weights the fold kept, and a curve ends "
                "where early stopping stopped it. Training figures are running means over "
                "the epoch with dropout on."
                + (" Black on the left: the retrain on all training images." if final_loss else "")
                + " Right: the folds' mean validation accuracy, per epoch (solid black: the "
                "mean over the folds, until the first fold stops) and as the pruner and "
                "optuna-dashboard's intermediate values see it (dashed red: each fold's "
                "accuracy at its best epoch so far, averaged; it seldom falls and flattens "
                "out).",
                figure=learning_curves_figure(curves["curves"], curves["best_epochs"], final_loss),
            )
        )
    else:
        sections.append(
            Section(
                "Learning curves of the best trial",
                message="not available: no finished trial yet, or its curves are not in "
                f"the artifact store {artifact_dir}",
            )
        )

    retrained = retrained_network(study) if network is None else network
    if retrained.network is None:
        sections.append(Section("The retrained network", message=retrained.missing))
    else:
        sections += _network_sections(retrained.network, metrics, data_root, images)

    sections += _search_sections(study, sample)

    def values_of(name: str, distribution: IntDistribution) -> list[int] | dict[int, int]:
        if trials is not None:
            return [t.params[name] for t in trials if name in t.params]
        counted = database.param_value_counts(study._study_id, name)
        return {distribution.to_external_repr(v): c for v, c in counted.items()}

    sections += prior_sections(preset.space, values_of, counted=trials is None)

    stored = attrs.get(STUDY_FILE)
    sections.append(
        Section(
            "The study file",
            "What this study searches and how it trains, as the study stores it: any worker "
            "rebuilds the study from this text alone (`mnist-study run --space FILE` made it).",
            text=stored,
            message=None
            if stored is not None
            else f"made before studies stored their file: preset {preset.name!r} of its version",
        )
    )
    if trials is not None:
        seconds = [t.user_attrs.get("seconds", 0.0) for t in trials]
    else:
        seconds = database.user_attr_values(study._study_id, "seconds")
    compute_s = sum(float(s) for s in seconds)
    summary = _summary(study, preset.name, preset.summary, counts, metrics, storage_url, compute_s)
    if sample is not None:
        summary.append(
            (
                "search plots",
                f"drawn from {sample.describe()}: the study has {counts.finished:,} finished "
                f"trials, over the {large_above:,} above which the report reads a sample; "
                "counts, the best trial, the training time and the priors' histograms are over "
                "every trial",
            )
        )
    return write_report(out_dir, f"mnist-study: {study.study_name}", summary, sections, images)


def prior_sections(
    space: SearchSpace,
    values_of: Callable[[str, IntDistribution], list[int] | dict[int, int]],
    *,
    counted: bool = False,
) -> list[Section]:
    """A histogram of each neuron count with a prior, over the counts its prior expects,
    named by the prior: the report's compression rule, or the layer's own distribution.
    `values_of` gives a parameter's values (or, `counted`, how many trials drew each)."""
    own = dict(space.own)
    priors = space.priors()
    sections = []
    for name, distribution in space.distributions().items():
        if not name.startswith("n_units_l") or not (name in own or name in priors):
            continue  # the plots are of neuron counts with a prior or a table of their own
        assert isinstance(distribution, IntDistribution)
        low, high = distribution.low, distribution.high
        if name in own:  # the layer's own distribution, from the study file
            prior = own[name].prior
            if prior is None:  # int_uniform, q_log_uniform_values: Optuna's random draws
                shares = int_masses(low, high, log=distribution.log)
            else:
                masses = grid_masses(prior, distribution)
                if masses is None:
                    continue
                shares = _per_whole_number(masses, distribution.step)
            label = f"the file's {own[name].given}: {space.prior_moments()[name].kind}"
            what = "its own distribution in the study file, put on its grid and"
        else:
            prior = priors[name]
            assert isinstance(prior, GaussianPrior)  # the compression rule's
            mass = {n: prior.bin_mass(n) for n in range(low, high + 1)}
            total = sum(mass.values())
            shares = {n: m / total for n, m in mass.items()}
            label = (
                f"the file's q_normal, compression rule: N({prior.mu:.2f}, "
                f"{prior.sigma:.2f}) rounded, redrawn until in [{low}, {high}]"
            )
            what = "the report's Gaussian prior, rounded and"
        sections.append(
            Section(
                f"Sampled {name} against its prior",
                f"Every trial's value of this neuron count beside {what} truncated to the "
                "parameter's range as the sampler draws."
                + (" Counted in the database, over every trial." if counted else ""),
                figure=prior_figure(name, values_of(name, distribution), shares, label),
            )
        )
    return sections


def _per_whole_number(masses: dict[float, float], step: int) -> dict[int, float]:
    """Each grid value's share spread evenly over the `step` whole numbers of its cell, so
    that a grid of multiples of 8 draws as a curve over the plot's bins, not as spikes."""
    out: dict[int, float] = {}
    for value, share in masses.items():
        for n in range(int(value) - step // 2, int(value) - step // 2 + step):
            out[n] = out.get(n, 0.0) + share / step
    return out


def _search_sections(study: optuna.Study, sample: StudySample | None) -> list[Section]:
    """Optuna's plots of the study, or of its sample (the history then drawn by us, its
    best-so-far line over every trial), each saying which trials it shows."""
    # Optuna logs a warning for each plot it cannot draw yet; the page says so already.
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        if sample is None:
            plots = search_figures(study)
        else:
            plots = search_figures(sample.study, history=False)
    finally:
        optuna.logging.set_verbosity(verbosity)
    if sample is None:
        return [
            Section(f"Search: {plot.title}", figure=plot.figure, message=plot.reason)
            for plot in plots
        ]
    drawn = f"Drawn from {sample.describe()}."
    sampled = [
        (t.number, t.value)
        for t in sample.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    ]
    history = sampled_history_figure(
        sampled, sample.best_so_far, target_name(study),
        sampled_label=f"{len(sampled):,} sampled trials",
        best_label=f"best so far, over all {sample.complete:,} complete trials",
    )  # fmt: skip
    sections = [
        Section(
            "Search: Optimization history",
            f"Points: {sample.describe()}. Line: the best value so far over every complete "
            "trial, read from the database.",
            figure=history,
        )
    ]
    for plot in plots:
        note = drawn
        if plot.title == "Parameter importances":
            note += f" The importances are computed on those {sample.size:,} trials."
        sections.append(
            Section(f"Search: {plot.title}", note, figure=plot.figure, message=plot.reason)
        )
    return sections


def _sampler_text(attrs: dict[str, Any]) -> str:
    seed = f"seed {attrs.get('seed')}"
    if attrs.get("sampler") == "prior_then_tpe":
        return f"the first {attrs.get('n_prior_trials')} trials at random, then TPE; {seed}"
    return f"random search on the priors; {seed}"


def _summary(
    study: optuna.Study,
    preset_name: str,
    preset_summary: str,
    counts: Any,
    metrics: dict[str, Any] | None,
    storage_url: str,
    compute_s: float,
) -> list[tuple[str, str]]:
    rows = [
        ("study", study.study_name),
        ("storage", redact(storage_url)),
        ("preset", f"{preset_name}: {preset_summary}"),
        ("budget", f"{counts.finished} of {counts.budget} trials finished"),
        (
            "trials by state",
            f"{counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed, "
            f"{counts.running} running, {counts.waiting} queued, {counts.retried} retried",
        ),
        ("sampler", _sampler_text(study.user_attrs)),
        (
            "total training time",
            (f"{compute_s / 60:.1f} min" if compute_s >= 120 else f"{compute_s:.1f} s")
            + " over all trials",
        ),
    ]
    best = counts.best
    if best is not None:
        folds = best.user_attrs.get("fold_accuracies", [])
        spread = (
            f" ± {statistics.pstdev(folds):.4f} (folds: {', '.join(f'{a:.4f}' for a in folds)})"
            if folds
            else ""
        )
        params = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()
        )
        rows.append(("best mean CV accuracy", f"{best.value:.4f}{spread}, trial {best.number}"))
        rows.append(("best parameters", params))
    if metrics:
        rows.append(
            (
                "test accuracy",
                f"{metrics['test_accuracy']:.4f} on {metrics['test_images']} test images "
                f"(retrained {metrics['epochs']} epochs on {metrics['train_images']} images); "
                f"the seed report: {SEED_REPORT_TEST_ACCURACY:.4f}",
            )
        )
    else:
        rows.append(
            (
                "test accuracy",
                f"not measured yet (mnist-study retrain); the seed report: "
                f"{SEED_REPORT_TEST_ACCURACY:.4f}",
            )
        )
    return rows


def _network_sections(
    model: FFNN, metrics: dict[str, Any] | None, data_root: Path, images: dict[str, bytes]
) -> list[Section]:
    sections = []
    images["receptive_fields.png"] = image_grid_png(
        receptive_fields(model), [f"digit {d}" for d in DIGITS], columns=5, diverging=True
    )
    sections.append(
        Section(
            "Receptive fields of the output neurons",
            "The product of the weight matrices without biases, W_out · … · W_1, one row per "
            "digit shown as 28 × 28 (red positive, blue negative, each on its own scale, "
            "given by the bar beside it), as the seed report defines them. Biases and "
            "activations are left out.",
            png="receptive_fields.png",
        )
    )
    plain, regularised = gradient_ascent(model, PLAIN), gradient_ascent(model, REGULARISED)
    titles = [f"{d}: {plain.end_outputs[d]:.0f}" for d in range(10)]
    titles += [f"{d}: {regularised.end_outputs[d]:.0f}" for d in range(10)]
    images["gradient_ascent.png"] = image_grid_png(
        torch.cat([plain.images, regularised.images]),
        titles,
        row_labels=["plain", "regularised"],
    )
    sections.append(
        Section(
            "Gradient-ascent images",
            f"Each output neuron's own image, grown from uniform noise by gradient ascent on "
            f"its output (title: digit and final output). Top, the report's way: "
            f"{PLAIN.steps} steps at learning rate {PLAIN.lr}, pixels kept in [0, 1]. "
            f"Bottom, regularised: the output plus its margin over the other nine "
            f"ascended, an L2 ({REGULARISED.l2}) and a total-variation ({REGULARISED.tv}) "
            f"penalty, a Gaussian blur every {REGULARISED.blur_every} steps, the "
            f"{REGULARISED.border}-pixel border (never inked in MNIST) kept black, learning "
            f"rate {REGULARISED.lr}; every {REGULARISED.relax_every} steps a digit not "
            f"ahead of every other output by {REGULARISED.margin_goal:g} has its penalties "
            f"halved. " + _relaxed_note(regularised.penalty_scale),
            png="gradient_ascent.png",
        )
    )
    try:
        mnist = load_mnist(data_root)
    except DataError as exc:
        sections.append(Section("Test-set mistakes", message=f"not drawn: {exc}"))
        return sections
    test = to_device(mnist.test_images, mnist.test_labels, "cpu")
    predictions = predict(model, test.x)
    if metrics:
        sections.append(
            Section(
                "Confusion matrix on the test set",
                "Rows: true digit; columns: predicted digit.",
                figure=confusion_figure(metrics["confusion_matrix"]),
            )
        )
    picture, wrong = misclassified_png(mnist.test_images, mnist.test_labels, predictions)
    images["misclassified.png"] = picture
    sections.append(
        Section(
            "Misclassified test images",
            f"{wrong} of {len(predictions)} test images are misclassified; the first "
            f"{min(wrong, 40)} are shown, titled true → predicted.",
            png="misclassified.png",
        )
    )
    return sections


@dataclass(frozen=True)
class RetrainedNetwork:
    """The study's retrained network, or (`network` None) a sentence saying why there is
    none."""

    network: FFNN | None
    missing: str = ""


def retrained_network(study: optuna.Study) -> RetrainedNetwork:
    """The study's retrained network, loaded from the checkpoint its attributes name.

    A checkpoint that is there but refused (altered, damaged) raises `CheckpointError`:
    a page that quietly left out its pictures would hide that someone changed the file.
    """
    checkpoint = study.user_attrs.get("checkpoint")
    if not checkpoint:
        return RetrainedNetwork(
            None, "not retrained yet: run `mnist-study retrain` for the test accuracy and pictures"
        )
    try:
        model, _, _ = load_checkpoint(resolve_path(study, checkpoint))
    except CheckpointMissing as exc:
        return RetrainedNetwork(None, f"{exc}; run `mnist-study retrain` to write it again")
    return RetrainedNetwork(model)


def _relaxed_note(penalty_scale: torch.Tensor) -> str:
    relaxed = [str(d) for d in range(len(penalty_scale)) if penalty_scale[d] < 1]
    if not relaxed:
        return "No digit needed that here."
    return f"Relaxed here for {', '.join(relaxed)}."


def _read_metrics(study: optuna.Study) -> dict[str, Any] | None:
    path = study.user_attrs.get("metrics")
    if not path:
        return None
    try:
        return json.loads(resolve_path(study, path).read_text())
    except (OSError, ValueError):
        return None
