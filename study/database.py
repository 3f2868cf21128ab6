"""Opening the database a study lives in: the URL, the SQLite file, the heartbeat settings.

Any SQLAlchemy URL works; `sqlite:///optuna.db` in the current directory is the default
and PostgreSQL is the way to several hosts. A URL that names no usable database, and an
SQLite file that is missing, damaged, read-only or another application's, are refused in
one line before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sqlite3
import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from optuna.storages import RetryHeartbeatStaleTrialCallback

from study.errors import StorageError, redact
from study.experimental import experimental_optuna
from study.resilient_storage import ResilientRDBStorage, database_error_line, drop_fallback_warning

DEFAULT_STORAGE = "sqlite:///optuna.db"
# The storage URL when --storage is not given; `run` hands it to its workers this way.
STORAGE_ENV = "MNIST_STUDY_STORAGE"
# Seconds between a running trial's heartbeats; a trial silent for GRACE_FACTOR times as
# long belongs to a dead worker and is queued again with the same parameters.
DEFAULT_HEARTBEAT = 5
GRACE_FACTOR = 4
# A retry that dies again is retried again, up to this many times.
MAX_RETRY = 3
# How long an SQLite writer waits for another's lock before giving up.
SQLITE_BUSY_TIMEOUT_S = 120
# How long a storage call keeps retrying through a lost connection (a database server
# restarting, a network blip) or a lock it could not wait for, before the process gives up.
RECONNECT_S = 120
RECONNECT_ENV = "MNIST_STUDY_RECONNECT_S"
# Seconds a PostgreSQL connection attempt may take before it counts as failed.
CONNECT_TIMEOUT_S = 10


def sqlite_file(url: str) -> Path | None:
    """The SQLite file a storage URL names (relative when the URL is); None for a database
    server or an in-memory database."""
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return None
    return Path(parsed.database)


def open_storage(
    url: str,
    *,
    create: bool = False,
    heartbeat: int | None = DEFAULT_HEARTBEAT,
    write: bool = True,
) -> ResilientRDBStorage:
    """A `ResilientRDBStorage` for `url`, with heartbeats and retry of stale trials.

    With `create=False` a missing SQLite file is an error rather than a new empty file.
    A file that is not an Optuna database, or is damaged, is refused before anything
    writes to it; so is one this process may not write to, unless `write=False` (the
    commands that only read: status, report, dashboard).
    """
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError

    try:
        parsed = make_url(url)
        parsed.get_dialect()
    except NoSuchModuleError:
        raise StorageError(
            f"storage {redact(url)}: no database driver {parsed.drivername!r} "
            "(e.g. sqlite:///optuna.db or postgresql+psycopg://user@host/db)"
        ) from None
    except ArgumentError:
        raise StorageError(
            f"storage {url!r}: not a database URL (e.g. sqlite:///optuna.db or "
            "postgresql+psycopg://user@host/db)"
        ) from None
    engine_kwargs: dict[str, Any] = {}
    if parsed.get_backend_name() == "sqlite":
        engine_kwargs["connect_args"] = {"timeout": SQLITE_BUSY_TIMEOUT_S}
        if parsed.database and parsed.database != ":memory:":
            _check_sqlite_file(Path(parsed.database), create=create, write=write)
    else:
        # A pooled connection that died with its server is noticed and replaced at checkout.
        engine_kwargs["pool_pre_ping"] = True
        if parsed.get_driver_name() in ("psycopg", "psycopg2"):
            engine_kwargs["connect_args"] = {"connect_timeout": CONNECT_TIMEOUT_S}
    try:
        with experimental_optuna():
            kwargs: dict[str, Any] = {}
            if heartbeat:
                kwargs = {
                    "heartbeat_interval": heartbeat,
                    "grace_period": GRACE_FACTOR * heartbeat,
                    "heartbeat_stale_trial_callback": RetryHeartbeatStaleTrialCallback(
                        max_retry=MAX_RETRY
                    ),
                }
            storage = _create_tables_once(url, engine_kwargs, kwargs)
    except ImportError:
        raise StorageError(
            f"storage {redact(url)}: the driver {parsed.drivername!r} is not installed "
            "(for PostgreSQL: pip install 'mnist-study[postgres]')"
        ) from None
    except (SQLAlchemyError, RuntimeError, ValueError) as exc:
        raise StorageError(f"storage {redact(url)}: {database_error_line(exc)}") from None
    # Only now: a wrong password or a database that is not there fails at once above,
    # whereas an outage after a good start is waited out.
    storage.reconnect_s = _reconnect_seconds()
    logging.getLogger("optuna.storages._rdb.storage").addFilter(drop_fallback_warning)
    return storage


# What a process sees when another creates Optuna's tables in the same new database at
# the same moment (SQLite, then PostgreSQL wording): each checks, then both create.
_CREATION_RACE = re.compile(r"already exists|UNIQUE constraint failed|duplicate key value")
CREATION_ATTEMPTS = 4


def _create_tables_once(
    url: str, engine_kwargs: dict[str, Any], kwargs: dict[str, Any]
) -> ResilientRDBStorage:
    """The storage, whose first opening creates Optuna's tables. A `run` creating a new
    database while `status` (or another `run`) opens it may lose that race; by the retry
    the winner's tables exist and are only checked."""
    from sqlalchemy.exc import SQLAlchemyError

    for attempt in range(1, CREATION_ATTEMPTS + 1):
        try:
            return ResilientRDBStorage(url, engine_kwargs=engine_kwargs, **kwargs)
        except SQLAlchemyError as exc:
            if attempt == CREATION_ATTEMPTS or not _CREATION_RACE.search(str(exc)):
                raise
            time.sleep(0.2 * attempt)
    raise AssertionError("unreachable")


