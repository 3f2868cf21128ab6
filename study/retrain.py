"""`mnist-study retrain`: a configuration trained on all of its training images and
measured once on the official 10,000-image test set — the study's best trial, or one
given with `--params`.

The study's best trial is rebuilt from its stored parameters and the preset's fixed
settings. How long it trains: with a constant learning rate, the mean of its folds' best
epochs (rounded), the length that cross-validation found best; with a schedule, the
schedule's whole length (`max_epochs`), the length the folds were trained to. A
configuration given with `--params` trains for its `max_epochs`. With `ensemble`, the
configuration's k fold networks (cross-validated again, as the study did) also vote, by
averaged class probabilities. The test set decides nothing: each model looks at it once,
after training.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from model.checkpoint import save_checkpoint
from model.config import TrainConfig
from model.data import load_mnist, to_device
from model.kfold import Progress, train_kfold
from model.retrain import classification_metrics, predict, predict_ensemble, train_final
from study.budget import backing_storage
from study.errors import StudyError
from study.resilient_storage import ResilientRDBStorage
from study.stored_paths import store_path
from study.studies import study_preset

CHECKPOINT = "best.pt"
METRICS = "metrics.json"


@dataclass(frozen=True)
class RetrainOutcome:
    trial: FrozenTrial | None
    metrics: dict[str, Any]
    checkpoint: Path
    metrics_path: Path


def study_slug(name: str) -> str:
    """A study name made safe as one folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"


def best_finished_trial(study: optuna.Study) -> FrozenTrial:
    """The study's complete trial with the highest value, the first-numbered of equals:
    found in the database where it is ours (one ordered query, at any study size), else
    by reading every trial."""
    storage = backing_storage(study)
    if isinstance(storage, ResilientRDBStorage):
        best_id = storage.best_trial_id(study._study_id)
        best = None if best_id is None else storage.get_trial(best_id)
    else:
        trials = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        best = max(trials, key=lambda t: t.value) if trials else None
    if best is None:
        raise StudyError(
            f"study {study.study_name!r} has no finished trial to retrain yet; "
            "run it first (mnist-study run)"
        )
    return best


def final_epochs(config: TrainConfig, best_epochs: list[int] | None) -> tuple[int, str]:
    """How long the final network trains, and the rule that said so."""
    if config.schedule != "constant":
        return config.max_epochs, f"the {config.schedule} schedule's whole length (max_epochs)"
    if not best_epochs:
        return config.max_epochs, "max_epochs (no cross-validation chose it)"
    epochs = max(1, round(statistics.fmean(best_epochs)))
    return epochs, f"mean of the folds' best epochs {best_epochs}, rounded"


def retrain_best(
    study: optuna.Study,
    *,
    out_dir: Path,
    device: Any,
    data_root: Path,
    precision: str | None = None,
    ensemble: bool = False,
    on_epoch: Callable[[int], None] | None = None,
    on_fold_epoch: Callable[[int], None] | None = None,
) -> RetrainOutcome:
    """Train the best trial's configuration on all its images, test it, write its files."""
    trial = best_finished_trial(study)
    preset = study_preset(study)
    config = preset.space.configure(trial.params, preset.defaults)
    epochs, rule = final_epochs(config, trial.user_attrs.get("best_epochs"))
    head = {
        "study": study.study_name,
        "trial": trial.number,
        "cv_mean_accuracy": trial.value,
        "params": trial.params,
    }
    outcome = train_and_test(
        config,
        epochs,
        rule,
        head=head,
        out_dir=out_dir,
        device=device,
        data_root=data_root,
        precision=precision,
        ensemble=ensemble,
        on_epoch=on_epoch,
        on_fold_epoch=on_fold_epoch,
    )
    study.set_user_attr("test_accuracy", outcome.metrics["test_accuracy"])
    # Which trial that figure is of: a study resumed later may find a better one.
    study.set_user_attr("retrained_trial", trial.number)
    if ensemble:
        study.set_user_attr("ensemble_test_accuracy", outcome.metrics["ensemble"]["test_accuracy"])
    # Relative to the storage's folder, so that the study still finds them when the folder
    # moves or another host reads it (see study/stored_paths.py).
    study.set_user_attr("checkpoint", store_path(study, outcome.checkpoint))
    study.set_user_attr("metrics", store_path(study, outcome.metrics_path))
    return RetrainOutcome(trial, outcome.metrics, outcome.checkpoint, outcome.metrics_path)


