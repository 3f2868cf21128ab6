"""Every command on a real PostgreSQL server, as the README's multi-host steps run them,
with the password kept out of everything a user or a reader of the study can see.

The server is the session's throwaway one (tests/pgserver.py); the two "hosts" are two
processes with their own working folders sharing one database and one artifact folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from model.data import Mnist, default_root
from study.database import open_storage
from study.studies import load_study
from tests.pgserver import PASSWORD, PgServer, free_port

WAIT_S = 240


def mnist_study(
    *args: str, cwd: Path, storage: str | None = None, wait: bool = True
) -> subprocess.CompletedProcess | subprocess.Popen:
    command = [sys.executable, "-m", "study", *args]
    env = {**os.environ, "MNIST_ROOT": str(default_root().resolve())}
    if storage is not None:
        env["MNIST_STUDY_STORAGE"] = storage
    if not wait:
        return subprocess.Popen(
            command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=WAIT_S)  # fmt: skip


def no_password_in(*texts: str) -> None:
    for text in texts:
        assert PASSWORD not in text
        assert "Traceback" not in text, text


def test_the_readme_multi_host_steps_work_on_postgresql(
    postgres_url: str, tmp_path: Path, mnist: Mnist
) -> None:
    url = postgres_url
    host1, host2, anywhere = (tmp_path / name for name in ("host1", "host2", "anywhere"))
    shared = tmp_path / "shared-artifacts"
    for folder in (host1, host2, anywhere, shared):
        folder.mkdir()
    artifacts = ("--artifacts", str(shared))

    # 1. The first host creates the study and runs its own worker. (Beside another test
    # process, on one CPU, it once ran all six trials while the second host's worker was
    # starting: `make test` runs this file on its own.)
    first = mnist_study(
        "run", "--preset", "smoke", "--n-trials", "6", "--workers", "1", "--seed", "11",
        "--storage", url, *artifacts, cwd=host1, wait=False,
    )  # fmt: skip
    deadline = time.monotonic() + WAIT_S
    while True:  # the study exists once `status` can read it
        probe = mnist_study("status", "--study", "mnist-smoke", "--storage", url, cwd=anywhere)
        if probe.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # 2. Another host joins with a worker of its own.
    second = mnist_study(
        "worker", "--study", "mnist-smoke", "--storage", url, "--device", "cpu", "--threads", "1",
        *artifacts, cwd=host2, wait=False,
    )  # fmt: skip
    first_out, first_err = first.communicate(timeout=WAIT_S)
    second_out, second_err = second.communicate(timeout=WAIT_S)
    assert first.returncode == 0, first_err
    assert second.returncode == 0, second_err
    assert "report: reports/mnist-smoke/index.html" in first_out

    # 3. status, retrain and report from anywhere; the dashboard too.
    status = mnist_study("status", "--study", "mnist-smoke", "--storage", url, "--json",
                         cwd=anywhere)  # fmt: skip
    assert status.returncode == 0, status.stderr
    counts = json.loads(status.stdout)["mnist-smoke"]
    assert 6 <= counts["finished"] <= 7 and counts["running"] == 0
    study = load_study(open_storage(url, heartbeat=None), "mnist-smoke")
    workers = {t.user_attrs["worker"].split(" ")[0] for t in study.trials}
    assert len(workers) == 2, (workers, second_err, first_err)  # both hosts ran trials

    # The same URL from the environment, as the README suggests.
    report = mnist_study("report", "--study", "mnist-smoke", *artifacts, cwd=anywhere,
                         storage=url)  # fmt: skip
    assert report.returncode == 0, report.stderr
    page = (anywhere / "reports" / "mnist-smoke" / "index.html").read_text()
    assert "learning curves" in page.lower()
    # The checkpoint host 1 wrote is found from this folder: its pictures are on the page.
    assert "<h2>Receptive fields of the output neurons" in page
    metrics = (host1 / "runs" / "mnist-smoke" / "metrics.json").read_text()

    no_password_in(
        first_out, first_err, second_out, second_err, status.stdout, status.stderr,
        report.stdout, report.stderr, page, metrics, json.dumps(study.user_attrs),
        *(json.dumps(t.user_attrs) + json.dumps(t.system_attrs) for t in study.trials),
    )  # fmt: skip

    port = free_port()
    dashboard = mnist_study("dashboard", "--storage", url, "--port", str(port), *artifacts,
                            cwd=anywhere, wait=False)  # fmt: skip
    try:
        summaries = None
        deadline = time.monotonic() + 60
        while summaries is None and time.monotonic() < deadline:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies") as answer:
                    summaries = json.load(answer)["study_summaries"]
            except OSError:
                time.sleep(0.3)
        assert summaries is not None and [s["study_name"] for s in summaries] == ["mnist-smoke"]
    finally:
        dashboard.send_signal(signal.SIGINT)
        out, err = dashboard.communicate(timeout=30)
    no_password_in(out, err)
    assert "127.0.0.1" in err and "***" in err


def test_a_wrong_password_is_one_line_that_shows_no_password(
    postgres_server: PgServer, postgres_url: str, tmp_path: Path
) -> None:
    wrong = postgres_server.url(postgres_url.rsplit("/", 1)[1], password="not-the-password")
    proc = mnist_study("status", "--storage", wrong, cwd=tmp_path)
    assert proc.returncode == 1
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "password authentication failed" in lines[0]
    assert "not-the-password" not in proc.stderr and PASSWORD not in proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("command", ["status", "worker", "report"])
def test_a_study_missing_from_the_database_lists_what_is_there(
    command: str, postgres_url: str, tmp_path: Path
) -> None:
    empty = mnist_study(command, "--study", "nope", "--storage", postgres_url, cwd=tmp_path)
    assert empty.returncode == 2
    assert "no study named 'nope'" in empty.stderr and "it holds no studies" in empty.stderr
    assert PASSWORD not in empty.stderr and "***" in empty.stderr
