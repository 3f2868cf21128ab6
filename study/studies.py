"""A study in its storage: created with a preset's settings or resumed, with the sampler
and pruner those settings name, and its trials queued again when their worker dies.

A study's settings — the study file it was made from (its whole text), the preset's
name, budget, sampler and its seed, pruner, the priors — are its user attributes, so every
worker, on any host, rebuilds the same study from the database alone, and
optuna-dashboard shows them.
"""

from __future__ import annotations

from typing import Any

import optuna
from optuna.storages import BaseStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import TrialState

from study.database import MAX_RETRY
from study.errors import StudyError, redact
from study.experimental import experimental_optuna
from study.presets import PRESETS, SAMPLERS, Preset, get_preset
from study.sampler import GaussianPriorSampler, PriorThenTPESampler
from study.space import GaussianPrior, SearchSpace
from study.study_file import StudyFileError, differences, parse_study

# What the objective returns, as plots and optuna-dashboard name it.
METRIC_NAME = "mean CV accuracy"
# The study's file (its text) and the text's hash, among its user attributes.
STUDY_FILE = "study_file"
STUDY_FILE_SHA256 = "study_file_sha256"


def create_or_resume(
    storage: RDBStorage,
    name: str,
    preset: Preset,
    *,
    budget: int | None = None,
    seed: int | None = None,
) -> tuple[optuna.Study, bool]:
    """The study `name`, created with `preset`'s settings if new. Returns (study, created).

    Resuming checks the preset and seed; a new `budget` replaces the stored one.
    """
    existing = _study_names(storage)
    if name in existing:
        attrs = _study_attrs(storage, name)
        made_with = attrs.get("preset")
        if made_with != preset.name:
            shipped = made_with in PRESETS and not differences(
                attrs.get(STUDY_FILE, PRESETS[made_with].text), PRESETS[made_with].text
            )
            how = (
                f"--preset {made_with}"
                if shipped
                else "its own study file (or leave --space and --preset out: run reads it "
                "from the study)"
            )
            raise StudyError(
                f"study {name!r} was made with preset {made_with!r}, not {preset.name!r}: "
                f"resume it with {how}, or give another --study name"
            )
        changed = differences(attrs[STUDY_FILE], preset.text) if STUDY_FILE in attrs else []
        if changed:
            raise StudyError(
                f"study {name!r} was made from another study file; it differs in "
                f"{'; '.join(changed[:3])}{' …' if len(changed) > 3 else ''}: resume it "
                "with its own file (or leave --space and --preset out: run reads it from "
                "the study), or give another --study name"
            )
        if seed is not None and seed != attrs.get("seed"):
            raise StudyError(
                f"study {name!r} samples with seed {attrs.get('seed')}, not {seed}: "
                "a study keeps its seed; leave --seed out to resume it"
            )
        study = load_study(storage, name)
        if budget is not None and budget != attrs.get("budget"):
            study.set_user_attr("budget", budget)
        if study.metric_names is None:  # made before studies were given it
            _name_the_metric(study)
        return study, False

    import secrets

    seed = secrets.randbelow(2**31) if seed is None else seed
    sampler = make_sampler(preset.sampler, preset.space, seed, preset.n_prior_trials)
    study = optuna.create_study(
        study_name=name,
        storage=storage,
        direction="maximize",
        sampler=sampler,
        pruner=make_pruner(preset.pruner),
        load_if_exists=True,
    )
    _name_the_metric(study)
    settings = {
        "preset": preset.name,
        "budget": preset.n_trials if budget is None else budget,
        "sampler": preset.sampler,
        "seed": seed,
        "pruner": preset.pruner,
        "priors": _priors(preset.space),
        "space": preset.space.describe(),
        "training": {
            k: v
            for k, v in preset.defaults.params().items()
            if not k.startswith(("n_units", "n_layers"))
        },
    }
    if preset.sampler == "prior_then_tpe":
        settings["n_prior_trials"] = preset.n_prior_trials
    # The file itself: every worker, on any host, rebuilds the study from it alone.
    settings[STUDY_FILE] = preset.text
    settings[STUDY_FILE_SHA256] = preset.sha256
    # One attribute a transaction: `preset` last, so that another process loading the
    # study meanwhile (a worker, `status`) finds it not yet made rather than half made
    # (a study file's preset name without its file: CI saw `preset 'long': must be one of`).
    for key in [*(k for k in settings if k != "preset"), "preset"]:
        study.set_user_attr(key, settings[key])
    return study, True


def _priors(space: SearchSpace) -> dict[str, dict[str, Any]]:
    """Each parameter's prior, as a study's attributes hold it: the compression rule's mu
    and sigma (as studies always stored them), or the study file's own distribution."""
    own = dict(space.own)
    out = {}
    for key, prior in space.priors().items():
        if key in own:
            out[key] = prior.describe()
        else:
            assert isinstance(prior, GaussianPrior)  # the compression rule's
            out[key] = {"mu": round(prior.mu, 4), "sigma": round(prior.sigma, 4)}
    return out


