"""Checkpoints: a network's weights beside the configuration that rebuilds it.

Saved as plain tensors and JSON-like values, so `torch.load(weights_only=True)` reads
them — a checkpoint from elsewhere cannot run code — and no study is needed to rebuild it.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch

from model.config import ConfigError, TrainConfig
from model.network import FFNN

FORMAT = "mnist-study/ffnn-1"


class CheckpointError(RuntimeError):
    """The file is not a checkpoint this program wrote, or it was altered."""


def save_checkpoint(path: Path, model: FFNN, config: TrainConfig, meta: dict[str, Any]) -> None:
    """Write `model` with `config` (in the study's parameter names) and `meta` (plain values)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": FORMAT,
        "config": config.params(),
        "meta": meta,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    partial = path.with_name(path.name + ".partial")
    torch.save(payload, partial)
    partial.replace(path)


def load_checkpoint(path: Path) -> tuple[FFNN, TrainConfig, dict[str, Any]]:
    """The network (on the CPU, eval mode), its configuration and the saved `meta`."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: not a checkpoint that loads safely ({first})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mnist-study checkpoint ({FORMAT})")
    try:
        config = TrainConfig().with_params(payload["config"])
        model = FFNN(config.hidden, config.activation, config.dropout)
        model.load_state_dict(payload["state_dict"])
    except (ConfigError, KeyError, RuntimeError, TypeError) as exc:
        raise CheckpointError(f"{path}: damaged checkpoint ({exc})") from None
    return model.eval(), config, dict(payload.get("meta", {}))
