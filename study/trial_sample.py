"""A large study seen through a stated random sample of its trials, for the report.

Reading a study's trials whole costs 1.3 to 2 ms a trial here (2 to 3.5 minutes at 100,000
trials), and a plot of 100,000 points says no more than one of 2,000. So above
`LARGE_STUDY_TRIALS` finished trials the report reads from the database only:
- a random sample of `SAMPLE_TRIALS` of the complete trials, seeded so that the same
  study gives the same page, and the best trial, each whole;
- every complete trial's number and value (three numbers a trial), for the best value
  so far;
and draws Optuna's plots over a read-only study of the sample (`SampleStorage`), whose
trials keep their own numbers, so that axes and colours still say which trial is which.

The threshold, 5,000: the whole-study page took 6.5 s at 1,000 trials and 36.6 s at
10,000 on this project's 2-core machine, so up to 5,000 it stays near 20 s and is drawn
from every trial as before. The sample, 2,000: read in 3.2 s, its Optuna plots drawn in
4 s (1.8 MB of page) and its importances in 2.3 s, measured at 10,000 trials. The whole
`mnist-study report` of 100,000 trials then took 18.6 s and wrote 6.7 MB
(benchmarks/README.md, "A study of 100,000 trials").
"""

from __future__ import annotations

import copy
import random
from collections.abc import Container, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import optuna
from optuna.storages import BaseStorage
from optuna.study import StudyDirection

if TYPE_CHECKING:
    from optuna.trial import FrozenTrial, TrialState

    from study.resilient_storage import ResilientRDBStorage

LARGE_STUDY_TRIALS = 5_000
SAMPLE_TRIALS = 2_000
SAMPLE_SEED = 0


@dataclass(frozen=True)
class StudySample:
    """A random sample of a study's complete trials, and the best trial."""

    study: optuna.Study
    """Read-only: the sampled trials, under their own numbers."""
    drawn: int
    """Trials drawn at random from the complete ones."""
    complete: int
    """Complete trials in the study."""
    best_added: int | None
    """The best trial's number, when the draw missed it and it was added."""
    best_so_far: list[tuple[int, float]]
    """(number, value) of each complete trial that raised the best value so far, over
    every complete trial of the study, and the last trial's number with the best value."""
    seed: int

    @property
    def size(self) -> int:
        """Trials in the sample, the best one included."""
        return self.drawn + (self.best_added is not None)

    def describe(self) -> str:
        """The sample in words, for the page."""
        drawn = (
            f"all {self.complete:,} complete trials"
            if self.drawn == self.complete
            else f"a random sample of {self.drawn:,} of the study's {self.complete:,} "
            f"complete trials (seed {self.seed})"
        )
        if self.best_added is not None:
            drawn += f", and the best trial ({self.best_added}), which the draw missed"
        return drawn


def draw_sample(
    study: optuna.Study,
    storage: ResilientRDBStorage,
    size: int = SAMPLE_TRIALS,
    seed: int = SAMPLE_SEED,
) -> StudySample:
    """Draw `size` of the study's complete trials at random (all of them if fewer), add
    the best if the draw missed it, and read those trials whole."""
    rows = storage.complete_trial_values(study._study_id)
    drawn = random.Random(seed).sample(rows, min(size, len(rows)))
    ids = {trial_id for trial_id, _, _ in drawn}
    best_added = None
    best_so_far: list[tuple[int, float]] = []
    if rows:
        # max() over the trials in number order, as the study's best: the first of equals.
        best_id, best_number, best_value = max(rows, key=lambda row: row[2])
        if best_id not in ids:
            ids.add(best_id)
            best_added = best_number
        for _, number, value in rows:
            if not best_so_far or value > best_so_far[-1][1]:
                best_so_far.append((number, value))
        best_so_far.append((rows[-1][1], best_value))
    sample = SampleStorage(study, storage.trials_by_id(study._study_id, ids))
    return StudySample(
        study=optuna.Study(
            study.study_name, sample, sampler=optuna.samplers.RandomSampler(seed=seed)
        ),
        drawn=len(drawn),
        complete=len(rows),
        best_added=best_added,
        best_so_far=best_so_far,
        seed=seed,
    )


class SampleStorage(BaseStorage):
    """One study's settings and a fixed set of its trials, read-only: what Optuna's plots
    read, and nothing they could write."""

    STUDY_ID = 0

    def __init__(self, study: optuna.Study, trials: Sequence[FrozenTrial]) -> None:
        self._name = study.study_name
        self._directions = list(study.directions)
        self._user_attrs = dict(study.user_attrs)
        self._system_attrs = study._storage.get_study_system_attrs(study._study_id)
        self._trials = {t._trial_id: t for t in sorted(trials, key=lambda t: t.number)}
        self._by_number = {t.number: t._trial_id for t in trials}

    def _study(self, study_id: int) -> None:
        if study_id != self.STUDY_ID:
            raise KeyError(f"no study with id {study_id} in the sample")

    def get_study_id_from_name(self, study_name: str) -> int:
        if study_name != self._name:
            raise KeyError(f"no study named {study_name!r} in the sample")
        return self.STUDY_ID

    def get_study_name_from_id(self, study_id: int) -> str:
        self._study(study_id)
        return self._name

    def get_study_directions(self, study_id: int) -> list[StudyDirection]:
        self._study(study_id)
        return list(self._directions)

    def get_study_user_attrs(self, study_id: int) -> dict[str, Any]:
        self._study(study_id)
        return dict(self._user_attrs)

    def get_study_system_attrs(self, study_id: int) -> dict[str, Any]:
        self._study(study_id)
        return dict(self._system_attrs)

    def get_trial_id_from_study_id_trial_number(self, study_id: int, trial_number: int) -> int:
        self._study(study_id)
        if trial_number not in self._by_number:
            raise KeyError(f"trial {trial_number} is not in the sample")
        return self._by_number[trial_number]

    def get_trial(self, trial_id: int) -> FrozenTrial:
        if trial_id not in self._trials:
            raise KeyError(f"trial id {trial_id} is not in the sample")
        return copy.deepcopy(self._trials[trial_id])

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        self._study(study_id)
        trials = [t for t in self._trials.values() if states is None or t.state in states]
        return copy.deepcopy(trials) if deepcopy else trials

    # Everything that writes, and the list of studies: a sample is a picture of one
    # study, not a storage of studies.
    def _read_only(self, *args: object, **kwargs: object) -> NoReturn:
        raise TypeError("a sample of a study is read-only and holds that study alone")

    get_all_studies = _read_only
    create_new_study = _read_only
    delete_study = _read_only
    set_study_user_attr = _read_only
    set_study_system_attr = _read_only
    create_new_trial = _read_only
    set_trial_param = _read_only
    set_trial_state_values = _read_only
    set_trial_intermediate_value = _read_only
    set_trial_user_attr = _read_only
    set_trial_system_attr = _read_only
