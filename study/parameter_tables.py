"""A study file's `[parameters]` tables, read into a `SearchSpace` and checked, so that
every trial a study draws from them makes a configuration the trainer accepts.

One table per searched parameter, as W&B's sweeps write them (`study.distributions` has
the distributions' own rules): `n_layers`; `units`, every layer's widths at once (the
report's compression rule, or log-uniform widths), or each layer's own,
`n_units_l0`, `n_units_l1`, ...; the choices (`activation`, ...); the continuous
parameters (`dropout`, `lr`, ...). The checks: each layer has one table; a prior puts
enough of its mass in its range for its draws to land there; a parameter asked for only
in some trials says when (`when`), as the space implies; the ends of every range make a
valid configuration; a TPE study searches ranges only. Each error is a `ConfigError` of
one line naming the key and what would be right (`study.study_file` adds the file's name).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from model.config import MAX_UNITS, N_CLASSES, N_INPUTS, ConfigError, TrainConfig
from study.distributions import (
    DISTRIBUTIONS,
    RANGE_DISTRIBUTIONS,
    UNITS_DISTRIBUTIONS,
    Drawn,
    drawn,
)
from study.priors import GaussianPrior, LogNormalPrior, mass_inside
from study.space import SearchSpace

if TYPE_CHECKING:
    from optuna.distributions import FloatDistribution, IntDistribution

PARAMETER_KEYS = ("value", "values", "probabilities", "distribution", "when")

# Each continuous parameter, with the distribution that its SearchSpace field means (Optuna's
# random sampler draws it as it is); the rest of `RANGE_DISTRIBUTIONS` it takes as a
# distribution of its own (`SearchSpace.own`).
RANGES = {
    "dropout": "uniform",
    "input_dropout": "uniform",
    "label_smoothing": "uniform",
    "max_norm": "uniform",
    "lr": "log_uniform_values",
    "sgd_lr": "log_uniform_values",
    "weight_decay": "log_uniform_values",
}
CHOICES = ("activation", "optimizer", "schedule", "batch_size", "use_max_norm")
PARAMETERS = ("n_layers", "units", *CHOICES, *RANGES)
# A layer's own table: n_units_l0, n_units_l1, ... (no leading zeros: one name a layer).
LAYER = re.compile(r"n_units_l(0|[1-9][0-9]*)")
# The report's own parameters may be fixed in the file; their value then goes to [train].
FIXABLE = {"activation", "optimizer", "dropout", "lr", "weight_decay"}


def read_parameters(parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the settings it fixes, for [train]; the fields of its `SearchSpace`) from the
    file's [parameters], every key checked."""
    only_keys({k: v for k, v in parameters.items() if not LAYER.fullmatch(k)}, PARAMETERS,
              "[parameters]", known=("n_layers", "units", "n_units_l0", "n_units_l1", "...",
                                     *CHOICES, *RANGES))  # fmt: skip
    for key, table in parameters.items():
        if not isinstance(table, dict):
            raise ConfigError(f"parameters.{key}: must be a table, as [parameters.{key}]")
        only_keys(table, (*PARAMETER_KEYS, *{k for ks in DISTRIBUTIONS.values() for k in ks}),
                  f"[parameters.{key}]")  # fmt: skip
    return _space(parameters)


def check_space(
    space: SearchSpace, parameters: dict[str, Any], defaults: TrainConfig, sampler: str
) -> None:
    """That the space the tables made can be drawn, and every draw trained."""
    _check_priors(space)
    _check_conditions(space, parameters)
    # A space's draws must make valid configurations: check the corners of every range.
    _check_corners(space, defaults)
    if sampler == "prior_then_tpe":
        for key, own in space.own:
            if own.whole_range:
                raise ConfigError(
                    f"parameters.{key}: a prior_then_tpe study hands it to TPE after its "
                    "prior trials, and TPE searches a range: give it min and max"
                )


