"""Paths that a study's user attributes name (its retrained `checkpoint` and `metrics`),
stored so that another host, or the same files moved to another folder, still finds them.

A path inside the folder of the study's SQLite file is stored relative to that folder.
That folder is what a user moves or copies with the runs: by default `optuna.db`, `runs/`
and `reports/` sit side by side in the folder `mnist-study run` ran in. And whoever reads
the attribute has the storage open, so knows the folder, whatever folder they run from.
(Relative to `retrain --out` would not do: the reader — `report`, `status` — is not told
that folder, and the report's own `--out` is another one.)

A path outside that folder is stored absolute: it is as portable as the place the user
chose. So is every path of a study on a database server, which has no folder: there the
folders that hosts share are mounted at one path, and `report` may run from any folder
(docs/clusters.md's multi-host steps do). Old studies stored absolute paths: those are read
as they are.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import optuna


def storage_folder(study: optuna.Study) -> Path | None:
    """The folder of the SQLite file that holds `study` (as its URL names it, so relative
    when the URL is); None for a database server or an in-memory study."""
    from study.database import sqlite_file

    # Optuna keeps a study's storage private and wraps an RDBStorage in a cache; the URL
    # the study was opened with is on the storage inside.
    storage = getattr(study, "_storage", None)
    url = getattr(getattr(storage, "_backend", storage), "url", None)
    if not isinstance(url, str):
        return None
    database = sqlite_file(url)
    return None if database is None else database.parent


def store_path(study: optuna.Study, path: Path) -> str:
    """`path` as the study should store it: relative to `storage_folder(study)` when
    inside it, else absolute."""
    absolute = path.resolve()
    base = storage_folder(study)
    if base is None or not absolute.is_relative_to(base.resolve()):
        return str(absolute)
    return absolute.relative_to(base.resolve()).as_posix()


def resolve_path(study: optuna.Study, stored: str) -> Path:
    """Where a path stored by `store_path` (or an old absolute one) is now."""
    path = Path(stored)
    if path.is_absolute():
        return path
    return (storage_folder(study) or Path(".")) / path
