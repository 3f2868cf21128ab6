"""Checkpoints: a network's weights beside the configuration that rebuilds it.

Saved as plain tensors and JSON-like values, so `torch.load(weights_only=True)` reads
them — a checkpoint from elsewhere cannot run code — and no study is needed to rebuild it.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from model.config import TrainConfig
from model.errors import CheckpointError, CheckpointMissing, ConfigError, first_line
from model.network import FFNN

FORMAT = "mnist-study/ffnn-1"


# torch names the global a refused pickle asked for, e.g. "unsupported GLOBAL posix.system".
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


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
        raise CheckpointMissing(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as exc:
        # torch's own text advises weights_only=False, the one thing not to do with this file.
        refused = _REFUSED_GLOBAL.search(str(exc))
        what = f"it asks to load {refused.group(1)}" if refused else _first_sentence(exc)
        raise CheckpointError(
            f"{path}: not a checkpoint that loads safely ({what}; an mnist-study checkpoint "
            "holds only tensors and plain values, so it was altered or is not ours); "
            "run `mnist-study retrain` to write it again"
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise CheckpointError(
            f"{path}: damaged checkpoint ({_first_sentence(exc)}); "
            "run `mnist-study retrain` to write it again"
        ) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path}: not an mnist-study checkpoint ({FORMAT})")
    try:
        config = TrainConfig().with_params(payload["config"])
        model = FFNN(config.hidden, config.activation, config.dropout, config.input_dropout)
        model.load_state_dict(payload["state_dict"])
        meta = dict(payload.get("meta", {}))
    except (ConfigError, KeyError, RuntimeError, TypeError, ValueError, AttributeError) as exc:
        # load_state_dict lists every mismatched key on lines of their own.
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(f"{path}: damaged checkpoint ({detail})") from None
    return model.eval(), config, meta


def _first_sentence(exc: BaseException) -> str:
    """torch's load errors run to a paragraph; the first sentence says what broke."""
    return first_line(exc).split(". ")[0].rstrip(".")