def _space(parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fixed settings for [train], SearchSpace fields) from the parameter tables."""
    fixed: dict[str, Any] = {}
    # What the file leaves out is not searched (the [train] setting stands), whatever the
    # report's space searches.
    space: dict[str, Any] = {
        "activations": (), "optimizers": (), "dropout": None, "lr": None, "weight_decay": None
    }  # fmt: skip
    own: dict[str, Drawn] = {}
    fixed_units: dict[int, int] = {}
    for key, table in parameters.items():
        where = f"parameters.{key}"
        kind = _kind(table, where)
        if LAYER.fullmatch(key):
            if kind == "value":
                only_keys(table, ("value", "when"), f"[{where}]")
                fixed_units[_layer(key)] = int_value(table["value"], f"{where}.value", 1, MAX_UNITS)
            elif kind in UNITS_DISTRIBUTIONS:
                own[key] = drawn("units", table, kind, where)
            else:
                raise ConfigError(
                    f"{where}: a width is a whole number: a value, or distribution = one of "
                    f"{', '.join(UNITS_DISTRIBUTIONS)} (not {kind})"
                )
        elif key == "n_layers":
            if kind == "value":
                space["n_layers"] = int_value(table["value"], f"{where}.value", 1)
            elif kind == "int_uniform":
                low, high = _bounds(table, where, integers=True)
                space["min_layers"], space["n_layers"] = low, high
            else:
                raise ConfigError(f'{where}: a value, or distribution = "int_uniform"')
        elif key == "units":
            space.update(_units(table, kind, where))
        elif key == "use_max_norm":
            # The max-norm cap's on/off switch: searched exactly when the cap is.
            if kind != "values" or "max_norm" not in parameters:
                raise ConfigError(
                    f"{where}: values = [false, true], and only beside [parameters.max_norm]"
                )
            _choices(key, table, where)
        elif key in CHOICES:
            if kind == "value" and key in FIXABLE:
                fixed[key] = table["value"]
                space[_field(key)] = ()
            elif kind == "values":
                space[_field(key)] = _choices(key, table, where)
            else:
                raise ConfigError(
                    f"{where}: a list of values" + (", or a value" if key in FIXABLE else "")
                )
        else:
            if kind == "value" and key in FIXABLE:
                fixed[key] = table["value"]
                space[key] = None
            elif kind == RANGES[key]:  # the form files had before; read as it always was
                space[key] = _bounds(table, where, integers=False)
                if kind == "log_uniform_values" and space[key][0] <= 0:
                    raise ConfigError(
                        f"{where}: min = {table['min']}: a log-uniform range needs min > 0"
                    )
            elif kind in RANGE_DISTRIBUTIONS:
                own[key] = drawn(key, table, kind, where)
                space[key] = (own[key].distribution.low, own[key].distribution.high)
            else:
                raise ConfigError(
                    f"{where}: distribution = one of {', '.join(RANGE_DISTRIBUTIONS)}"
                    + (", or a value" if key in FIXABLE else "")
                    + f" (not {kind})"
                )
    _layers(parameters, space)
    space["own"] = tuple(own.items())
    space["fixed_units"] = tuple(sorted(fixed_units.items()))
    if "max_norm" in parameters and "use_max_norm" not in parameters:
        raise ConfigError(
            "parameters.max_norm: the cap is searched on and off: add [parameters.use_max_norm] "
            "with values = [false, true]"
        )
    return fixed, space


def _layers(parameters: dict[str, Any], space: dict[str, Any]) -> None:
    """Every layer of the deepest network has exactly one table: its own, or
    [parameters.units]; without [parameters.n_layers], the layers' own tables say the
    depth (set in `space`)."""
    given = sorted(_layer(key) for key in parameters if LAYER.fullmatch(key))
    if "units" in parameters:
        if given:
            raise ConfigError(
                f"parameters.n_units_l{given[0]}: the layer is given twice, by "
                f"[parameters.units] (every layer's) and by [parameters.n_units_l{given[0]}]: "
                "keep one"
            )
        return
    if not given:
        raise ConfigError(
            "[parameters.units]: missing: a study searches its layers' widths (or give "
            "each layer its own, [parameters.n_units_l0], ...)"
        )
    # Without [parameters.n_layers], as deep as the layers the file gives.
    depth = space.setdefault("n_layers", given[-1] + 1)
    if given[-1] >= depth:
        raise ConfigError(
            f"parameters.n_units_l{given[-1]}: this space has at most {depth} layer"
            f"{'s' if depth > 1 else ''} (n_units_l0 to n_units_l{depth - 1}); remove it, or "
            "search deeper with [parameters.n_layers]"
        )
    for i in range(depth):
        if i not in given:
            raise ConfigError(
                f"parameters.n_units_l{i}: missing: a {depth}-layer network needs each "
                f"layer's units: give [parameters.n_units_l{i}] (or [parameters.units] for "
                "every layer)"
            )


def _layer(key: str) -> int:
    """The layer whose own table `key` is (n_units_l2: 2)."""
    return int(LAYER.fullmatch(key).group(1))  # type: ignore[union-attr]


def _units(table: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    if kind == "q_normal":
        if table.get("rule") != "compression":
            raise ConfigError(
                f'{where}: a q_normal over every layer needs rule = "compression" (the '
                "report's priors, one mu and sigma a layer); for a mu and sigma of your own, "
                "give each layer its own table: [parameters.n_units_l0], ..."
            )
        for key in ("mu", "sigma"):
            if key in table:
                raise ConfigError(f"{where}.{key}: the compression rule gives each layer its own")
        _q_one(table, where)
        low, high = _bounds(table, where, integers=True)
        r = table.get("r", N_CLASSES / N_INPUTS)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise ConfigError(f"{where}.r = {r!r}: must be a number in (0, 1)")
        return {"units_low": low, "units_high": high, "units_log": False, "compression_r": r}
    if kind == "q_log_uniform_values":
        _q_one(table, where)
        low, high = _bounds(table, where, integers=True)
        return {"units_low": low, "units_high": high, "units_log": True}
    raise ConfigError(
        f'{where}: distribution = "q_normal" with rule = "compression", or '
        f'"q_log_uniform_values", each with q = 1, min and max (not {kind}); any other '
        "goes in each layer's own table, [parameters.n_units_l0], ..."
    )


# The least share of a prior's mass that [min, max] must hold: below it, most draws are
# redrawn and the sampler gives up (`study.sampler`'s 10,000 redraws) on the rest.
LEAST_PRIOR_MASS = 1e-3


def _check_priors(space: SearchSpace) -> None:
    own = dict(space.own)
    distributions = space.distributions()
    for name, prior in space.priors().items():
        if name in own:
            _check_own_prior(name, own[name], distributions[name])  # type: ignore[arg-type]
            continue
        assert isinstance(prior, GaussianPrior)  # the compression rule's
        inside = sum(prior.bin_mass(n) for n in range(space.units_low, space.units_high + 1))
        if inside < LEAST_PRIOR_MASS:
            raise ConfigError(
                f"parameters.units: {name}'s prior N({prior.mu:.2f}, {prior.sigma:.2f}) puts "
                f"{inside:.2g} of its mass in [{space.units_low}, {space.units_high}]: its "
                "draws could not land there; widen min and max, or change r"
            )


def _check_own_prior(
    name: str, own: Drawn, distribution: IntDistribution | FloatDistribution
) -> None:
    """A prior of the file's own must put `LEAST_PRIOR_MASS` in its range, as
    [parameters.units]'s must."""
    assert own.prior is not None
    inside = mass_inside(own.prior, distribution)
    if inside >= LEAST_PRIOR_MASS:
        return
    range_text = own.whole_range or f"[{distribution.low:g}, {distribution.high:g}]"
    centre = getattr(own.prior, "mu", None)
    if isinstance(own.prior, LogNormalPrior):  # mu is the log's: the prior's median is e^mu
        centre = math.exp(min(own.prior.mu, 709.0))
        said = f"its median exp(mu) = {centre:g}"
    else:
        said = f"mu = {centre:g}"
    outside = centre is not None and not distribution.low <= centre <= distribution.high
    raise ConfigError(
        f"parameters.{name}: its prior {own.prior.text()} puts {inside:.2g} of its mass in "
        f"{range_text}"
        + (f" ({said} lies outside it)" if outside else "")
        + ": its draws could not land there; widen min and max, or change mu and sigma"
    )


