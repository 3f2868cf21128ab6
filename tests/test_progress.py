"""What `run` and `status` show of trials still training: their epochs, folds and
accuracy, a time left from the epoch rate, and once, an estimate of a long study."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import optuna
import pytest

from study.progress import (
    LOG_EVERY_S,
    RunningTrial,
    StudyProgress,
    duration,
    remaining_seconds,
    running_trials,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)


def test_a_running_trial_is_read_from_its_reports_and_its_folds_attribute() -> None:
    study = optuna.create_study(direction="maximize")
    trial = study.ask()
    for epoch, accuracy in ((1, 0.5), (2, 0.6), (3, 0.65)):
        trial.report(accuracy, epoch)
    study._storage.set_trial_system_attr(trial._trial_id, "active_folds", 4)
    study.tell(study.ask(), 0.9)  # finished: not running
    started = study.trials[0].datetime_start
    [running] = running_trials(study, now=started + timedelta(seconds=6))
    assert running == RunningTrial(number=0, epoch=3, accuracy=0.65, active_folds=4, seconds=6.0)
    assert running.epochs_per_second == 0.5
    assert running.text(2000, 5) == (
        "trial 0: epoch 3/2000, 4 of 5 folds training, mean val acc 0.6500"
    )


def test_time_left_is_an_upper_bound_from_the_slowest_epoch_rate() -> None:
    running = [RunningTrial(0, 10, 0.5, 5, 10.0), RunningTrial(1, 20, 0.5, 5, 10.0)]
    # Rate 1 epoch/s (the slower); 90 + 80 epochs in hand, 3 more trials of 100; 2 at once.
    assert remaining_seconds(running, left=5, max_epochs=100) == (90 + 80 + 300) / 2
    assert remaining_seconds([RunningTrial(0, 0, None, None, 3.0)], 5, 100) is None


def test_a_log_gets_each_running_trial_s_line_at_most_every_30_seconds() -> None:
    progress = StudyProgress(max_epochs=100, k=3, workers=1, device="cpu")
    trial = RunningTrial(7, 4, 0.8, 3, 8.0)
    assert progress.log_lines([trial], now=1000.0) == [
        "trial 7: epoch 4/100, 3 of 3 folds training, mean val acc 0.8000"
    ]
    assert progress.log_lines([trial], now=1000.0 + LOG_EVERY_S - 1) == []
    assert len(progress.log_lines([trial], now=1000.0 + LOG_EVERY_S)) == 1
    assert progress.log_lines([RunningTrial(8, 0, None, None, 1.0)], now=2000.0) == []


def test_the_estimate_of_a_long_study_is_said_once_and_a_short_one_not_at_all() -> None:
    slow = [RunningTrial(0, 2, 0.4, 5, 12.0)]  # 6 s an epoch
    long = StudyProgress(max_epochs=2000, k=5, workers=2, device="cpu")
    line = long.estimate(slow, budget=200, finished=0)
    assert line is not None and line.startswith(
        "estimate: at 0.167 epochs/s a trial of up to 2000 epochs takes up to 3.3 h on cpu, "
        "so 200 trials with 2 worker(s) up to 13.9 days; going on"
    )
    assert long.estimate(slow, budget=200, finished=0) is None  # once
    short = StudyProgress(max_epochs=30, k=3, workers=2, device="cpu")
    assert short.estimate([RunningTrial(0, 3, 0.9, 3, 3.0)], budget=12, finished=0) is None


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(45, "45 s"), (600, "10 min"), (3 * 3600, "3.0 h"), (13.9 * 86400, "13.9 days")],
)
def test_durations_read_as_a_person_reads_them(seconds: float, text: str) -> None:
    assert duration(seconds) == text


def test_status_lists_the_running_trials_with_their_epochs(tmp_path: Path) -> None:
    from study.budget import count_trials
    from study.database import open_storage
    from study.presets import PRESETS
    from study.studies import create_or_resume
    from study.tables import status_block

    storage = open_storage(f"sqlite:///{tmp_path / 'optuna.db'}", create=True)
    study, _ = create_or_resume(storage, "s", PRESETS["seed"], seed=1)
    trial = study.ask()
    trial.report(0.91, 40)
    block = status_block("s", study, count_trials(study))
    assert "  running trial 0: epoch 40/2000, mean val acc 0.9100" in block.splitlines()
