"""The errors several modules raise, and how an error is told to a user: on one line,
without a password (`model.errors.first_line` cuts a message to its first line). Imports
nothing of ours, so any module may import it."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

# Exit codes: bad input on the command line, data or storage that cannot serve, Ctrl-C.
EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_INTERRUPTED = 130


class StorageError(RuntimeError):
    """The storage URL or database cannot be used; the message says why in one line."""


class StudyError(RuntimeError):
    """The study is missing or does not match what was asked for."""


class UsageError(Exception):
    """Bad input from the command line; exit 2."""


class SlurmError(Exception):
    """SLURM is missing, refused the job, or cannot be reached; exit 1."""


class OutputError(Exception):
    """A folder the command must write into cannot be made or written; exit 1."""


def check_writable(folder: Path) -> None:
    """Refuse a folder that could not be made or written, before the work whose results
    go there: its nearest existing ancestor must be a folder this process may write."""
    existing = next(p for p in (folder, *folder.parents) if p.exists() or p == Path("."))
    if not existing.is_dir():
        raise OutputError(f"cannot write into {folder}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputError(f"cannot write into {folder}: {existing} is not writable")


def causes(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what led to it, explicit cause (`raise ... from`) before implicit
    context, each once even where the chain loops."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


# The user:password@ of a URL, as SQLAlchemy reads one (user up to ':', password up to
# '@'), but never across a blank: in a message a URL ends there.
_URL_PASSWORD = re.compile(r"(://[^/:@\s]*:)[^@\s]*@")


def redact(text: str) -> str:
    """`text` with the password of every URL in it shown as `***`, for every message a user
    sees: a storage URL, or an error that echoes one."""
    return _URL_PASSWORD.sub(r"\1***@", text)