def train_and_test(
    config: TrainConfig,
    epochs: int,
    epochs_rule: str,
    *,
    head: dict[str, Any],
    out_dir: Path,
    device: Any,
    data_root: Path,
    precision: str | None = None,
    ensemble: bool = False,
    on_epoch: Callable[[int], None] | None = None,
    on_fold_epoch: Callable[[int], None] | None = None,
) -> RetrainOutcome:
    """Train `config` on all its images for `epochs`, measure the test set once (and the
    fold ensemble's, with `ensemble`), and write the checkpoint and `metrics.json` (whose
    keys start with `head`) under `out_dir`. `on_epoch` and `on_fold_epoch` hear of the
    epochs of each training as they end."""
    mnist = load_mnist(data_root)
    data = to_device(mnist.train_images, mnist.train_labels, device)
    final = train_final(config, data, epochs, precision=precision, on_epoch=on_epoch)
    if final.diverged:
        what = f"trial {head['trial']}" if "trial" in head else "the configuration"
        raise StudyError(f"retraining {what} diverged (non-finite loss)")
    test = to_device(mnist.test_images, mnist.test_labels, device)
    predictions = predict(final.model.to(device), test.x)
    metrics: dict[str, Any] = {
        **head,
        **classification_metrics(predictions, test.y),
        "config": config.params(),
        "epochs": epochs,
        "epochs_rule": epochs_rule,
        "train_images": final.n_images,
        "seconds": round(final.seconds, 3),
        "device": final.device,
        "train_loss": final.train_loss,
        "train_accuracy": final.train_accuracy,
    }
    if ensemble:
        heard = None if on_fold_epoch is None else _epochs_to(on_fold_epoch)
        folds = train_kfold(config, data, precision=precision, on_progress=heard)
        if folds.diverged or folds.model is None:
            raise StudyError(f"cross-validating the configuration again: {folds.diverged}")
        voted = classification_metrics(predict_ensemble(folds.model, test.x), test.y)
        metrics["ensemble"] = {
            "test_accuracy": voted["test_accuracy"],
            "networks": config.k,
            "rule": "the k fold networks of the configuration's cross-validation, each "
            "trained on (k-1)/k of the images and kept at its best validation epoch; "
            "class probabilities averaged",
            "cv_mean_accuracy": folds.mean_accuracy,
            "fold_accuracies": folds.fold_accuracies,
            "best_epochs": folds.best_epochs,
            "seconds": round(folds.seconds, 3),
            "per_class_accuracy": voted["per_class_accuracy"],
            "confusion_matrix": voted["confusion_matrix"],
        }
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT
    meta = {k: metrics[k] for k in ("study", "trial", "epochs", "test_accuracy") if k in metrics}
    save_checkpoint(checkpoint, final.model.cpu(), config, meta=meta)
    metrics_path = out_dir / METRICS
    partial = out_dir / f".{METRICS}.partial"
    partial.write_text(json.dumps(metrics, indent=1))
    partial.replace(metrics_path)
    return RetrainOutcome(None, metrics, checkpoint, metrics_path)


def _epochs_to(on_epoch: Callable[[int], None]) -> Callable[[Progress], bool]:
    """A k-fold progress callback that passes on the epoch and never halts."""

    def on_progress(progress: Progress) -> bool:
        on_epoch(progress.epoch)
        return False

    return on_progress
