"""What every benchmark records about where it ran, without importing torch: the study
benchmarks' parent processes may, but their worker processes must not
(`benchmarks/load.py`)."""

from __future__ import annotations

import datetime
import os
import platform
from pathlib import Path
from typing import Any


def cpu_model() -> str:
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model


def storage_run_header(backend: str) -> dict[str, Any]:
    """The head of a storage benchmark's JSON: the machine, when, and the versions."""
    import optuna

    return {
        "machine": f"{cpu_model()}, {os.cpu_count()} cores",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "backend": backend,
        "python": platform.python_version(),
        "optuna": optuna.__version__,
    }
