"""`mnist-study retrain`: the study's best trial, trained again on all of its training
images and measured once on the official 10,000-image test set.

The configuration is rebuilt from the trial's stored parameters and the preset's fixed
settings; it trains for the mean of its folds' best epochs (rounded), the length that
cross-validation found best. The test set decides nothing: it is looked at once, after.
"""

from __future__ import annotations

import json
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from model.checkpoint import save_checkpoint
from model.data import load_mnist, to_device
from model.retrain import classification_metrics, predict, train_final
from study.errors import StudyError
from study.presets import get_preset
from study.stored_paths import store_path

CHECKPOINT = "best.pt"
METRICS = "metrics.json"


@dataclass(frozen=True)
class RetrainOutcome:
    trial: FrozenTrial
    metrics: dict[str, Any]
    checkpoint: Path
    metrics_path: Path


def study_slug(name: str) -> str:
    """A study name made safe as one folder name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "study"


def best_finished_trial(study: optuna.Study) -> FrozenTrial:
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise StudyError(
            f"study {study.study_name!r} has no finished trial to retrain yet; "
            "run it first (mnist-study run)"
        )
    return max(complete, key=lambda t: t.value)


def retrain_best(
    study: optuna.Study,
    *,
    out_dir: Path,
    device: Any,
    data_root: Path,
    precision: str | None = None,
) -> RetrainOutcome:
    """Train the best trial's configuration on all its images, test it, write its files."""
    trial = best_finished_trial(study)
    preset = get_preset(study.user_attrs["preset"])
    config = preset.space.configure(trial.params, preset.defaults)
    best_epochs = trial.user_attrs.get("best_epochs") or [config.max_epochs]
    epochs = max(1, round(statistics.fmean(best_epochs)))

    mnist = load_mnist(data_root)
    data = to_device(mnist.train_images, mnist.train_labels, device)
    final = train_final(config, data, epochs, precision=precision)
    if final.diverged:
        raise StudyError(f"retraining trial {trial.number} diverged (non-finite loss)")
    test = to_device(mnist.test_images, mnist.test_labels, device)
    predictions = predict(final.model.to(device), test.x)
    metrics: dict[str, Any] = {
        "study": study.study_name,
        "trial": trial.number,
        "cv_mean_accuracy": trial.value,
        "params": trial.params,
        **classification_metrics(predictions, test.y),
        "epochs": epochs,
        "epochs_rule": f"mean of the folds' best epochs {best_epochs}, rounded",
        "train_images": final.n_images,
        "seconds": round(final.seconds, 3),
        "device": final.device,
        "train_loss": final.train_loss,
        "train_accuracy": final.train_accuracy,
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT
    save_checkpoint(
        checkpoint,
        final.model.cpu(),
        config,
        meta={k: metrics[k] for k in ("study", "trial", "epochs", "test_accuracy")},
    )
    metrics_path = out_dir / METRICS
    partial = out_dir / f".{METRICS}.partial"
    partial.write_text(json.dumps(metrics, indent=1))
    partial.replace(metrics_path)
    study.set_user_attr("test_accuracy", metrics["test_accuracy"])
    # Relative to the storage's folder, so that the study still finds them when the folder
    # moves or another host reads it (see study/stored_paths.py).
    study.set_user_attr("checkpoint", store_path(study, checkpoint))
    study.set_user_attr("metrics", store_path(study, metrics_path))
    return RetrainOutcome(trial, metrics, checkpoint, metrics_path)
