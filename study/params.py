"""`--params`: strict JSON, inline or in a file, for `train`.

Python's json reads more than JSON (NaN, Infinity, integers of thousands of digits) and
says little about where a mistake is; a user gets one line naming what is wrong.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from study.errors import UsageError


def parse_params(text: str) -> dict[str, Any]:
    """`--params`: a JSON object given inline, or the path of a file holding one."""
    source = "--params"
    if not text.lstrip().startswith(("{", "[")) and _is_file(text):
        path = text
        try:
            text = Path(path).read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"--params file {path}: cannot read it ({exc})") from None
        source = f"--params file {path}"
    try:
        params = json.loads(
            text, parse_constant=_not_json, parse_float=_finite_float, parse_int=_short_int
        )
    except json.JSONDecodeError as exc:
        if not text.lstrip().startswith(("{", "[")):
            raise UsageError(
                f"--params {shorten(text)!r}: neither a JSON object nor a readable file"
            ) from None
        raise UsageError(
            f"{source}: bad JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except _NotJson as exc:
        raise UsageError(f"{source}: bad JSON: {exc}") from None
    except RecursionError:
        raise UsageError(f"{source}: bad JSON: nested too deeply") from None
    if not isinstance(params, dict):
        raise UsageError(f'{source}: must be a JSON object such as {{"n_units_l0": 300}}')
    return params


class _NotJson(ValueError):
    """A number Python's json reads but JSON has not: NaN, Infinity, or one that overflows."""


def _not_json(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON number")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _NotJson(f"{shorten(text)} is too large for a number")
    return value


def _short_int(text: str) -> int:
    # Python refuses to read integers of over 4300 digits with a ValueError of its own.
    if len(text) > 100:
        raise _NotJson(f"a whole number of {len(text)} digits is too large")
    return int(text)


def shorten(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


def _is_file(text: str) -> bool:
    """Whether `text` names a file; a name the system refuses (too long, say) names none."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False
