"""Shared fixtures: tiny synthetic problems for unit tests, real MNIST for integration."""

from __future__ import annotations

import argparse
import itertools
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
import torch

from model.data import DeviceData, Mnist, default_root, load_mnist, present
from tests.pgserver import PgServer, why_unavailable
from tests.slurmcluster import SlurmCluster
from tests.slurmcluster import why_unavailable as slurm_unavailable

T = TypeVar("T")

# One torch thread for the whole session: with torch's default (every core), test_viz
# took over 300 s while another job used both cores, against 16 s on one thread. A test
# about threads sets its own; worker processes get theirs from `--threads`.
torch.set_num_threads(1)


def _keep_to_a_share_of_the_cpus() -> None:
    """Under pytest-xdist (`pytest -n N`), each of the N test processes keeps to its own
    share of the CPUs, and so do the processes its tests start. The worker tests' `run`
    sizes its workers' threads to the CPUs it may use (study.launcher.plan_workers): with
    every test process sizing them to all the CPUs, `-n 2` on 2 cores ran those tests 5 to
    8 times slower, and one past its 180 s timeout."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")  # gw0, gw1, ...
    if not worker.startswith("gw") or not hasattr(os, "sched_setaffinity"):
        return
    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    cpus = sorted(os.sched_getaffinity(0))
    # Worker i takes CPUs i, i + N, ...; with more workers than CPUs, they share them.
    os.sched_setaffinity(0, cpus[int(worker[2:]) % len(cpus) :: count])


_keep_to_a_share_of_the_cpus()

# torch.compile's code cached on disk once per kernel path. torch 2.14's cache does not tell
# them apart: after a run on the native path (AVX512 here), a run under
# ATEN_CPU_CAPABILITY=avx2 loaded its code and trained to nonsense (best epochs [1, 0, 0]
# against eager's [3, 3, 3]), one under `default` failed to compile it, and the reverse
# order crashed the process. Set before anything compiles, and inherited by the workers
# the tests start.
os.environ.setdefault(
    "TORCHINDUCTOR_CACHE_DIR",
    str(
        Path(tempfile.gettempdir())
        / f"torchinductor_{os.getuid()}_{torch.backends.cpu.get_cpu_capability().lower()}"
    ),
)


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The parser's commands, name to parser, in its order (argparse keeps them in a
    private action; the tests want the real flags)."""
    (action,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def synthetic_data(n: int = 240, seed: int = 0, *, learnable: bool = True) -> DeviceData:
    """n images in [0, 1] whose labels a small network can learn (or, if not `learnable`,
    random labels it can only memorise, so validation loss soon rises)."""
    generator = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=generator)
    noise = torch.rand(n, 784, generator=generator)
    if not learnable:
        return DeviceData(x=noise, y=y)
    # Each digit a fixed random image, seen through heavy noise.
    prototypes = torch.rand(10, 784, generator=generator)
    return DeviceData(x=0.3 * prototypes[y] + 0.7 * noise, y=y)


@pytest.fixture(scope="session")
def mnist() -> Mnist:
    """The real MNIST under $MNIST_ROOT or ./data; `make test` fetches it first."""
    root = default_root()
    if not present(root):
        pytest.fail(f"MNIST is not in {root}: run `make data` (make test does) first")
    return load_mnist(root)


def _throwaway(
    kind: str, required_by: str, reason: str | None, start: Callable[[], T]
) -> Iterator[T]:
    """A throwaway server started for the session, stopped after it (`close`); skipped
    with `reason`, visibly, where it cannot start here, or failed where `required_by` is
    set (CI)."""
    if reason and os.environ.get(required_by):
        pytest.fail(f"{required_by} is set but {reason}")
    if reason:
        pytest.skip(f"no {kind} for this test: {reason}")
    server = start()
    try:
        yield server
    finally:
        server.close()  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PgServer]:
    """One throwaway PostgreSQL server for the session (see tests/pgserver.py)."""
    yield from _throwaway("PostgreSQL", "MNIST_STUDY_REQUIRE_POSTGRES", why_unavailable(), PgServer)


@pytest.fixture(scope="session")
def slurm_cluster() -> Iterator[SlurmCluster]:
    """One throwaway one-node SLURM cluster for the session (see tests/slurmcluster.py)."""
    yield from _throwaway("SLURM", "MNIST_STUDY_REQUIRE_SLURM", slurm_unavailable(), SlurmCluster)


@pytest.fixture
def postgres_url(postgres_server: PgServer, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's server, named after the test."""
    name = "t_" + re.sub(r"[^a-z0-9]+", "_", request.node.name.lower())[:50]
    name = f"{name}_{next(_database_numbers)}"
    return postgres_server.create_database(name)


_database_numbers = itertools.count()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests of an xdist group (the SLURM tests, which share one cluster in one test
    process and take minutes, mostly waiting on their tasks) first: scheduled last, the
    other test processes would finish and idle beside them."""
    items.sort(key=lambda item: item.get_closest_marker("xdist_group") is None)
