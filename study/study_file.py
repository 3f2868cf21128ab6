"""A study written as a file: TOML, its search space in W&B's sweep vocabulary.

A file has three tables: `[study]` (summary, n_trials, sampler, n_prior_trials, pruner,
ensemble), `[train]` (fixed TrainConfig settings; "all" images, "full" batch) and
`[parameters.<name>]`, one per searched parameter (README.md, "Studies as files", has a
whole example). Each parameter table means what it means in a W&B sweep: `value` (a
constant), `values` (drawn equally likely), or a `distribution` with `min`/`max`,
`mu`/`sigma`, `q`. Where W&B leaves a point open, the file says it, and this module holds
it to that:
- a `q_normal` with `min`/`max` is redrawn until it falls inside them (the report's rule
  for neuron counts), and `rule = "compression"` gives each layer its own `mu` and `sigma`
  by the report's formula, with `r` (default 10/784, outputs over inputs);
- `probabilities` is refused: the samplers draw every value equally likely;
- a parameter asked for only in some trials says when, with `when = { parameter = ...,
  values = [...] }`, and the file must say exactly what the space implies;
- a parameter the file leaves out is not searched.

The file is parsed into a `Preset` (its `SearchSpace`, its `TrainConfig` defaults and its
study settings); the shipped presets are such files (`study/presets/`). A study stores the
file's text, so any worker rebuilds the same space from the database alone. Every error
is one line naming the file and what is wrong in it.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from model.config import N_CLASSES, N_INPUTS, ConfigError, TrainConfig
from study.space import SearchSpace

PRUNERS = ("none", "median", "hyperband")
# random: `GaussianPriorSampler`, the report's random search on its priors;
# prior_then_tpe: `PriorThenTPESampler`, `n_prior_trials` of those, then TPE.
SAMPLERS = ("random", "prior_then_tpe")


@dataclass(frozen=True)
class Preset:
    name: str
    summary: str
    defaults: TrainConfig
    n_trials: int
    pruner: str = "none"
    space: SearchSpace = field(default_factory=SearchSpace)
    sampler: str = "random"
    n_prior_trials: int = 0
    # Whether `retrain` also measures the best configuration's k fold networks together
    # (it cross-validates the configuration again for them: k more trainings).
    ensemble: bool = False
    # The study file it was read from, as text (what a study stores).
    text: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.pruner not in PRUNERS:
            raise ConfigError(f"pruner {self.pruner!r}: must be one of {', '.join(PRUNERS)}")
        if self.sampler not in SAMPLERS:
            raise ConfigError(f"sampler {self.sampler!r}: must be one of {', '.join(SAMPLERS)}")
        if self.n_prior_trials < 0:
            raise ConfigError(f"n_prior_trials = {self.n_prior_trials}: must be at least 0")

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()


class StudyFileError(ConfigError):
    """A study file that cannot be used; the message names the file and what is wrong."""


STUDY_KEYS = ("name", "summary", "n_trials", "sampler", "n_prior_trials", "pruner", "ensemble")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# W&B's distributions, each with the keys it takes (`rule` and `r`: the compression rule).
DISTRIBUTIONS: dict[str, tuple[str, ...]] = {
    "int_uniform": ("min", "max"),
    "uniform": ("min", "max"),
    "q_uniform": ("min", "max", "q"),
    "log_uniform_values": ("min", "max"),
    "q_log_uniform_values": ("min", "max", "q"),
    "normal": ("mu", "sigma"),
    "q_normal": ("mu", "sigma", "q", "min", "max", "rule", "r"),
    "log_normal": ("mu", "sigma"),
    "q_log_normal": ("mu", "sigma", "q"),
}
PARAMETER_KEYS = ("value", "values", "probabilities", "distribution", "when")

# What each parameter the trainer knows may be, in the space: its distributions (the ones
# the samplers draw), and whether it may be a constant `value` or `values`.
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
# The report's own parameters may be fixed in the file; their value then goes to [train].
FIXABLE = {"activation", "optimizer", "dropout", "lr", "weight_decay"}


def read_study_file(path: Path) -> Preset:
    """The study in the file at `path` (its name: `[study] name`, else the file's stem)."""
    if not path.exists():
        raise StudyFileError(f"study file {path}: no such file")
    if path.is_dir():
        raise StudyFileError(f"study file {path}: is a directory, not a TOML file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise StudyFileError(f"study file {path}: cannot read it ({exc.strerror})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StudyFileError(
            f"study file {path}: not UTF-8 text (byte {exc.start} is {raw[exc.start]:#04x})"
        ) from None
    return parse_study(text, path.stem, where=f"study file {path}")


def parse_study(text: str, name: str, *, where: str = "the study file") -> Preset:
    """The study that TOML `text` describes; `name` unless its `[study]` names one."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyFileError(f"{where}: TOML syntax: {exc}") from None
    try:
        return _build(data, name, text)
    except StudyFileError as exc:
        raise StudyFileError(f"{where}: {exc}") from None
    except (ConfigError, ValueError, TypeError) as exc:
        raise StudyFileError(f"{where}: {exc}") from None


def differences(stored: str, given: str) -> list[str]:
    """The settings in which two study files differ (not their comments or layout), as
    `key: stored → given`; empty when they describe the same study."""
    flat_stored = _flatten(tomllib.loads(stored))
    flat_given = _flatten(tomllib.loads(given))
    out = []
    for key in sorted(flat_stored.keys() | flat_given.keys()):
        a, b = flat_stored.get(key, "(absent)"), flat_given.get(key, "(absent)")
        if a != b:
            out.append(f"{key}: {a!r} → {b!r}")
    return out


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _build(data: dict[str, Any], name: str, text: str) -> Preset:
    _only(data, ("study", "train", "parameters"), "top level")
    study = _table(data, "study")
    _only(study, STUDY_KEYS, "[study]")
    train = _table(data, "train")
    _only(train, TRAIN_KEYS, "[train]")
    parameters = _table(data, "parameters")
    _only(parameters, PARAMETERS, "[parameters]")
    for key, table in parameters.items():
        if not isinstance(table, dict):
            raise StudyFileError(f"parameters.{key}: must be a table, as [parameters.{key}]")
        _only(table, (*PARAMETER_KEYS, *{k for ks in DISTRIBUTIONS.values() for k in ks}),
              f"[parameters.{key}]")  # fmt: skip

    settings, space = _space(parameters)
    # Through `with_params`, as `train --params`: the same checks, numbers made whole.
    defaults = TrainConfig().with_params({**_train(train), **settings})
    if "units" not in parameters:
        raise StudyFileError("[parameters.units]: missing: a study searches its layers' widths")
    space = SearchSpace(**space)
    _check_priors(space)
    _check_conditions(space, parameters)
    # A space's draws must make valid configurations: check the corners of every range.
    _check_corners(space, defaults)
    return Preset(
        name=_typed(study, "name", str, name),
        summary=_typed(study, "summary", str, ""),
        defaults=defaults,
        n_trials=_whole(study, "n_trials", 1, default=None, where="[study]"),
        pruner=_typed(study, "pruner", str, "none"),
        space=space,
        sampler=_typed(study, "sampler", str, "random"),
        n_prior_trials=_whole(study, "n_prior_trials", 0, default=0, where="[study]"),
        ensemble=_typed(study, "ensemble", bool, False),
        text=text,
    )


def _space(parameters: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(fixed settings for [train], SearchSpace fields) from the parameter tables."""
    fixed: dict[str, Any] = {}
    # What the file leaves out is not searched (the [train] setting stands), whatever the
    # report's space searches.
    space: dict[str, Any] = {
        "activations": (), "optimizers": (), "dropout": None, "lr": None, "weight_decay": None
    }  # fmt: skip
    for key, table in parameters.items():
        where = f"parameters.{key}"
        kind = _kind(table, where)
        if key == "n_layers":
            if kind == "value":
                space["n_layers"] = _int_value(table["value"], f"{where}.value", 1)
            elif kind == "int_uniform":
                low, high = _bounds(table, where, integers=True)
                space["min_layers"], space["n_layers"] = low, high
            else:
                raise StudyFileError(f'{where}: a value, or distribution = "int_uniform"')
        elif key == "units":
            space.update(_units(table, kind, where))
        elif key == "use_max_norm":
            # The max-norm cap's on/off switch: searched exactly when the cap is.
            if kind != "values" or "max_norm" not in parameters:
                raise StudyFileError(
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
                raise StudyFileError(
                    f"{where}: a list of values" + (", or a value" if key in FIXABLE else "")
                )
        else:
            wanted = RANGES[key]
            if kind == "value" and key in FIXABLE:
                fixed[key] = table["value"]
                space[key] = None
            elif kind == wanted:
                space[key] = _bounds(table, where, integers=False)
                if kind == "log_uniform_values" and space[key][0] <= 0:
                    raise StudyFileError(
                        f"{where}: min = {table['min']}: a log-uniform range needs min > 0"
                    )
            else:
                raise StudyFileError(
                    f'{where}: distribution = "{wanted}" with min and max'
                    + (", or a value" if key in FIXABLE else "")
                    + f" (not {kind})"
                )
    if "max_norm" in parameters and "use_max_norm" not in parameters:
        raise StudyFileError(
            "parameters.max_norm: the cap is searched on and off: add [parameters.use_max_norm] "
            "with values = [false, true]"
        )
    return fixed, space


def _units(table: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    if kind == "q_normal":
        if table.get("rule") != "compression":
            raise StudyFileError(
                f'{where}: a q_normal over every layer needs rule = "compression" (the '
                "report's priors, one mu and sigma a layer); mu and sigma alone are not "
                "supported"
            )
        for key in ("mu", "sigma"):
            if key in table:
                raise StudyFileError(
                    f"{where}.{key}: the compression rule gives each layer its own"
                )
        _q_one(table, where)
        low, high = _bounds(table, where, integers=True)
        r = table.get("r", N_CLASSES / N_INPUTS)
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < r < 1:
            raise StudyFileError(f"{where}.r = {r!r}: must be a number in (0, 1)")
        return {"units_low": low, "units_high": high, "units_log": False, "compression_r": r}
    if kind == "q_log_uniform_values":
        _q_one(table, where)
        low, high = _bounds(table, where, integers=True)
        return {"units_low": low, "units_high": high, "units_log": True}
    raise StudyFileError(
        f'{where}: distribution = "q_normal" with rule = "compression", or '
        f'"q_log_uniform_values", each with q = 1, min and max (not {kind})'
    )


# The least share of a prior's mass that [min, max] must hold: below it, most draws are
# redrawn and the sampler gives up (`study.sampler`'s 10,000 redraws) on the rest.
LEAST_PRIOR_MASS = 1e-3


def _check_priors(space: SearchSpace) -> None:
    for name, prior in space.priors().items():
        inside = sum(prior.bin_mass(n) for n in range(space.units_low, space.units_high + 1))
        if inside < LEAST_PRIOR_MASS:
            raise StudyFileError(
                f"parameters.units: {name}'s prior N({prior.mu:.2f}, {prior.sigma:.2f}) puts "
                f"{inside:.2g} of its mass in [{space.units_low}, {space.units_high}]: its "
                "draws could not land there; widen min and max, or change r"
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
            raise StudyFileError(
                f"parameters.{key}: asked only when {condition.text()}: say so with "
                f'when = {{ parameter = "{condition.parent}", values = '
                f"{_toml_list(condition.values)} }}"
            )
        if stated is not None:
            if condition is None:
                raise StudyFileError(f"parameters.{key}.when: this parameter is always asked for")
            if not isinstance(stated, dict) or set(stated) != {"parameter", "values"}:
                raise StudyFileError(
                    f'parameters.{key}.when: must be {{ parameter = "...", values = [...] }}'
                )
            if stated["parameter"] not in parameters:
                raise StudyFileError(
                    f"parameters.{key}.when: no parameter {stated['parameter']!r} in this file"
                )
            values = stated["values"]
            if stated["parameter"] != condition.parent or sorted(map(str, values)) != sorted(
                map(str, condition.values)
            ):
                raise StudyFileError(
                    f"parameters.{key}.when: this space asks for it when {condition.text()}"
                )


def _check_corners(space: SearchSpace, defaults: TrainConfig) -> None:
    """Every range's ends and every choice make a configuration the trainer accepts, so a
    study never draws a trial that fails for its file's sake."""
    conditions = space.conditions()
    for name, distribution in space.distributions().items():
        if name.startswith("n_units_l") or name == "n_layers":
            continue  # widths and depth were checked as bounds
        values = getattr(distribution, "choices", None) or (distribution.low, distribution.high)
        for value in values:
            params: dict[str, Any] = {name: value}
            condition = conditions.get(name)
            if condition is not None:  # max_norm's is use_max_norm = true
                params[condition.parent] = condition.values[0]
            try:
                space.configure(params, defaults)
            except ConfigError as exc:
                raise StudyFileError(f"parameters.{_table_name(name)}: {exc}") from None


def _table_name(name: str) -> str:
    return "units" if name.startswith("n_units_l") else name


def _field(key: str) -> str:
    """The SearchSpace field of a choice parameter."""
    return {"activation": "activations", "optimizer": "optimizers", "schedule": "schedules",
            "batch_size": "batch_sizes"}[key]  # fmt: skip


def _choices(key: str, table: dict[str, Any], where: str) -> tuple[Any, ...]:
    if "probabilities" in table:
        raise StudyFileError(
            f"{where}.probabilities: not supported: the samplers draw every value equally likely"
        )
    values = table["values"]
    if not isinstance(values, list) or not values:
        raise StudyFileError(f"{where}.values: must be a list of at least one value")
    if len(set(map(repr, values))) != len(values):
        raise StudyFileError(f"{where}.values: {values} repeats a value")
    if key == "use_max_norm":
        if sorted(values) != [False, True]:
            raise StudyFileError(f"{where}.values: must be [false, true]")
        return (False, True)
    return tuple(values)


def _kind(table: dict[str, Any], where: str) -> str:
    given = [k for k in ("value", "values", "distribution") if k in table]
    if len(given) != 1:
        raise StudyFileError(f"{where}: give exactly one of value, values or distribution")
    if given[0] != "distribution":
        return given[0]
    kind = table["distribution"]
    if kind not in DISTRIBUTIONS:
        raise StudyFileError(
            f"{where}.distribution = {kind!r}: must be one of {', '.join(DISTRIBUTIONS)}"
        )
    return kind


def _bounds(table: dict[str, Any], where: str, *, integers: bool) -> tuple[Any, Any]:
    for key in ("min", "max"):
        if key not in table:
            raise StudyFileError(f"{where}: needs min and max")
        value = table[key]
        wrong = isinstance(value, bool) or not isinstance(value, int if integers else (int, float))
        if wrong:
            kind = "a whole number" if integers else "a number"
            raise StudyFileError(f"{where}.{key} = {value!r}: must be {kind}")
    low, high = table["min"], table["max"]
    if low > high:
        raise StudyFileError(f"{where}: min = {low} is greater than max = {high}")
    return (low, high) if integers else (float(low), float(high))


def _q_one(table: dict[str, Any], where: str) -> None:
    if table.get("q", 1) != 1:
        raise StudyFileError(f"{where}.q = {table['q']!r}: widths are whole units, q = 1")


def _int_value(value: Any, where: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise StudyFileError(f"{where} = {value!r}: must be a whole number of at least {low}")
    return value


def _train(train: dict[str, Any]) -> dict[str, Any]:
    """[train] as `TrainConfig.with_params` takes it ("all" images and "full" batches are
    words it knows; `hidden`, the widths `train` uses, as n_units_l0, n_units_l1, ...)."""
    out = dict(train)
    if "hidden" in out:
        hidden = out.pop("hidden")
        if not isinstance(hidden, list) or not hidden:
            raise StudyFileError(f"[train] hidden = {hidden!r}: must be a list of widths")
        out.update({f"n_units_l{i}": units for i, units in enumerate(hidden)})
        out["n_layers"] = len(hidden)
    if out.get("max_norm") == "none":
        out["max_norm"] = None
    return out


def _table(data: dict[str, Any], key: str) -> dict[str, Any]:
    table = data.get(key, {})
    if not isinstance(table, dict):
        raise StudyFileError(f"{key}: must be a table, as [{key}]")
    return table


def _only(table: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in table:
        if key not in allowed:
            raise StudyFileError(f"{where}: unknown key {key!r} (known: {', '.join(allowed)})")


def _typed(table: dict[str, Any], key: str, kind: type, default: Any) -> Any:
    value = table.get(key, default)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise StudyFileError(f"[study] {key} = {value!r}: must be a {kind.__name__}")
    return value


def _whole(table: dict[str, Any], key: str, low: int, *, default: int | None, where: str) -> int:
    if key not in table:
        if default is None:
            raise StudyFileError(f"{where}: {key} is missing")
        return default
    return _int_value(table[key], f"{where} {key}", low)


def _toml_list(values: tuple[Any, ...]) -> str:
    return "[" + ", ".join(_toml_value(v) for v in values) + "]"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"'
    return str(value)
