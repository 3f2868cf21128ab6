"""W&B's sweep distributions, as a study file's parameter tables give them, and what each
becomes in a study: the Optuna distribution it searches (its min/max range, its grid q,
its scale) and, where Optuna's random sampler would not draw it so, the prior that the
prior sampler draws it from (`study.priors`).

W&B's meaning, and this module's reading where W&B leaves a point open:
- `int_uniform`, `uniform`, `log_uniform_values`: uniform over [min, max] (integers, on
  the line, on the log), drawn by Optuna's random sampler as they are; so is
  `q_log_uniform_values` for a layer's units, as log-uniform integers (q = 1: Optuna's
  log-scale integers take no step);
- `q_uniform`: round(U(min, max) / q) · q;
- `normal`, `q_normal`: N(mu, sigma), rounded to q; `log_normal`, `q_log_normal`:
  exp(N(mu, sigma)), mu and sigma of the log, rounded to q;
- `min` and `max` on a normal or a log-normal: redrawn until inside them (the report's
  rule). Without them, the parameter's whole range, what the trainer accepts: a study at
  random can draw from that, TPE, which searches a range, cannot (`study.study_file`);
- a `q_` distribution's min and max are multiples of q, so that W&B's grid (multiples of
  q) and Optuna's (min + k · q) are the same values.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from optuna.distributions import FloatDistribution, IntDistribution

from model.config import MAX_LR, MAX_NORM, MAX_UNITS, MAX_WEIGHT_DECAY, ConfigError
from study.priors import GaussianPrior, LogNormalPrior, Prior, UniformPrior

# W&B's distributions, each with the keys it takes (`rule` and `r`: the compression rule,
# [parameters.units] only).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "int_uniform": ("min", "max"),
    "uniform": ("min", "max"),
    "q_uniform": ("min", "max", "q"),
    "log_uniform_values": ("min", "max"),
    "q_log_uniform_values": ("min", "max", "q"),
    "normal": ("mu", "sigma", "min", "max"),
    "q_normal": ("mu", "sigma", "q", "min", "max", "rule", "r"),
    "log_normal": ("mu", "sigma", "min", "max"),
    "q_log_normal": ("mu", "sigma", "q", "min", "max"),
}
# What a layer's units may be drawn from (its own table, [parameters.n_units_l<i>]), and
# a continuous parameter: every distribution that makes sense for its range.
UNITS_DISTRIBUTIONS = ("q_normal", "int_uniform", "q_uniform", "q_log_uniform_values",
                       "q_log_normal")  # fmt: skip
RANGE_DISTRIBUTIONS = ("uniform", "q_uniform", "normal", "q_normal", "log_uniform_values",
                       "log_normal", "q_log_normal")  # fmt: skip
# The ones whose range is min and max themselves; the normals may leave them out.
_RANGED = ("int_uniform", "uniform", "q_uniform", "log_uniform_values", "q_log_uniform_values")

# The float next to an open end, so that a whole range holds only values the trainer takes.
_ABOVE_ZERO = math.nextafter(0.0, 1.0)
_BELOW_ONE = math.nextafter(1.0, 0.0)
# Each parameter's whole range, what the trainer accepts (model/config.py), as closed
# bounds and as the trainer writes it: where a normal or log-normal has no min and max,
# it is redrawn until inside this.
WHOLE_RANGES: dict[str, tuple[float, float, str]] = {
    "units": (1, MAX_UNITS, f"[1, {MAX_UNITS}]"),
    "dropout": (0.0, _BELOW_ONE, "[0, 1)"),
    "input_dropout": (0.0, _BELOW_ONE, "[0, 1)"),
    "label_smoothing": (0.0, _BELOW_ONE, "[0, 1)"),
    "max_norm": (_ABOVE_ZERO, MAX_NORM, f"(0, {MAX_NORM:g}]"),
    "lr": (_ABOVE_ZERO, MAX_LR, f"(0, {MAX_LR:g}]"),
    "sgd_lr": (_ABOVE_ZERO, MAX_LR, f"(0, {MAX_LR:g}]"),
    "weight_decay": (0.0, MAX_WEIGHT_DECAY, f"[0, {MAX_WEIGHT_DECAY:g}]"),
}


@dataclass(frozen=True)
class Drawn:
    """A parameter that its file gives a distribution of its own: what a study searches
    (`distribution`, what TPE and the storage see) and what the prior sampler draws."""

    given: str  # the file's distribution
    distribution: IntDistribution | FloatDistribution
    prior: Prior | None = None  # None: Optuna's random sampler draws `distribution`
    # Without min and max: the whole range, as `WHOLE_RANGES` writes it.
    whole_range: str = ""

    def text(self) -> str:
        """The prior, as the tables print it: "N(256, 64) rounded, in [1, 784]"."""
        d = self.distribution
        where = f"[{d.low:g}, {d.high:g}]"
        if self.whole_range:
            where = f"the whole range {self.whole_range}"
        prior = "" if self.prior is None else self.prior.text()
        if d.step is None:
            grid = ""
        elif d.step == 1 and isinstance(d, IntDistribution):
            grid = " rounded"
        else:
            grid = f" rounded to multiples of {d.step:g}"
        return f"{prior}{grid}, in {where}"


def drawn(name: str, table: Mapping[str, Any], kind: str, where: str) -> Drawn:
    """What `table`, the file's table of a layer's units (`name` "units") or of the
    continuous parameter `name`, searches and draws; `kind` is its distribution, one of
    those the parameter takes. Every error names the key and what would be right."""
    integer = name == "units"
    keys = tuple(k for k in DISTRIBUTIONS[kind] if k not in ("rule", "r"))
    for key in table:
        if key not in (*keys, "distribution", "when"):
            raise ConfigError(f"{where}: {kind} takes {', '.join(keys)}; not {key!r}")
    mu = sigma = None
    if "mu" in keys:
        if "mu" not in table or "sigma" not in table:
            raise ConfigError(f"{where}: {kind} needs mu and sigma")
        mu, sigma = _finite(table, "mu", where), _finite(table, "sigma", where)
        if sigma <= 0:
            raise ConfigError(f"{where}.sigma = {table['sigma']!r}: must be a number above 0")
    q = _q(table, kind, where, integer=integer)
    low, high, whole = _range(name, table, kind, q, where, integer=integer)
    logs = kind in ("log_uniform_values", "q_log_uniform_values", "log_normal", "q_log_normal")
    if kind.startswith("log_uniform") and low <= 0:
        raise ConfigError(f"{where}: min = {low}: a log-uniform range needs min > 0")
    if logs and low < 0:
        raise ConfigError(f"{where}: min = {low}: a log-normal's values are above 0, so min ≥ 0")
    # On a log scale for TPE where Optuna allows one: above 0, and with no step but 1.
    log = logs and low > 0 and (q is None or (integer and q == 1))
    if integer:
        distribution: IntDistribution | FloatDistribution = IntDistribution(
            int(low), int(high), step=int(q or 1), log=log
        )
    else:
        distribution = FloatDistribution(low, high, step=q, log=log)
    prior: Prior | None = None
    if kind in ("normal", "q_normal"):
        prior = GaussianPrior(mu, sigma)  # type: ignore[arg-type]
    elif kind in ("log_normal", "q_log_normal"):
        prior = LogNormalPrior(mu, sigma)  # type: ignore[arg-type]
    elif kind == "q_uniform":
        prior = UniformPrior(float(low), float(high))
    return Drawn(kind, distribution, prior, whole)


def _q(table: Mapping[str, Any], kind: str, where: str, *, integer: bool) -> Any:
    """The grid step: W&B's q (default 1) for a `q_` distribution, else None."""
    if not kind.startswith("q_"):
        return None
    q = table.get("q", 1)
    if integer:
        if isinstance(q, bool) or not isinstance(q, int) or q < 1:
            raise ConfigError(
                f"{where}.q = {q!r}: must be a whole number of at least 1 (a width's grid)"
            )
        if kind == "q_log_uniform_values" and q != 1:
            raise ConfigError(
                f"{where}.q = {q}: log-uniform integers take no other step (Optuna's): q = 1"
            )
        return q
    q = _finite(table, "q", where) if "q" in table else 1.0
    if q <= 0:
        raise ConfigError(f"{where}.q = {table['q']!r}: must be a number above 0")
    return q


