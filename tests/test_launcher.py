"""`run`'s plan of workers: which device each worker gets and how many CPU threads; and
a SLURM task's (`worker --each-gpu`), from the environment SLURM gives it.

The plan needs no GPU: CUDA's answers (is there one, how many) and the cores this process
may use are pinned here, so the same plan comes out on any machine.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Protocol

import pytest
import torch

from model.device import DeviceError
from study import launcher
from study.errors import UsageError
from study.launcher import RunOptions, plan_workers, task_devices, task_threads
from study.presets import PRESETS
from study.slurm import SlurmOptions, check_options, job_script, pinned_host
from study.worker import WorkerOptions


class SetMachine(Protocol):
    """Pins the machine a test's plan sees."""

    def __call__(self, *, gpus: int, cores: int) -> None: ...


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> SetMachine:
    """Sets the machine the plan sees: `gpus` visible CUDA devices and `cores` usable cores
    (read from the process's CPU affinity, as `run` under taskset or a container gets)."""

    def set_machine(*, gpus: int, cores: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
        # Were the affinity not read, the machine's own count would show in the plan.
        monkeypatch.setattr(os, "cpu_count", lambda: 1000)

    return set_machine


def test_workers_take_the_devices_in_turn_and_share_the_cores(machine: SetMachine) -> None:
    machine(gpus=2, cores=8)
    # 8 cores // 3 workers: 2 threads each (the remainder is left unused).
    assert plan_workers(("cuda:0", "cuda:1"), 3) == [("cuda:0", 2), ("cuda:1", 2), ("cuda:0", 2)]


def test_workers_per_device_puts_that_many_on_each_device_in_turn(machine: SetMachine) -> None:
    machine(gpus=2, cores=8)
    assert plan_workers(("cuda:0", "cuda:1"), None, 2) == [
        ("cuda:0", 2), ("cuda:1", 2), ("cuda:0", 2), ("cuda:1", 2),
    ]  # fmt: skip
    # The README's equivalent: --workers 4 --devices cuda:0,cuda:1.
    assert plan_workers(("cuda:0", "cuda:1"), 4) == plan_workers(("cuda:0", "cuda:1"), None, 2)


def test_workers_given_outright_override_workers_per_device(machine: SetMachine) -> None:
    """--workers-per-device counts only "when --workers is not given" (its help)."""
    machine(gpus=2, cores=8)
    assert plan_workers(("cuda:0", "cuda:1"), 1, 3) == [("cuda:0", 8)]


def test_by_default_one_worker_per_visible_gpu(machine: SetMachine) -> None:
    machine(gpus=3, cores=12)
    assert plan_workers(None, None) == [("cuda:0", 4), ("cuda:1", 4), ("cuda:2", 4)]
    assert plan_workers(None, None, 2) == [
        ("cuda:0", 2), ("cuda:1", 2), ("cuda:2", 2), ("cuda:0", 2), ("cuda:1", 2), ("cuda:2", 2),
    ]  # fmt: skip
    assert plan_workers(None, 2) == [("cuda:0", 6), ("cuda:1", 6)]


def test_without_a_gpu_the_workers_run_on_the_cpu_and_divide_its_cores(machine: SetMachine) -> None:
    machine(gpus=0, cores=2)
    assert plan_workers(None, None) == [("cpu", 2)]
    # The README's example: --workers 2 on two cores, two workers of one thread each.
    assert plan_workers(None, 2) == [("cpu", 1), ("cpu", 1)]


def test_every_worker_gets_at_least_one_thread(machine: SetMachine) -> None:
    machine(gpus=0, cores=2)
    assert plan_workers(("cpu",), 5) == [("cpu", 1)] * 5


def test_device_names_are_resolved_to_the_ones_workers_are_given(machine: SetMachine) -> None:
    machine(gpus=2, cores=4)
    # A bare "cuda" is the first GPU; the CPU can be one of the devices.
    assert plan_workers(("cuda", "cpu"), None) == [("cuda:0", 2), ("cpu", 2)]


def test_a_gpu_beyond_those_visible_is_refused(machine: SetMachine) -> None:
    machine(gpus=2, cores=4)
    with pytest.raises(DeviceError, match=r"'cuda:2': this machine has 2 CUDA GPU\(s\)"):
        plan_workers(("cuda:0", "cuda:2"), None)


@pytest.mark.parametrize(("cpu_count", "threads"), [(6, 3), (None, 1)])
def test_without_cpu_affinity_the_core_count_is_used(
    cpu_count: int | None, threads: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the OS has no sched_getaffinity (macOS, Windows); a count it cannot tell
    (None) is taken as one core."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: cpu_count)
    assert plan_workers(None, 2) == [("cpu", threads), ("cpu", threads)]


def test_a_worker_on_a_second_gpu_makes_it_the_current_device(
    machine: SetMachine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """CUDA graphs capture on the current device: a worker on cuda:1 must make it current,
    and a CPU worker must not touch CUDA."""
    from model.device import use_device

    machine(gpus=2, cores=8)
    made_current: list[torch.device] = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert use_device("cuda:1") == torch.device("cuda", 1)
    assert made_current == [torch.device("cuda", 1)]
    assert use_device("cpu") == torch.device("cpu")
    assert made_current == [torch.device("cuda", 1)]


# --- a SLURM task's workers (`worker --each-gpu`, which `run --slurm`'s script runs) -----


@pytest.mark.parametrize(
    ("env", "devices"),
    [
        ({"CUDA_VISIBLE_DEVICES": "0,1"}, ["cuda:0", "cuda:1"]),
        # The node's GPUs 2 and 5, shown to the task as its 0 and 1.
        ({"CUDA_VISIBLE_DEVICES": "2,5", "SLURM_JOB_GPUS": "2,5"}, ["cuda:0", "cuda:1"]),
        ({"CUDA_VISIBLE_DEVICES": "GPU-6f1e,GPU-a2c4,GPU-77b0"}, ["cuda:0", "cuda:1", "cuda:2"]),
        # Nothing hides the node's other GPUs: the task's own by their node indices.
        ({"SLURM_JOB_GPUS": "2,5"}, ["cuda:2", "cuda:5"]),
        ({"CUDA_VISIBLE_DEVICES": ""}, ["cpu"]),
        ({"CUDA_VISIBLE_DEVICES": "NoDevFiles"}, ["cpu"]),
        ({}, ["cpu"]),
    ],
    ids=["two", "remapped", "by-uuid", "job-gpus-only", "none-visible", "no-dev-files", "cpu"],
)
def test_a_slurm_task_runs_one_worker_per_gpu_it_was_given(
    env: dict[str, str], devices: list[str]
) -> None:
    assert task_devices(env) == devices


@pytest.mark.parametrize(
    ("env", "cores", "workers", "threads"),
    [
        ({"SLURM_CPUS_PER_TASK": "8"}, 64, 2, 4),  # the task's CPUs, not the node's
        ({"SLURM_CPUS_PER_TASK": "3"}, 64, 4, 1),  # at least one each
        ({}, 6, 2, 3),  # outside SLURM: the CPUs this process may use
        ({"SLURM_CPUS_PER_TASK": ""}, 5, 1, 5),
    ],
)
def test_a_task_s_cpus_are_shared_out_among_its_workers(
    env: dict[str, str], cores: int, workers: int, threads: int, machine: SetMachine
) -> None:
    machine(gpus=0, cores=cores)
    assert task_threads(env, workers) == threads


# Stands in for a worker: says it is ready, then writes the signals it is sent, ignoring
# SIGTERM as a worker with a parent does (`StopSignals.from_parent`), and exits 130 at the
# second SIGINT, as a worker stopped at once.
FAKE_WORKER = """
import pathlib, signal, sys, time
out, got = pathlib.Path(sys.argv[1]), []
def stop(signum, frame):
    got.append(signal.Signals(signum).name)
    out.write_text(" ".join(got))
    if len(got) == 2:
        sys.exit(130)
signal.signal(signal.SIGINT, stop)
signal.signal(signal.SIGTERM, signal.SIG_IGN)
out.write_text("ready")
while True:
    time.sleep(0.01)
"""


def test_each_gpu_starts_a_worker_per_device_and_passes_every_stop_on_as_sigint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SLURM's SIGTERM reaches the task's every process at once; the parent passes it on
    to each worker as SIGINT, once per signal it gets, and the workers count it once."""
    started: list[WorkerOptions] = []

    def fake_argv(options: WorkerOptions, *, quiet: bool = True) -> list[str]:
        started.append(options)
        return [sys.executable, "-c", FAKE_WORKER, str(tmp_path / options.device.replace(":", ""))]

    monkeypatch.setattr(launcher, "worker_argv", fake_argv)
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    files = [tmp_path / "cuda0", tmp_path / "cuda1"]

    def wait_for(text: str) -> None:
        deadline = time.monotonic() + 60
        while not all(f.exists() and f.read_text() == text for f in files):
            assert time.monotonic() < deadline, [f.read_text() for f in files if f.exists()]
            time.sleep(0.01)

    def stop_twice() -> None:
        wait_for("ready")
        os.kill(os.getpid(), signal.SIGTERM)
        wait_for("SIGINT")
        os.kill(os.getpid(), signal.SIGTERM)

    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stopper = threading.Thread(target=stop_twice)
    stopper.start()
    try:
        options = WorkerOptions(storage="sqlite:///x.db", study="s", data_root=tmp_path)
        code = launcher.run_worker_per_device(options, ["cuda:0", "cuda:1"], log=lambda _: None)
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
        stopper.join()
    assert code == 130
    assert [f.read_text() for f in files] == ["SIGINT SIGINT", "SIGINT SIGINT"]
    assert [(o.device, o.threads, o.parent_pid) for o in started] == [
        ("cuda:0", 3, os.getpid()),
        ("cuda:1", 3, os.getpid()),
    ]


# --- the job script `run --slurm` submits -------------------------------------------------


def test_the_job_script_holds_the_options_but_never_the_storage_url(tmp_path: Path) -> None:
    options = RunOptions(
        storage="postgresql+psycopg://me:pa55word@db.example.org/studies",
        study="mnist-seed",
        preset=PRESETS["seed"],
        data_root=Path("data"),
        heartbeat=7,
        artifacts=Path("shared/artifacts"),
    )
    slurm = SlurmOptions(sbatch=("--partition=gpu", "--gres=gpu:2", "--comment=two words"), tasks=4)
    script = job_script(options, slurm, tmp_path / "logs")
    assert "pa55word" not in script and "db.example.org" not in script
    lines = script.splitlines()
    assert lines[0] == "#!/bin/bash"
    directives = [line.removeprefix("#SBATCH ") for line in lines if line.startswith("#SBATCH ")]
    assert directives == [
        "--job-name=mnist-study-mnist-seed",
        "--array=0-3",
        f"--output={tmp_path / 'logs' / 'mnist-seed-%A_%a.out'}",
        "--open-mode=append",
        "--partition=gpu",
        "--gres=gpu:2",
        "'--comment=two words'",
    ]
    command = shlex.split(lines[-1])
    assert command[:5] == ["exec", sys.executable, "-m", "study", "worker"]
    assert command[-1] == "--each-gpu"
    flags = dict(zip(command[5:-1:2], command[6:-1:2], strict=True))
    assert flags == {
        "--study": "mnist-seed",
        "--heartbeat": "7",
        # Absolute: a task starts in the submitting folder only where sbatch is told so.
        "--root": str(Path("data").resolve()),
        "--artifacts": str(Path("shared/artifacts").resolve()),
    }
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0


@pytest.mark.parametrize(
    ("sbatch", "host"),
    [
        (("--nodelist=gpu07",), "gpu07"),
        (("--nodelist", "gpu07.cluster.org"), "gpu07"),
        (("-w", "gpu07"), "gpu07"),
        (("-wgpu07",), "gpu07"),
        (("--nodelist=gpu[07-08]",), None),  # several hosts
        (("--nodelist=gpu07,gpu08",), None),
        (("--partition=gpu",), None),
    ],
)
def test_an_array_pinned_to_one_host_is_told_from_the_sbatch_options(
    sbatch: tuple[str, ...], host: str | None
) -> None:
    assert pinned_host(sbatch) == host


def test_the_user_s_own_log_and_job_name_replace_the_script_s(tmp_path: Path) -> None:
    options = RunOptions(storage="postgresql+psycopg://h/db", study="s", preset=PRESETS["smoke"])
    slurm = SlurmOptions(sbatch=("-J", "mine", "--output=/scratch/%j.log"), tasks=2)
    directives = [
        line.removeprefix("#SBATCH ")
        for line in job_script(options, slurm, tmp_path).splitlines()
        if line.startswith("#SBATCH ")
    ]
    # An option and its value given apart (-J mine) share a line, as sbatch reads them.
    assert directives == [
        "--array=0-1",
        "--open-mode=append",
        "-J mine",
        "--output=/scratch/%j.log",
    ]


def test_sqlite_is_refused_for_an_array_unless_it_is_pinned_to_this_host() -> None:
    """The file is local to every task only when every task runs here."""
    options = RunOptions(storage="sqlite:///optuna.db", study="s", preset=PRESETS["smoke"])
    here = socket.gethostname().split(".")[0]
    check_options(options, SlurmOptions(sbatch=(f"--nodelist={here}",)))
    for sbatch in [(), ("--nodelist=elsewhere",), (f"--nodelist={here},elsewhere",)]:
        with pytest.raises(UsageError, match="use PostgreSQL"):
            check_options(options, SlurmOptions(sbatch=sbatch))
    postgres = RunOptions(storage="postgresql+psycopg://h/db", study="s", preset=PRESETS["smoke"])
    check_options(postgres, SlurmOptions())
