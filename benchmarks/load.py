"""Many worker processes on one PostgreSQL: the rate at which the study's own machinery —
claim, heartbeat, tell — gets through trials that cost nothing to run.

    python -m benchmarks.load [--workers 64] [--budget 2000] [--heartbeat 2]
                              [--sweep 8,16,32,64 --sweep-budget N] [--kill-quarter]
                              [--backend postgresql|sqlite] [--json FILE]

Each configuration gets a database of its own on one throwaway server (`tests/pgserver.py`,
fsync off, `max_connections` raised for the workers), a `tiny`-preset study with the
budget, and that many worker processes (`python -m benchmarks.load worker`). A worker
runs the real worker's loop, `study.worker.run_trials_until_done` — stale trials failed
and queued again, the budget counted, one trial claimed with its first heartbeat
(`_claim`), the heartbeat thread (`_Heartbeats`), the trial told — over the storage
`study.database.open_storage` gives, but with an instant objective in place of training
(`InstantObjective`: the trial's parameters drawn as the real objective draws them, then
told at once). It never imports torch; each worker records whether it did.

The workers start, open the storage and load the study, then wait for one signal (a
file), so the rate excludes their start-up. Measured:
- the rate: finished trials by their stored completion times, over the middle 80 % of
  the budget (from the 10 %-th completion to the 90 %-th), and from the signal to the last;
- trials lost: every trial must end COMPLETE, or FAIL and queued again (its number in a
  later trial's `retry_history`); none left RUNNING or WAITING; COMPLETE against budget;
- the time of each `_claim` call (count the budget, ask), p50 / p99 over all workers;
- CPU seconds of the PostgreSQL server's processes, of the workers and of the whole
  machine over the run, from /proc, to say which of them the rate waits on;
- with `--profile`, worker 0 runs under cProfile: where a worker's time goes.

`--kill-quarter`: when half the budget has completed, a quarter of the workers are
SIGKILLed; their trials go stale after the grace period (4 heartbeats) and are retried.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# Only modules that do not import torch, here at the top: this file is each worker's
# program too, and a worker that never trains should not pay for torch.
import optuna

from benchmarks.machine import storage_run_header
from study import worker as study_worker
from study.database import STORAGE_ENV, open_storage
from study.presets import PRESETS, Preset
from study.studies import create_or_resume, load_study, study_preset

STUDY = "load"
PRESET = "tiny"
ROOT = Path(__file__).resolve().parent.parent
# Two connections a worker (its loop's and its heartbeat thread's), and room to spare.
MAX_CONNECTIONS = 300
READY_TIMEOUT_S = 600
SAMPLE_S = 0.5
TARGET_RATE = 100.0  # trials per second with 64 workers (issue 20)


# --- the worker -----------------------------------------------------------------------


class InstantObjective:
    """A `study.worker.TrialRunner` that draws each trial's parameters as the real
    objective does (`space.suggest`: the same parameter writes), waits `seconds`, and
    tells it a value made from them: the storage's share of a trial, without training."""

    def __init__(self, preset: Preset, seconds: float = 0.0) -> None:
        self.preset = preset
        self.seconds = seconds
        self.in_hand: list[int] = []

    def run_trials(self, study: optuna.Study, trials: Sequence[optuna.Trial]) -> None:
        for trial in trials:
            config = self.preset.space.suggest(trial, self.preset.defaults)
            if self.seconds:
                time.sleep(self.seconds)
            # Nearer the report's best learning rate, higher: some order for "best".
            value = 0.9 + 0.05 * math.exp(-(math.log10(config.lr / 5.4e-3) ** 2))
            study.tell(trial, value)
            self.in_hand.remove(trial.number)