def _check_conditions(space: SearchSpace, parameters: dict[str, Any]) -> None:
    """Each parameter asked for only in some trials says so, as the space implies."""
    implied = space.conditions()
    for key, table in parameters.items():
        if key == "units":
            continue  # each layer below the drawn depth: implied by n_layers itself
        condition = implied.get(key)
        stated = table.get("when")
        if stated is None and condition is not None:
            raise ConfigError(
                f"parameters.{key}: asked only when {condition.text()}: say so with "
                f'when = {{ parameter = "{condition.parent}", values = '
                f"{_toml_list(condition.values)} }}"
            )
        if stated is not None:
            if condition is None:
                raise ConfigError(f"parameters.{key}.when: this parameter is always asked for")
            if not isinstance(stated, dict) or set(stated) != {"parameter", "values"}:
                raise ConfigError(
                    f'parameters.{key}.when: must be {{ parameter = "...", values = [...] }}'
                )
            if stated["parameter"] not in parameters:
                raise ConfigError(
                    f"parameters.{key}.when: no parameter {stated['parameter']!r} in this file"
                )
            values = stated["values"]
            if stated["parameter"] != condition.parent or sorted(map(str, values)) != sorted(
                map(str, condition.values)
            ):
                raise ConfigError(
                    f"parameters.{key}.when: this space asks for it when {condition.text()}"
                )


