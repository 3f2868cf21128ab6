"""Choosing the device a trainer runs on, with a clear refusal for one that is not there."""

from __future__ import annotations

import torch

from model.errors import DeviceError


def resolve_device(name: str | None) -> torch.device:
    """`None` → the first GPU if there is one, else the CPU; else the named device, checked."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise DeviceError(f"device {name!r}: expected cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return device
    if device.type != "cuda":
        raise DeviceError(f"device {name!r}: only cpu and cuda devices are supported")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise DeviceError(f"device {name!r}: no CUDA GPU is available on this machine")
    index = 0 if device.index is None else device.index
    if index >= count:
        raise DeviceError(
            f"device {name!r}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}"
        )
    return torch.device("cuda", index)


def use_device(name: str | None) -> torch.device:
    """`resolve_device`, and a GPU made this thread's current CUDA device: a CUDA graph
    is captured on the current device, and cuBLAS handles, streams and generators are
    made there, so a worker on cuda:1 that left cuda:0 current would capture on the wrong
    one."""
    device = resolve_device(name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device