def worker_main(args: argparse.Namespace) -> int:
    """One instant worker: the storage URL from $MNIST_STUDY_STORAGE, as `run` hands it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(os.environ[STORAGE_ENV], heartbeat=args.heartbeat)
    study = load_study(storage, args.study)
    preset = study_preset(study)
    stop = study_worker.StopSignals(parent_pid=os.getppid())
    runner = InstantObjective(preset, args.trial_ms / 1000)
    claims: list[float] = []
    claim = study_worker._claim

    def timed_claim(*claim_args: Any) -> list[optuna.Trial]:
        started = time.perf_counter()
        trials = claim(*claim_args)
        claims.append(time.perf_counter() - started)
        return trials

    # The loop looks `_claim` up at each call, so this times the very claim it makes.
    study_worker._claim = timed_claim
    if args.ready is not None:
        args.ready.write_text(str(os.getpid()))
        while args.go is not None and not args.go.exists():
            if stop.parent_gone():
                return 1  # the benchmark was stopped before the signal
            time.sleep(0.05)
    cpu_before = time.process_time()
    started = time.time()

    def loop() -> int:
        return study_worker.run_trials_until_done(
            study, storage, runner, 1, stop, study_worker.StackClock(None), log=print
        )

    profile: list[dict[str, Any]] | None = None
    if args.profile:
        ran, profile = _profiled(loop)
    else:
        ran = loop()
    record = {
        "pid": os.getpid(),
        "ran": ran,
        "claim_seconds": claims,
        "seconds": time.time() - started,
        "cpu_seconds": time.process_time() - cpu_before,
        "torch_imported": "torch" in sys.modules,
        "rss_mb": _rss_mb(os.getpid()),
        "profile": profile,
    }
    if args.out is not None:
        args.out.write_text(json.dumps(record))
    return 0


def _profiled(loop: Callable[[], int]) -> tuple[int, list[dict[str, Any]]]:
    """`loop()` under cProfile, and its functions with the most cumulative time."""
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    ran = profiler.runcall(loop)
    stats = pstats.Stats(profiler)
    rows = []
    for (file, line, name), (_, calls, own, cumulative, _) in stats.stats.items():  # type: ignore[attr-defined]
        rows.append(
            {
                "function": f"{Path(file).name}:{line}({name})",
                "calls": calls,
                "own_s": round(own, 3),
                "cumulative_s": round(cumulative, 3),
            }
        )
    rows.sort(key=lambda r: -r["cumulative_s"])
    return ran, rows[:60]


# --- the processes' CPU, from /proc ---------------------------------------------------

TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far) of a process, or None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def _rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def _machine_busy_seconds() -> float:
    """CPU seconds all cores have spent on anything but idling, since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle and iowait
    return (sum(fields[:8]) - idle) / TICK


class CpuMeter:
    """CPU seconds of groups of processes, sampled: a process's last sample stands for it
    after it ends (at most `SAMPLE_S` of its time is missed)."""

    def __init__(self, postmaster: int | None) -> None:
        self.postmaster = postmaster
        self.last: dict[str, dict[int, float]] = {"postgres": {}, "workers": {}}
        self.first: dict[str, dict[int, float]] = {"postgres": {}, "workers": {}}
        self.machine_first = _machine_busy_seconds()
        self.machine_last = self.machine_first

    def sample(self, workers: Sequence[int]) -> None:
        groups: dict[str, set[int]] = {"workers": set(workers), "postgres": set()}
        if self.postmaster is not None:
            groups["postgres"].add(self.postmaster)
            for entry in Path("/proc").iterdir():
                if entry.name.isdigit():
                    stat = _stat(int(entry.name))
                    if stat is not None and stat[0] == self.postmaster:
                        groups["postgres"].add(int(entry.name))
        for group, pids in groups.items():
            for pid in pids:
                stat = _stat(pid)
                if stat is not None:
                    self.first[group].setdefault(pid, stat[1])
                    self.last[group][pid] = stat[1]
        self.machine_last = _machine_busy_seconds()

    def restart(self) -> None:
        """Count from now: what the processes used before (starting up) is left out."""
        self.first = {group: dict(last) for group, last in self.last.items()}
        self.machine_first = self.machine_last

    def seconds(self) -> dict[str, float]:
        used = {
            group: sum(self.last[group][pid] - self.first[group].get(pid, 0.0) for pid in last)
            for group, last in self.last.items()
        }
        used["machine"] = self.machine_last - self.machine_first
        return {k: round(v, 2) for k, v in used.items()}


# --- one configuration ----------------------------------------------------------------


def run_configuration(
    url: str,
    postmaster: int | None,
    folder: Path,
    *,
    workers: int,
    budget: int,
    heartbeat: int,
    kill_quarter: bool,
    trial_ms: float,
    profile: bool,
    max_seconds: float,
) -> dict[str, Any]:
    """Start `workers` instant workers on a new study in `url`, wait for the budget, and
    measure (see the module's docstring)."""
    storage = open_storage(url, create=True, heartbeat=heartbeat)
    study, _ = create_or_resume(storage, STUDY, PRESETS[PRESET], budget=budget, seed=1)
    go = folder / "go"
    env = {**os.environ, STORAGE_ENV: url, "PYTHONPATH": str(ROOT)}
    processes: list[subprocess.Popen[bytes]] = []
    for i in range(workers):
        command = [
            sys.executable, "-m", "benchmarks.load", "worker", "--study", STUDY,
            "--heartbeat", str(heartbeat), "--trial-ms", str(trial_ms),
            "--ready", str(folder / f"ready-{i}"), "--go", str(go),
            "--out", str(folder / f"worker-{i}.json"),
        ] + (["--profile"] if profile and i == 0 else [])  # fmt: skip
        with (folder / f"worker-{i}.log").open("wb") as log:
            processes.append(
                subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            )
    try:
        return _measure(processes, storage, study._study_id, postmaster, folder, budget,
                        kill_quarter, max_seconds, heartbeat, trial_ms)  # fmt: skip
    finally:
        _kill(processes)


