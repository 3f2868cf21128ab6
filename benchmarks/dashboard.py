"""`mnist-study dashboard` (upstream optuna-dashboard) on a study of many trials: does it
open, and how long does it take?

    python -m benchmarks.dashboard [--sizes 1000,10000,100000] [--timeout 300] [--json FILE]

For each size a study is made and filled as `benchmarks.scale` fills it (`fill`: finished
trials shaped as the quick preset's, 30 intermediate values each), in an SQLite database
of its own. `mnist-study dashboard` is started on it as a process of its own, and timed
over HTTP, from the process's start:
- until `/api/studies` answers (the list the dashboard's first page asks for);
- the study's `/api/studies/<id>` (what its page asks first: every trial, whole): seconds
  and bytes;
- `/api/studies/<id>?after=N`, N all the trials, once optuna-dashboard's 10-second cache
  of the trials has run out: what each later poll of an open study page costs (the page
  polls every few seconds, and the server reads every trial again to answer it).
Each request gives up after `--timeout` seconds. No timing is a target: this says whether
upstream optuna-dashboard copes, for the README.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import optuna

from benchmarks.machine import storage_run_header
from benchmarks.scale import ROOT, STUDY, fill, parse_sizes
from study.database import open_storage
from study.presets import PRESETS
from study.studies import create_or_resume

SIZES = (1_000, 10_000, 100_000)
TIMEOUT_S = 300.0
# optuna-dashboard keeps a study's trials this long before reading them all again
# (`optuna_dashboard._storage.get_trials`, for studies of 500 trials or more).
CACHE_S = 10.0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str, deadline: float) -> bytes:
    """The body of `url`, waiting for the server to listen, until `deadline` (monotonic);
    TimeoutError past it."""
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(url)
        try:
            with urllib.request.urlopen(url, timeout=left) as response:
                return bytes(response.read())
        except urllib.error.URLError as exc:
            if isinstance(exc.reason, TimeoutError):
                raise TimeoutError(url) from None
            if not isinstance(exc.reason, ConnectionRefusedError):
                raise
            time.sleep(0.1)  # not listening yet
        except TimeoutError:
            raise TimeoutError(url) from None


def measure(url: str, n: int, timeout: float) -> dict[str, Any]:
    """Fill a study of `n` trials at `url`, serve it, and time the dashboard's requests."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, create=True)
    study, _ = create_or_resume(storage, STUDY, PRESETS["quick"], budget=n, seed=1)
    began = time.perf_counter()
    fill(storage, study, n)
    out: dict[str, Any] = {"trials": n, "fill_seconds": time.perf_counter() - began}
    study_id = study._study_id
    storage.engine.dispose()

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.monotonic()
    server = subprocess.Popen(
        [sys.executable, "-m", "study", "dashboard", "--storage", url, "--port", str(port)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seconds: dict[str, float | None] = {"studies": None, "study": None, "poll": None}
    sizes: dict[str, int | None] = {"study": None, "poll": None}
    try:
        get(f"{base}/api/studies", started + timeout)
        seconds["studies"] = time.monotonic() - started
        asked = time.monotonic()
        body = get(f"{base}/api/studies/{study_id}", asked + timeout)
        answered = time.monotonic()
        seconds["study"], sizes["study"] = answered - asked, len(body)
        trials = len(json.loads(body)["trials"])
        out["trials_answered"] = trials
        time.sleep(max(0.0, answered + CACHE_S + 1 - time.monotonic()))
        asked = time.monotonic()
        body = get(f"{base}/api/studies/{study_id}?after={trials}", asked + timeout)
        seconds["poll"], sizes["poll"] = time.monotonic() - asked, len(body)
    except TimeoutError as exc:
        out["timed_out"] = f"no answer to {exc} within {timeout:.0f} s"
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    out["seconds"] = seconds
    out["bytes"] = sizes
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.dashboard", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in SIZES),
        help="trials in each study, comma-separated (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--timeout", type=float, default=TIMEOUT_S, help="seconds each request may take"
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    sizes = parse_sizes(parser, args.sizes)
    import optuna_dashboard

    out: dict[str, Any] = {
        **storage_run_header("sqlite"),
        "optuna_dashboard": optuna_dashboard.__version__,
        "timeout_seconds": args.timeout,
        "results": [],
    }
    print(f"{out['machine']}, optuna-dashboard {out['optuna_dashboard']}", flush=True)
    with tempfile.TemporaryDirectory(prefix="dashboard-") as folder:
        for n in sorted(sizes):
            result = measure(f"sqlite:///{Path(folder) / f'dashboard-{n}.db'}", n, args.timeout)
            out["results"].append(result)
            s, b = result["seconds"], result["bytes"]
            gave_up = f"; {result['timed_out']}" if "timed_out" in result else ""
            print(
                f"{n:,} trials: /api/studies {_s(s['studies'])}, the study {_s(s['study'])} "
                f"({_mb(b['study'])}), a poll after the cache {_s(s['poll'])} "
                f"({_mb(b['poll'])}){gave_up}",
                flush=True,
            )
            if args.json:
                args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


def _s(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.2f} s"


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.2f} MB"


if __name__ == "__main__":
    sys.exit(main())
