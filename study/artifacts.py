"""Files attached to trials: each finished trial's learning curves, as data (`curves.json`,
for the report) and as a picture (`learning_curves.png`, shown on the trial's page in
optuna-dashboard), kept in an Optuna artifact store beside the study's storage.

An SQLite study `optuna.db` keeps them in `optuna.db.artifacts/`; a study on a database
server, in `./artifacts` unless `--artifacts` names a folder. Hosts sharing a PostgreSQL
study should point `--artifacts` at one shared folder, or each keeps its own trials'.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import optuna
from optuna.artifacts import FileSystemArtifactStore, get_all_artifact_meta, upload_artifact

from study.experimental import experimental_optuna

if TYPE_CHECKING:
    from optuna.storages import BaseStorage
    from optuna.trial import FrozenTrial, Trial

CURVES_JSON = "curves.json"
CURVES_PNG = "learning_curves.png"


def artifact_dir(storage_url: str, override: Path | None = None) -> Path:
    if override is not None:
        return override
    from study.database import sqlite_file

    database = sqlite_file(storage_url)
    return Path("artifacts") if database is None else Path(f"{database}.artifacts")


def open_artifact_store(path: Path, *, create: bool = True) -> FileSystemArtifactStore | None:
    """The store at `path`; None when it does not exist and `create` is False."""
    if not path.is_dir():
        if not create:
            return None
        # exist_ok: workers starting together each find no folder, and all but the first
        # would fail on the one the first made ("File exists", seen with three workers).
        path.mkdir(parents=True, exist_ok=True)
    return FileSystemArtifactStore(str(path))


def attach_curves(
    store: FileSystemArtifactStore,
    trial: Trial,
    curves: dict[str, list[list[float]]],
    best_epochs: list[int],
) -> None:
    """Upload the trial's learning curves as JSON and as a PNG."""
    from viz.curves import learning_curves_png

    with tempfile.TemporaryDirectory(prefix="mnist-study-") as tmp:
        data = Path(tmp) / CURVES_JSON
        data.write_text(json.dumps({"curves": curves, "best_epochs": best_epochs}))
        picture = Path(tmp) / CURVES_PNG
        title = f"trial {trial.number}: fold learning curves (★ best epoch)"
        picture.write_bytes(learning_curves_png(curves, best_epochs, title))
        with experimental_optuna():
            for path, mimetype in ((data, "application/json"), (picture, "image/png")):
                upload_artifact(
                    artifact_store=store, file_path=str(path), study_or_trial=trial,
                    mimetype=mimetype,
                )  # fmt: skip


def read_curves(
    store: FileSystemArtifactStore | None, storage: BaseStorage, trial: FrozenTrial
) -> dict[str, Any] | None:
    """The trial's `curves.json`, or None if it has none in this store."""
    if store is None:
        return None
    with experimental_optuna():
        metas = get_all_artifact_meta(trial, storage=storage)
    for meta in metas:
        if meta.filename == CURVES_JSON:
            try:
                with store.open_reader(meta.artifact_id) as reader:
                    return json.loads(reader.read())
            except (OSError, ValueError, optuna.artifacts.exceptions.ArtifactNotFound):
                return None
    return None
