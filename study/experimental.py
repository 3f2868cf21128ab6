"""Optuna features still marked experimental that mnist-study uses on purpose (heartbeats
and their retry, artifacts, metric names): each use would otherwise warn on every call."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from optuna.exceptions import ExperimentalWarning


@contextmanager
def experimental_optuna() -> Iterator[None]:
    """Silences Optuna's `ExperimentalWarning` inside the block, and only that warning."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        yield
