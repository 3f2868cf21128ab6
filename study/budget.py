"""A study's trials counted against its budget.

The budget belongs to the study, not to a process. A trial counts once it has ended
(complete, pruned, or failed), except a failed trial that was queued again — a worker
killed mid-trial (found by the heartbeat) or interrupted — since its retry takes its place.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from optuna.trial import TrialState

if TYPE_CHECKING:
    import optuna
    from optuna.trial import FrozenTrial


def backing_storage(study: optuna.Study) -> Any:
    """The storage a study talks to: behind the cache `optuna.load_study` puts in front
    of an RDBStorage, where there is one (`study.studies.load_study` leaves it out for
    studies that read no history), for the project's own methods, which the cache does
    not pass on (`ResilientRDBStorage.trial_tally` and the like)."""
    return getattr(study._storage, "_backend", study._storage)


@dataclass(frozen=True)
class StudyCounts:
    """A study's trials against its budget."""

    budget: int
    complete: int = 0
    pruned: int = 0
    failed: int = 0
    retried: int = 0
    running: int = 0
    waiting: int = 0
    best: FrozenTrial | None = field(default=None, compare=False)

    @property
    def finished(self) -> int:
        """Trials that count against the budget."""
        return self.complete + self.pruned + self.failed

    @property
    def done(self) -> bool:
        return self.finished >= self.budget

    @property
    def unclaimed(self) -> int:
        """Budget that no finished, running or queued trial covers yet."""
        return self.budget - self.finished - self.running - self.waiting

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "budget": self.budget,
            "finished": self.finished,
            "complete": self.complete,
            "pruned": self.pruned,
            "failed": self.failed,
            "retried": self.retried,
            "running": self.running,
            "waiting": self.waiting,
            "best": None,
        }
        if self.best is not None:
            out["best"] = {
                "number": self.best.number,
                "value": self.best.value,
                "params": self.best.params,
                "user_attrs": self.best.user_attrs,
            }
        return out


def count_trials(study: optuna.Study, *, with_best: bool = True) -> StudyCounts:
    """The study's counts: in the database where it is ours (a few grouped queries, the
    same at 100 trials as at 100,000), else by reading every trial (`count_every_trial`).

    `with_best=False` leaves `best` None where the database counts: a worker counts twice
    a trial and never looks at the best, whose whole trial is a read of its own
    (benchmarks/load.py measured it at about a tenth of an instant worker's time)."""
    storage = backing_storage(study)
    if not hasattr(storage, "trial_tally"):
        return count_every_trial(study)
    study_id = study._study_id
    tally = storage.trial_tally(study_id, with_best=with_best)
    by_state = dict(tally.states)
    by_state[TrialState.FAIL] = by_state.get(TrialState.FAIL, 0) - tally.retried_failures
    best = None if tally.best_trial_id is None else storage.get_trial(tally.best_trial_id)
    return StudyCounts(
        budget=int(storage.get_study_user_attrs(study_id).get("budget", 0)),
        complete=by_state.get(TrialState.COMPLETE, 0),
        pruned=by_state.get(TrialState.PRUNED, 0),
        failed=by_state[TrialState.FAIL],
        retried=tally.retried_failures,
        running=by_state.get(TrialState.RUNNING, 0),
        waiting=by_state.get(TrialState.WAITING, 0),
        best=best,
    )


def count_every_trial(study: optuna.Study) -> StudyCounts:
    """`count_trials` by reading every trial: for storages that are not ours (in memory),
    and the rule the database's counts are held to (tests/test_study.py)."""
    trials = study.get_trials(deepcopy=False)
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    by_state: dict[TrialState, int] = {}
    retried_failures = 0
    for t in trials:
        if t.state == TrialState.FAIL and t.number in retried:
            retried_failures += 1
            continue
        by_state[t.state] = by_state.get(t.state, 0) + 1
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    best = max(complete, key=lambda t: t.value) if complete else None
    return StudyCounts(
        budget=int(study.user_attrs.get("budget", 0)),
        complete=by_state.get(TrialState.COMPLETE, 0),
        pruned=by_state.get(TrialState.PRUNED, 0),
        failed=by_state.get(TrialState.FAIL, 0),
        retried=retried_failures,
        running=by_state.get(TrialState.RUNNING, 0),
        waiting=by_state.get(TrialState.WAITING, 0),
        best=best,
    )