def _measure(
    processes: list[subprocess.Popen[bytes]],
    storage: Any,
    study_id: int,
    postmaster: int | None,
    folder: Path,
    budget: int,
    kill_quarter: bool,
    max_seconds: float,
    heartbeat: int,
    trial_ms: float,
) -> dict[str, Any]:
    """Wait for the workers to be ready, signal them, watch them to the end, and
    measure the run."""
    workers = len(processes)
    go = folder / "go"
    pids = [p.pid for p in processes]
    meter = CpuMeter(postmaster)
    waited = time.monotonic()
    while sum((folder / f"ready-{i}").exists() for i in range(workers)) < workers:
        if any(p.poll() is not None for p in processes):
            _kill(processes)
            raise SystemExit(f"benchmarks.load: a worker ended before starting: see {folder}")
        if time.monotonic() - waited > READY_TIMEOUT_S:
            _kill(processes)
            raise SystemExit(f"benchmarks.load: workers not ready in {READY_TIMEOUT_S} s")
        time.sleep(0.2)
    start_up = time.monotonic() - waited
    rss = [r for r in (_rss_mb(pid) for pid in pids) if r is not None]
    meter.sample(pids)
    meter.restart()
    go.write_text("go")
    t_go = time.time()
    killed: dict[str, Any] | None = None
    timed_out = False
    while any(p.poll() is None for p in processes):
        time.sleep(SAMPLE_S)
        meter.sample(pids)
        if kill_quarter and killed is None:
            complete = _complete_count(storage, study_id)
            if complete >= budget // 2:
                victims = processes[: max(1, workers // 4)]
                for p in victims:
                    p.send_signal(signal.SIGKILL)
                killed = {
                    "workers": len(victims),
                    "seconds_after_go": round(time.time() - t_go, 2),
                    "complete_then": complete,
                }
        if time.time() - t_go > max_seconds:
            timed_out = True
            _kill(processes)
    t_end = time.time()
    meter.sample(pids)
    codes = [p.wait() for p in processes]
    records = []
    for i in range(workers):
        path = folder / f"worker-{i}.json"
        if path.exists():
            records.append(json.loads(path.read_text()))
    outcome = _outcome(storage, study_id, budget, t_go)
    claims = sorted(s for r in records for s in r["claim_seconds"])
    cpu = meter.seconds()
    wall = t_end - t_go
    profiled = next((r["profile"] for r in records if r.get("profile")), None)
    return {
        "workers": workers,
        "budget": budget,
        "heartbeat_s": heartbeat,
        "grace_s": 4 * heartbeat,
        "trial_ms": trial_ms,
        "start_up_seconds": round(start_up, 1),
        "worker_rss_mb": {
            "mean": round(statistics.mean(rss), 1) if rss else None,
            "sum": round(sum(rss), 1),
        },
        "wall_seconds": round(wall, 2),
        "timed_out": timed_out,
        "exit_codes": sorted(set(codes)),
        "killed": killed,
        **outcome,
        "claim_seconds": {
            "n": len(claims),
            "p50": _quantile(claims, 0.5),
            "p90": _quantile(claims, 0.9),
            "p99": _quantile(claims, 0.99),
            "max": claims[-1] if claims else None,
        },
        "cpu_seconds": cpu,
        "cpu_share_of_2_cores": {
            k: round(v / (wall * (os.cpu_count() or 1)), 3) for k, v in cpu.items()
        },
        "cpu_ms_per_trial": {
            k: round(1000 * v / max(1, outcome["complete"]), 2) for k, v in cpu.items()
        },
        "trials_per_worker": {
            "min": min((r["ran"] for r in records), default=None),
            "max": max((r["ran"] for r in records), default=None),
        },
        "torch_imported_by_a_worker": any(r["torch_imported"] for r in records),
        "worker_records": len(records),
        "profile_worker_0": profiled,
    }


def _kill(processes: Sequence[subprocess.Popen[bytes]]) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGKILL)


def _quantile(sorted_values: Sequence[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return round(sorted_values[index], 5)


def _complete_count(storage: Any, study_id: int) -> int:
    from optuna.storages._rdb.models import TrialModel
    from sqlalchemy import func, select

    with storage.engine.connect() as connection:
        return connection.execute(
            select(func.count(TrialModel.trial_id)).where(
                TrialModel.study_id == study_id,
                TrialModel.state == optuna.trial.TrialState.COMPLETE,
            )
        ).scalar_one()


def _outcome(storage: Any, study_id: int, budget: int, t_go: float) -> dict[str, Any]:
    """Every trial's end, read in two queries (not through Optuna, which would read every
    attribute of every trial): the states, the lost trials, the budget, the rate."""
    from optuna.storages._rdb.models import TrialModel, TrialSystemAttributeModel
    from sqlalchemy import select

    State = optuna.trial.TrialState
    with storage.engine.connect() as connection:
        rows = connection.execute(
            # Optuna 5 stores the times as naive UTC, in the column behind this attribute.
            select(TrialModel.number, TrialModel.state, TrialModel._datetime_complete_utc).where(
                TrialModel.study_id == study_id
            )
        ).all()
        histories = connection.execute(
            select(TrialSystemAttributeModel.value_json)
            .join(TrialModel, TrialModel.trial_id == TrialSystemAttributeModel.trial_id)
            .where(
                TrialModel.study_id == study_id, TrialSystemAttributeModel.key == "retry_history"
            )
        ).all()
    retried = {n for (text,) in histories for n in json.loads(text)}
    states: dict[str, int] = {}
    for _, state, _ in rows:
        states[state.name] = states.get(state.name, 0) + 1
    failed = [n for n, state, _ in rows if state == State.FAIL]
    unretried = [n for n in failed if n not in retried]
    complete = states.get("COMPLETE", 0)
    lost = (
        states.get("RUNNING", 0)
        + states.get("WAITING", 0)
        + states.get("PRUNED", 0)
        + len(unretried)
        + max(0, budget - complete)
    )
    utc = datetime.timezone.utc
    ends = sorted(
        t.replace(tzinfo=utc).timestamp() for _, state, t in rows if state == State.COMPLETE and t
    )
    rate: dict[str, Any] = {}
    if len(ends) >= 10:
        first, last = ends[len(ends) // 10], ends[(9 * len(ends)) // 10]
        middle = (9 * len(ends)) // 10 - len(ends) // 10
        rate = {
            "sustained_middle_80pct": round(middle / (last - first), 1) if last > first else None,
            "go_to_last": round(len(ends) / (ends[-1] - t_go), 1),
            "per_second": _per_second(ends, t_go),
        }
    return {
        "trials": len(rows),
        "states": states,
        "complete": complete,
        "overshoot": complete - budget,
        "failed_and_retried": len(failed) - len(unretried),
        "failed_not_retried": len(unretried),
        "lost": lost,
        "trials_per_second": rate,
    }


def _per_second(ends: Sequence[float], t_go: float) -> list[int]:
    """Trials completed in each second after the signal."""
    counts: list[int] = []
    for t in ends:
        second = max(0, int(t - t_go))
        counts.extend([0] * (second + 1 - len(counts)))
        counts[second] += 1
    return counts


# --- the server -----------------------------------------------------------------------


@contextmanager
def databases(backend: str, folder: Path) -> Iterator[tuple[Callable[[str], str], int | None]]:
    """A function giving each configuration a fresh database's URL, and the PostgreSQL
    server's main process (None for SQLite)."""
    if backend == "sqlite":
        yield (lambda name: f"sqlite:///{folder / f'{name}.db'}"), None
        return
    sys.path.insert(0, str(ROOT))
    from tests.pgserver import PgServer, why_unavailable

    reason = why_unavailable()
    if reason:
        raise SystemExit(f"benchmarks.load: no PostgreSQL here: {reason}")
    server = PgServer(settings={"max_connections": str(MAX_CONNECTIONS)})
    try:
        postmaster = int((server.data / "postmaster.pid").read_text().split()[0])
        yield server.create_database, postmaster
    finally:
        server.close()


def _server_version(url: str) -> str | None:
    if not url.startswith("postgresql"):
        return None
    storage = open_storage(url, heartbeat=None)
    from sqlalchemy import text

    with storage.engine.connect() as connection:
        return str(connection.execute(text("SHOW server_version")).scalar_one())


# --- output ---------------------------------------------------------------------------


def summary(run: dict[str, Any]) -> str:
    rate = run["trials_per_second"]
    claims = run["claim_seconds"]
    share = run["cpu_share_of_2_cores"]
    killed = run["killed"]
    return (
        f"{run['workers']} workers, budget {run['budget']:,}"
        + (f", {killed['workers']} killed at {killed['seconds_after_go']} s" if killed else "")
        + f": {rate.get('sustained_middle_80pct')} trials/s sustained "
        f"({rate.get('go_to_last')} from the signal to the last); "
        f"complete {run['complete']:,} (overshoot {run['overshoot']}), lost {run['lost']}, "
        f"failed and retried {run['failed_and_retried']}; claim p50 "
        f"{1000 * (claims['p50'] or 0):.1f} ms, p99 {1000 * (claims['p99'] or 0):.1f} ms; "
        f"CPU share: postgres {share['postgres']:.2f}, workers {share['workers']:.2f}, "
        f"machine {share['machine']:.2f}; torch imported: {run['torch_imported_by_a_worker']}"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        parser = argparse.ArgumentParser(prog="python -m benchmarks.load worker")
        parser.add_argument("--study", default=STUDY)
        parser.add_argument("--heartbeat", type=int, default=2)
        parser.add_argument("--trial-ms", type=float, default=0.0)
        parser.add_argument("--ready", type=Path)
        parser.add_argument("--go", type=Path)
        parser.add_argument("--out", type=Path)
        parser.add_argument("--profile", action="store_true")
        return worker_main(parser.parse_args(argv[1:]))
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.load", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--workers", type=int, default=64)
    parser.add_argument(
        "--budget", type=int, default=2_000, help="trials (default 2,000; issue 20's is 20,000)"
    )
    parser.add_argument("--heartbeat", type=int, default=2, help="seconds (grace: 4 beats)")
    parser.add_argument(
        "--sweep", help="also these worker counts first, comma-separated (e.g. 8,16,32,64)"
    )
    parser.add_argument("--sweep-budget", type=int, help="the sweep's budget (default --budget)")
    parser.add_argument(
        "--kill-quarter",
        action="store_true",
        help="also a run at --workers and --budget with a quarter SIGKILLed halfway",
    )
    parser.add_argument(
        "--kill-only", action="store_true", help="only the run with a quarter SIGKILLed"
    )
    parser.add_argument("--trial-ms", type=float, default=0.0, help="each trial's sleep")
    parser.add_argument("--profile", action="store_true", help="worker 0 under cProfile")
    parser.add_argument("--backend", choices=("postgresql", "sqlite"), default="postgresql")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="per configuration")
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    if args.workers < 1 or args.budget < 1:
        parser.error("--workers and --budget: at least 1")
    try:
        sweep = [int(n) for n in args.sweep.split(",")] if args.sweep else []
    except ValueError:
        parser.error(f"--sweep {args.sweep!r}: whole numbers, comma-separated")
    plan = [(n, args.sweep_budget or args.budget, False) for n in sweep]
    if args.workers not in sweep or args.sweep_budget not in (None, args.budget):
        plan.append((args.workers, args.budget, False))
    if args.kill_only:
        plan = []
    if args.kill_quarter or args.kill_only:
        plan.append((args.workers, args.budget, True))

    out: dict[str, Any] = {
        **storage_run_header(args.backend),
        "postgresql": None,
        "preset": PRESET,
        "target_trials_per_second": TARGET_RATE,
        "runs": [],
    }
    print(f"{out['machine']}, {args.backend}, plan {plan}", flush=True)
    with tempfile.TemporaryDirectory(prefix="load-") as root, databases(
        args.backend, Path(root)
    ) as (url_for, postmaster):  # fmt: skip
        for i, (workers, budget, kill) in enumerate(plan):
            name = f"load_{i}_{workers}_{budget}{'_kill' if kill else ''}"
            url = url_for(name)
            if out["postgresql"] is None:
                out["postgresql"] = _server_version(url)
            folder = Path(root) / name
            folder.mkdir()
            run = run_configuration(
                url, postmaster, folder,
                workers=workers, budget=budget, heartbeat=args.heartbeat, kill_quarter=kill,
                trial_ms=args.trial_ms, profile=args.profile, max_seconds=args.max_seconds,
            )  # fmt: skip
            out["runs"].append(run)
            print(summary(run), flush=True)
            if args.json:
                args.json.write_text(json.dumps(out, indent=1) + "\n")
    lost = any(r["lost"] or r["timed_out"] for r in out["runs"])
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