def _check_corners(space: SearchSpace, defaults: TrainConfig) -> None:
    """Every range's ends and every choice make a configuration the trainer accepts, so a
    study never draws a trial that fails for its file's sake."""
    conditions = space.conditions()
    own = dict(space.own)
    for name, distribution in space.distributions().items():
        if name == "n_layers" or (name.startswith("n_units_l") and name not in own):
            continue  # depth and [parameters.units]'s widths were checked as bounds
        values = getattr(distribution, "choices", None) or (distribution.low, distribution.high)
        for value in values:
            params: dict[str, Any] = {name: value}
            condition = conditions.get(name)
            if condition is not None:  # max_norm's is use_max_norm = true
                params[condition.parent] = condition.values[0]
            try:
                space.configure(params, defaults)
            except ConfigError as exc:
                table = name if name in own else _table_name(name)
                raise ConfigError(f"parameters.{table}: {exc}") from None


def _table_name(name: str) -> str:
    return "units" if name.startswith("n_units_l") else name


def _field(key: str) -> str:
    """The SearchSpace field of a choice parameter."""
    return {"activation": "activations", "optimizer": "optimizers", "schedule": "schedules",
            "batch_size": "batch_sizes"}[key]  # fmt: skip


def _choices(key: str, table: dict[str, Any], where: str) -> tuple[Any, ...]:
    if "probabilities" in table:
        raise ConfigError(
            f"{where}.probabilities: not supported: the samplers draw every value equally likely"
        )
    values = table["values"]
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}.values: must be a list of at least one value")
    if len(set(map(repr, values))) != len(values):
        raise ConfigError(f"{where}.values: {values} repeats a value")
    if key == "use_max_norm":
        if sorted(values) != [False, True]:
            raise ConfigError(f"{where}.values: must be [false, true]")
        return (False, True)
    return tuple(values)


def _kind(table: dict[str, Any], where: str) -> str:
    given = [k for k in ("value", "values", "distribution") if k in table]
    if len(given) != 1:
        raise ConfigError(f"{where}: give exactly one of value, values or distribution")
    if given[0] != "distribution":
        return given[0]
    kind = table["distribution"]
    if kind not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}.distribution = {kind!r}: must be one of {', '.join(DISTRIBUTIONS)}"
        )
    return kind


def _bounds(table: dict[str, Any], where: str, *, integers: bool) -> tuple[Any, Any]:
    for key in ("min", "max"):
        if key not in table:
            raise ConfigError(f"{where}: needs min and max")
        value = table[key]
        wrong = isinstance(value, bool) or not isinstance(value, int if integers else (int, float))
        if wrong:
            kind = "a whole number" if integers else "a number"
            raise ConfigError(f"{where}.{key} = {value!r}: must be {kind}")
    low, high = table["min"], table["max"]
    if low > high:
        raise ConfigError(f"{where}: min = {low} is greater than max = {high}")
    return (low, high) if integers else (float(low), float(high))


def _q_one(table: dict[str, Any], where: str) -> None:
    if table.get("q", 1) != 1:
        raise ConfigError(f"{where}.q = {table['q']!r}: widths are whole units, q = 1")


def int_value(value: Any, where: str, low: int, high: int | None = None) -> int:
    wrong = isinstance(value, bool) or not isinstance(value, int) or value < low
    if wrong or (high is not None and value > high):
        bound = f"of at least {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"{where} = {value!r}: must be a whole number {bound}")
    return value


def only_keys(
    table: Mapping[str, Any], allowed: tuple[str, ...], where: str,
    known: tuple[str, ...] | None = None,
) -> None:  # fmt: skip
    for key in table:
        if key not in allowed:
            shown = ", ".join(known or allowed)
            raise ConfigError(f"{where}: unknown key {key!r} (known: {shown})")


def _toml_list(values: tuple[Any, ...]) -> str:
    return "[" + ", ".join(_toml_value(v) for v in values) + "]"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