def _range(
    name: str, table: Mapping[str, Any], kind: str, q: Any, where: str, *, integer: bool
) -> tuple[Any, Any, str]:
    """(low, high, the whole range's text or "") that the parameter's draws keep to."""
    given = [key in table for key in ("min", "max")]
    if not all(given):
        if kind in _RANGED:
            raise ConfigError(f"{where}: {kind} needs min and max")
        if any(given):
            raise ConfigError(f"{where}: give both min and max, or neither (the whole range)")
        low, high, text = WHOLE_RANGES[name]
        if q is not None:  # the multiples of q inside the whole range
            step = Decimal(str(q))
            first, last = math.ceil(Decimal(str(low)) / step), math.floor(Decimal(str(high)) / step)
            if first > last:
                raise ConfigError(
                    f"{where}.q = {q}: no multiple of q lies in the whole range {text}; "
                    "give min and max"
                )
            low, high = (first * q, last * q) if integer else (float(first * step),
                                                                float(last * step))  # fmt: skip
        return low, high, text
    for key in ("min", "max"):
        value = table[key]
        if integer and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"{where}.{key} = {value!r}: must be a whole number")
        if not integer:
            _finite(table, key, where)
    low, high = table["min"], table["max"]
    if low > high:
        raise ConfigError(f"{where}: min = {low} is greater than max = {high}")
    if q is not None:
        for key, value in (("min", low), ("max", high)):
            if Decimal(str(value)) % Decimal(str(q)) != 0:
                raise ConfigError(
                    f"{where}: {key} = {value} is not a multiple of q = {q} (a {kind}'s "
                    "values are the multiples of q)"
                )
    return (low, high, "") if integer else (float(low), float(high), "")


def _finite(table: Mapping[str, Any], key: str, where: str) -> float:
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{where}.{key} = {value!r}: must be a finite number")
    return float(value)