def _reconnect_seconds() -> float:
    """$MNIST_STUDY_RECONNECT_S, for a planned outage longer than the default's."""
    text = os.environ.get(RECONNECT_ENV)
    if not text:
        return RECONNECT_S
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise StorageError(f"${RECONNECT_ENV} = {text!r}: must be a number of seconds >= 0")
    return seconds


def _check_sqlite_file(path: Path, *, create: bool, write: bool) -> None:
    if not path.exists():
        if not create:
            raise StorageError(
                f"no study storage at {path}: start a study there with `mnist-study run`, "
                "or point --storage at an existing one"
            )
        if not path.parent.is_dir():
            raise StorageError(f"cannot create {path}: folder {path.parent} does not exist")
        if not os.access(path.parent, os.W_OK):
            raise StorageError(f"cannot create {path}: folder {path.parent} is read-only")
        # WAL lets readers (the progress bar, the dashboard) read while a worker writes.
        # The mode is kept in the file, so it is set once, on a file nobody else has open.
        with contextlib.closing(sqlite3.connect(path)) as connection:
            connection.execute("PRAGMA journal_mode=WAL")
        return
    if path.is_dir():
        raise StorageError(f"{path} is a folder, not an SQLite database")
    # Only SQLite itself opens the file: closing any other descriptor of it would drop the
    # locks that this process's open connections hold (POSIX locks are per process), and
    # then another process may delete a WAL those connections still read from.
    companions = [path.with_name(path.name + end) for end in ("-wal", "-shm")]
    unused = not any(c.exists() for c in companions)  # in WAL mode, open means they exist
    try:
        uri = f"file:{quote(str(path.resolve()))}?mode=ro"
        with contextlib.closing(sqlite3.connect(uri, uri=True)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            page_size = connection.execute("PRAGMA page_size").fetchone()[0]
            pages = connection.execute("PRAGMA page_count").fetchone()[0]
        size = path.stat().st_size
        wal = companions[0]
        # With no WAL, every page is in the file: one cut short (a copy interrupted, a full
        # disk) has fewer bytes than its header counts. A WAL with frames, even one another
        # process began while this one looked, holds pages the file does not yet.
        no_frames = unused and (not wal.exists() or wal.stat().st_size == 0)
        if no_frames and size < pages * page_size:
            raise StorageError(
                f"{path} is damaged (truncated: {size:,} bytes, its header counts "
                f"{pages * page_size:,}); it was left as it is"
            )
        if tables and "studies" not in tables:
            raise StorageError(
                f"{path} is a database of another application (it has no Optuna tables); "
                "refusing to add them"
            )
        # SQLite in WAL mode also writes -wal and -shm files beside the database.
        for needed in (path, path.parent) if write else ():
            if not os.access(needed, os.W_OK):
                why = "" if needed == path else f" (its folder {needed} is not writable)"
                raise StorageError(
                    f"{path} is read-only for this user{why}: `mnist-study status` and "
                    "`report` can read it; run and retrain need write access"
                )
    except (sqlite3.DatabaseError, StorageError) as exc:
        if unused:
            _remove_empty_companions(companions)
        if not isinstance(exc, sqlite3.DatabaseError):
            raise
        if exc.sqlite_errorcode & 0xFF == sqlite3.SQLITE_NOTADB:
            raise StorageError(f"{path} is not an SQLite database ({exc})") from None
        raise StorageError(f"{path} is damaged ({exc}); it was left as it is") from None


def _remove_empty_companions(companions: list[Path]) -> None:
    """Takes away the -wal and -shm files that looking into a refused file left (so a
    refusal changes nothing), but only an empty log: one with content is someone's data."""
    wal, shm = companions
    if wal.exists() and wal.stat().st_size == 0:
        wal.unlink(missing_ok=True)
        shm.unlink(missing_ok=True)
    elif not wal.exists():
        shm.unlink(missing_ok=True)