def _name_the_metric(study: optuna.Study) -> None:
    with experimental_optuna():
        study.set_metric_names([METRIC_NAME])


def load_study(storage: RDBStorage, name: str) -> optuna.Study:
    """An existing mnist-study study, with the sampler and pruner its attributes name."""
    names = _study_names(storage)
    if name not in names:
        there = f"studies there: {', '.join(sorted(names))}" if names else "it holds no studies"
        raise StudyError(f"no study named {name!r} in {redact(storage.url)}; {there}")
    attrs = _study_attrs(storage, name)
    if "preset" not in attrs or "seed" not in attrs:
        raise StudyError(
            f"study {name!r} was not made by mnist-study (no preset in its attributes), "
            "or `run` is still creating it"
        )
    preset = preset_of(name, attrs)
    # Studies stored before samplers were named all searched at random.
    name_of_sampler = attrs.get("sampler", "random")
    if name_of_sampler not in SAMPLERS:
        raise StudyError(
            f"study {name!r} names the sampler {name_of_sampler!r}, which this version of "
            f"mnist-study does not have (it has {', '.join(SAMPLERS)})"
        )
    sampler = make_sampler(
        name_of_sampler,
        preset.space,
        attrs["seed"],
        attrs.get("n_prior_trials", preset.n_prior_trials),
    )
    pruner = make_pruner(attrs.get("pruner", "none"))
    study = optuna.load_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner)
    if type(sampler) is GaussianPriorSampler and type(pruner) is optuna.pruners.NopPruner:
        # Optuna puts a cache in front of every RDBStorage, which reads every trial of the
        # study on a process's first look at its trials (`ask` looking for queued ones):
        # 189 s for a study of 100,000 (benchmarks/README.md). It pays off for a sampler
        # or pruner that reads the history at every trial (TPE, the median pruner); these
        # read none, so the study talks to the storage itself, a query per call.
        study._storage = storage
    return study


def study_preset(study: optuna.Study) -> Preset:
    """The study's settings: rebuilt from the study file it stores (older studies store
    only their preset's name)."""
    return preset_of(study.study_name, study.user_attrs)


def preset_of(name: str, attrs: dict[str, Any]) -> Preset:
    if STUDY_FILE not in attrs:
        return get_preset(attrs["preset"])
    try:
        return parse_study(attrs[STUDY_FILE], attrs["preset"], where=f"study {name!r}'s file")
    except StudyFileError as exc:
        raise StudyError(f"{exc} (stored by another version of mnist-study?)") from None


def make_sampler(
    name: str, space: SearchSpace, seed: int, n_prior_trials: int
) -> optuna.samplers.BaseSampler:
    """The sampler a preset or a stored study names (see `study.presets.SAMPLERS`)."""
    if name == "prior_then_tpe":
        return PriorThenTPESampler(space.priors(), seed=seed, n_prior_trials=n_prior_trials)
    return GaussianPriorSampler(space.priors(), seed=seed)


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        # Judge a trial only after a few whole trials and a few epochs of its own.
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=4)
    if name == "hyperband":
        # Brackets from 2 epochs up to the preset's cap (Optuna reads it off the first
        # trial that runs to its end), keeping a third at each rung.
        return optuna.pruners.HyperbandPruner(min_resource=2, reduction_factor=3)
    return optuna.pruners.NopPruner()


def list_studies(storage: BaseStorage) -> list[str]:
    return sorted(_study_names(storage))


def _study_names(storage: BaseStorage) -> set[str]:
    return {s.study_name for s in storage.get_all_studies()}


def _study_attrs(storage: BaseStorage, name: str) -> dict[str, Any]:
    return storage.get_study_user_attrs(storage.get_study_id_from_name(name))


def requeue(study: optuna.Study, number: int) -> None:
    """Queue a failed trial again with its parameters, as the heartbeat retry does."""
    # One trial read, not the study's every trial (a study may hold 100,000).
    storage = study._storage
    trial = storage.get_trial(
        storage.get_trial_id_from_study_id_trial_number(study._study_id, number)
    )
    if trial.state == TrialState.FAIL:
        with experimental_optuna():
            RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY)(study, trial)


def fail_stale_trials(study: optuna.Study) -> None:
    """Fail (and so requeue) running trials whose worker stopped beating."""
    with experimental_optuna():
        optuna.storages.fail_stale_trials(study)


def stored_preset(storage_url: str, name: str) -> Preset | None:
    """The settings the study `name` stores, or None where there is no such study yet."""
    from study.database import open_storage, sqlite_file

    database = sqlite_file(storage_url)
    if database is not None and not database.exists():
        return None  # `run` creates it
    storage = open_storage(storage_url, heartbeat=None, write=False)
    if name not in list_studies(storage):
        return None
    return preset_of(name, storage.get_study_user_attrs(storage.get_study_id_from_name(name)))
