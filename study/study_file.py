"""A study written as a file: TOML, its search space in W&B's sweep vocabulary.

A file has three tables: `[study]` (summary, n_trials, sampler, n_prior_trials, pruner,
ensemble), `[train]` (fixed TrainConfig settings; "all" images, "full" batch) and
`[parameters.<name>]`, one per searched parameter (docs/search-space.md, "Studies as
files", has a whole example). Each parameter table means what it means in a W&B sweep: `value` (a
constant), `values` (drawn equally likely), or a `distribution` with `min`/`max`,
`mu`/`sigma`, `q`. Where W&B leaves a point open, the file says it, and this module holds
it to that (`study.parameter_tables` reads the [parameters] tables into a space and
checks it, `study.distributions` has the distributions' own rules):
- a normal with `min`/`max` is redrawn until it falls inside them (the report's rule
  for neuron counts), and `[parameters.units]` with `rule = "compression"` gives every
  layer its own `mu` and `sigma` by the report's formula, with `r` (default 10/784,
  outputs over inputs); each layer may instead have a table of its own,
  `[parameters.n_units_l<i>]`, but no layer both;
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

from model.config import ConfigError, TrainConfig
from study.parameter_tables import check_space, int_value, only_keys, read_parameters
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


DEFAULT_N_TRIALS = 20
STUDY_KEYS = ("name", "summary", "n_trials", "sampler", "n_prior_trials", "pruner", "ensemble")
TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


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
    only_keys(data, ("study", "train", "parameters"), "top level")
    study = _table(data, "study")
    only_keys(study, STUDY_KEYS, "[study]")
    train = _table(data, "train")
    only_keys(train, TRAIN_KEYS, "[train]")
    parameters = _table(data, "parameters")
    settings, fields = read_parameters(parameters)
    # Through `with_params`, as `train --params`: the same checks, numbers made whole.
    defaults = TrainConfig().with_params({**_train(train), **settings})
    space = SearchSpace(**fields)
    sampler = _typed(study, "sampler", str, "random")
    check_space(space, parameters, defaults, sampler)
    return Preset(
        name=_typed(study, "name", str, name),
        summary=_typed(study, "summary", str, ""),
        defaults=defaults,
        # Optional, so that a W&B sweep's `parameters` alone make a file (`--n-trials` sets
        # another budget either way).
        n_trials=_whole(study, "n_trials", 1, default=DEFAULT_N_TRIALS, where="[study]"),
        pruner=_typed(study, "pruner", str, "none"),
        space=space,
        sampler=sampler,
        n_prior_trials=_whole(study, "n_prior_trials", 0, default=0, where="[study]"),
        ensemble=_typed(study, "ensemble", bool, False),
        text=text,
    )


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
    return int_value(table[key], f"{where} {key}", low)
