"""`run`'s plan of workers: which device each worker gets and how many CPU threads.

The plan needs no GPU: CUDA's answers (is there one, how many) and the cores this process
may use are pinned here, so the same plan comes out on any machine.
"""

from __future__ import annotations

import os
from typing import Protocol

import pytest
import torch

from model.device import DeviceError
from study.launcher import plan_workers


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
