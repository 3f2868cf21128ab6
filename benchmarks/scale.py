"""A study of many trials: what reading it costs, at 1,000, 10,000 and 100,000 trials.

    python -m benchmarks.scale [--sizes 1000,10000,100000] [--backend sqlite|postgresql]
                               [--json FILE]
    python -m benchmarks.scale --quick     # 200 and 2,000 trials: the test runs this

For each size a study is made with the `quick` preset (`create_or_resume`, budget N + 1000,
seed 1), in a database of its own, and N finished trials are written into it directly with
Optuna's table models, in batches (`fill`): shaped as the quick preset's workers leave
them — 75 % complete with 30 intermediate values, 22 % pruned after 5 to 29 epochs, 3 %
failed; the seven parameters with their distributions as Optuna stores them; the seven
user attributes the objective stores; a heartbeat; and one failed trial in three queued
again, its retry carrying Optuna's `failed_trial` and `retry_history`.

Then, side by side on that study:
- the old rule and the new for counting it, in this process: `count_every_trial` (reads
  every trial) and `count_trials` (grouped queries, `ResilientRDBStorage.trial_tally`), on
  a freshly loaded study each time (Optuna caches finished trials per loaded study), and
  whether they count the same;
- `mnist-study status` and `status --json`, each a process of its own, and a process that
  only imports the CLI (`status --help`): the floor no study size moves;
- a joining worker's cost before its first trial, as `study.worker.run_worker` spends it
  without loading MNIST: open the storage, `load_study`, `study_preset`,
  `recent_stack_seconds` (its first stack's expected length), `fail_stale_trials`,
  `count_trials` and one `_claim`; then a claim in a steady state (a second `_claim`) and
  a whole step of the worker's loop (fail stale trials, count, claim);
- `mnist-study report` (and its page's size) and retrain's best lookup
  (`best_finished_trial`), only while their time, extrapolated from the largest size run
  so far, stays under `--slow-limit` seconds (default 180). Over 5,000 finished trials
  the report draws its plots from a sample (`study.trial_sample`), so this extrapolation
  overstates it: raise the limit to run it.

Quick things are timed three times (the median), anything over 5 s once, and everything
once with `--quick`.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna

from benchmarks.machine import storage_run_header
from study.budget import StudyCounts, count_every_trial, count_trials
from study.database import open_storage
from study.presets import PRESETS
from study.resilient_storage import ResilientRDBStorage
from study.studies import create_or_resume, fail_stale_trials, load_study, study_preset

SIZES = (1_000, 10_000, 100_000)
QUICK_SIZES = (200, 2_000)
STUDY = "scale"
BATCH = 5_000  # trials per insert: 5,000 trials are ~150,000 intermediate-value rows
REPEATS = 3
ONCE_OVER_S = 5.0
ROOT = Path(__file__).resolve().parent.parent

# The targets of issue 20, checked when 1,000 and 100,000 are among the sizes.
STATUS_GROWTH_TARGET = 2.0
STATUS_TARGET_S = 1.0
FIRST_CLAIM_TARGET_S = 2.0
REPORT_TARGET_S = 60.0
REPORT_PAGE_TARGET_BYTES = 20_000_000


# --- filling --------------------------------------------------------------------------


def fill(storage: ResilientRDBStorage, study: optuna.Study, n: int, seed: int = 0) -> None:
    """Write `n` finished trials into `study`, as the quick preset's workers leave them."""
    from optuna.distributions import distribution_to_json
    from optuna.storages._rdb import models
    from sqlalchemy import func, insert, select, text

    preset = study_preset(study)
    distributions = preset.space.distributions()
    as_json = {name: distribution_to_json(d) for name, d in distributions.items()}
    epochs = preset.defaults.max_epochs
    k = preset.defaults.k
    rng = random.Random(seed)
    value_type = models.TrialValueModel.TrialValueType.FINITE
    step_type = models.TrialIntermediateValueModel.TrialIntermediateValueType.FINITE
    start = datetime.datetime(2026, 12, 1)
    with storage.engine.begin() as connection:
        first_id = connection.execute(select(func.max(models.TrialModel.trial_id))).scalar() or 0
    first_id += 1
    params: dict[str, Any] = {}
    for batch_start in range(0, n, BATCH):
        rows: dict[Any, list[dict[str, Any]]] = {
            m: []
            for m in (
                models.TrialModel,
                models.TrialValueModel,
                models.TrialIntermediateValueModel,
                models.TrialUserAttributeModel,
                models.TrialSystemAttributeModel,
                models.TrialParamModel,
                models.TrialHeartbeatModel,
            )
        }
        previous_failed: int | None = None
        for number in range(batch_start, min(n, batch_start + BATCH)):
            trial_id = first_id + number
            retry_of = (
                previous_failed if previous_failed is not None and rng.random() < 1 / 3 else None
            )
            if retry_of is None:
                params = {name: _draw(rng, d) for name, d in distributions.items()}
            draw = rng.random()
            state = (
                optuna.trial.TrialState.COMPLETE
                if draw < 0.75
                else optuna.trial.TrialState.PRUNED
                if draw < 0.97
                else optuna.trial.TrialState.FAIL
            )
            ran = (
                epochs if state == optuna.trial.TrialState.COMPLETE else rng.randint(5, epochs - 1)
            )
            seconds = round(rng.uniform(20, 90) * ran / epochs, 3)
            began = start + datetime.timedelta(seconds=60 * number)
            rows[models.TrialModel].append(
                {
                    "trial_id": trial_id,
                    "number": number,
                    "study_id": study._study_id,
                    "state": state,
                    "datetime_start": began,
                    "datetime_complete": began + datetime.timedelta(seconds=seconds),
                }
            )
            rows[models.TrialHeartbeatModel].append(
                {"trial_id": trial_id, "heartbeat": began + datetime.timedelta(seconds=seconds)}
            )
            rows[models.TrialParamModel] += [
                {
                    "trial_id": trial_id,
                    "param_name": name,
                    "param_value": distributions[name].to_internal_repr(value),
                    "distribution_json": as_json[name],
                }
                for name, value in params.items()
            ]
            if retry_of is not None:
                rows[models.TrialSystemAttributeModel] += [
                    {"trial_id": trial_id, "key": "failed_trial", "value_json": str(retry_of)},
                    {"trial_id": trial_id, "key": "retry_history", "value_json": f"[{retry_of}]"},
                ]
            previous_failed = number if state == optuna.trial.TrialState.FAIL else None
            accuracy = 0.90 + 0.07 * rng.random() * ran / epochs
            rows[models.TrialIntermediateValueModel] += [
                {
                    "trial_id": trial_id,
                    "step": step,
                    "intermediate_value": round(accuracy - 0.3 / step, 6),
                    "intermediate_value_type": step_type,
                }
                for step in range(1, ran + 1)
            ]
            if state == optuna.trial.TrialState.FAIL:
                continue  # a training error: nothing recorded (`Objective._record`)
            folds = [round(accuracy + rng.uniform(-0.01, 0.01), 6) for _ in range(k)]
            if state == optuna.trial.TrialState.COMPLETE:
                rows[models.TrialValueModel].append(
                    {
                        "trial_id": trial_id,
                        "objective": 0,
                        "value": statistics.fmean(folds),
                        "value_type": value_type,
                    }
                )
            attrs = {
                "fold_accuracies": folds,
                "accuracy_sd": statistics.pstdev(folds),
                "best_epochs": [max(1, ran - rng.randint(0, 5)) for _ in range(k)],
                "epochs_run": [ran] * k,
                "seconds": seconds,
                "device": "cpu",
                "worker": f"host-{number % 4}:{4000 + number % 4} (cpu)",
            }
            rows[models.TrialUserAttributeModel] += [
                {"trial_id": trial_id, "key": key, "value_json": json.dumps(value)}
                for key, value in attrs.items()
            ]
        with storage.engine.begin() as connection:
            for model, batch in rows.items():
                if batch:
                    connection.execute(insert(model.__table__), batch)
    if storage.engine.dialect.name == "postgresql":
        # The trials were given their ids; the next `ask` takes its id from the sequence.
        with storage.engine.begin() as connection:
            connection.execute(
                text(
                    "SELECT setval(pg_get_serial_sequence('trials', 'trial_id'), "
                    "(SELECT max(trial_id) FROM trials))"
                )
            )


def _draw(rng: random.Random, distribution: Any) -> Any:
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        return rng.choice(distribution.choices)
    if isinstance(distribution, IntDistribution):
        return rng.randint(distribution.low, distribution.high)
    if distribution.log:
        return math.exp(rng.uniform(math.log(distribution.low), math.log(distribution.high)))
    return rng.uniform(distribution.low, distribution.high)


# --- timing ---------------------------------------------------------------------------


def median_seconds(call: Callable[[], Any], repeats: int) -> tuple[float, Any]:
    """The median seconds of `call` over `repeats` runs (one, if the first took over
    ONCE_OVER_S), and the last run's result."""
    times = []
    result = None
    for _ in range(repeats):
        began = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - began)
        if times[0] > ONCE_OVER_S:
            break
    return statistics.median(times), result


def cli(*args: str) -> Callable[[], None]:
    """A call that runs `python -m study ARGS` as its own process, as a user would."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}

    def call() -> None:
        subprocess.run(
            [sys.executable, "-m", "study", *args],
            check=True,
            capture_output=True,
            env=env,
            cwd=ROOT,
            timeout=1800,
        )

    return call


def counts_key(counts: StudyCounts) -> dict[str, Any]:
    """The counts as a comparable record (the best trial by its number)."""
    out = counts.as_dict()
    out["best"] = None if counts.best is None else counts.best.number
    return out


def join_and_claim(url: str) -> dict[str, float]:
    """A joining worker's steps before its first trial, each timed once, and then its
    next claim and a whole step of its loop."""
    from study.worker import _claim, recent_stack_seconds

    parts: dict[str, float] = {}

    @contextmanager
    def part(name: str) -> Iterator[None]:
        began = time.perf_counter()
        yield
        parts[name] = time.perf_counter() - began

    with part("open_storage"):
        storage = open_storage(url)
    with part("load_study"):
        study = load_study(storage, STUDY)
    with part("study_preset"):
        study_preset(study)
    with part("recent_stack_seconds"):
        recent_stack_seconds(study, "cpu", 1)
    with part("fail_stale_trials"):
        fail_stale_trials(study)
    with part("count_trials"):
        count_trials(study)
    with part("claim"):
        _claim(study, storage, 1)
    first = sum(parts.values())
    without_stack_clock = first - parts["recent_stack_seconds"]
    with part("steady_claim"):
        _claim(study, storage, 1)
    with part("steady_loop_step"):
        fail_stale_trials(study)
        count_trials(study)
        _claim(study, storage, 1)
    storage.engine.dispose()
    return {
        **parts,
        "first_claim": first,
        "first_claim_without_recent_stack_seconds": without_stack_clock,
    }


def measure(
    url: str, n: int, slow_limit: float, rates: dict[str, float], repeats: int = REPEATS
) -> dict[str, Any]:
    """Fill a study of `n` trials at `url` and time everything on it, quick things
    `repeats` times."""
    from study.retrain import best_finished_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, create=True)
    study, _ = create_or_resume(storage, STUDY, PRESETS["quick"], budget=n + 1000, seed=1)
    began = time.perf_counter()
    fill(storage, study, n)
    out: dict[str, Any] = {"trials": n, "fill_seconds": time.perf_counter() - began}
    seconds: dict[str, float | None] = {}
    not_run: dict[str, str] = {}

    def fresh() -> optuna.Study:
        return load_study(storage, STUDY)

    def timed(call: Callable[[], Any], once: bool = False) -> tuple[float, Any]:
        return median_seconds(call, 1 if once else repeats)

    seconds["count_every_trial"], every = timed(lambda: count_every_trial(fresh()))
    seconds["count_trials"], tally = timed(lambda: count_trials(fresh()))
    out["counts"] = {"count_every_trial": counts_key(every), "count_trials": counts_key(tally)}
    out["counts_equal"] = counts_key(every) == counts_key(tally)
    seconds["cli_import"], _ = timed(cli("status", "--help"))
    seconds["status"], _ = timed(cli("status", "--storage", url, "--study", STUDY))
    seconds["status_json"], _ = timed(cli("status", "--storage", url, "--study", STUDY, "--json"))
    with tempfile.TemporaryDirectory(prefix="scale-report-") as folder:
        slow = {
            "report": cli(
                "report", "--storage", url, "--study", STUDY, "--out", folder,
                "--artifacts", folder,
            ),
            "best_lookup": lambda: best_finished_trial(fresh()),
        }  # fmt: skip
        for name, call in slow.items():
            estimate = rates.get(name, 0.0) * n
            if estimate > slow_limit:
                seconds[name] = None
                not_run[name] = (
                    f"not run: about {estimate:.0f} s at the per-trial rate of the last size "
                    f"run, over the {slow_limit:.0f} s limit"
                )
                continue
            seconds[name], _ = timed(call, once=n >= 10_000)
            rates[name] = seconds[name] / n
        page = Path(folder) / "index.html"
        out["report_page_bytes"] = page.stat().st_size if page.exists() else None
    storage.engine.dispose()
    # Last: the claims leave running trials behind.
    out["join"] = join_and_claim(url)
    seconds["first_claim"] = out["join"]["first_claim"]
    seconds["steady_claim"] = out["join"]["steady_claim"]
    # The same study without its pruner: a study whose sampler and pruner read no history
    # (the seed preset's) is loaded without Optuna's cache (`study.studies.load_study`).
    storage = open_storage(url)
    load_study(storage, STUDY).set_user_attr("pruner", "none")
    storage.engine.dispose()
    out["join_history_free"] = join_and_claim(url)
    seconds["first_claim_history_free"] = out["join_history_free"]["first_claim"]
    seconds["steady_claim_history_free"] = out["join_history_free"]["steady_claim"]
    out["seconds"] = seconds
    out["not_run"] = not_run
    return out


# --- backends -------------------------------------------------------------------------


@contextmanager
def databases(backend: str, folder: Path) -> Iterator[Callable[[int], str]]:
    """A function giving each size a fresh, empty database's URL."""
    if backend == "sqlite":
        yield lambda n: f"sqlite:///{folder / f'scale-{n}.db'}"
        return
    sys.path.insert(0, str(ROOT))
    from tests.pgserver import PgServer, why_unavailable

    reason = why_unavailable()
    if reason:
        raise SystemExit(f"benchmarks.scale: no PostgreSQL here: {reason}")
    server = PgServer()
    try:
        yield lambda n: server.create_database(f"scale_{n}")
    finally:
        server.close()


# --- output ---------------------------------------------------------------------------

ROWS = (
    ("count_every_trial", "count_every_trial (old rule, in-process)"),
    ("count_trials", "count_trials (new rule, in-process)"),
    ("cli_import", "a CLI process that only starts (status --help)"),
    ("status", "mnist-study status"),
    ("status_json", "mnist-study status --json"),
    ("first_claim", "joining worker: storage to first claim (median pruner)"),
    ("steady_claim", "a claim in a steady state (median pruner)"),
    ("first_claim_history_free", "joining worker, no pruner (as the seed preset)"),
    ("steady_claim_history_free", "a steady claim, no pruner"),
    ("report", "mnist-study report"),
    ("best_lookup", "retrain's best lookup"),
)


def growth(results: list[dict[str, Any]], key: str) -> float | None:
    """How many times longer per tenfold more trials, from the smallest size to the
    largest with a time."""
    points = [(r["trials"], r["seconds"].get(key)) for r in results]
    points = [(n, s) for n, s in points if s]
    if len(points) < 2:
        return None
    (n0, s0), (n1, s1) = points[0], points[-1]
    return (s1 / s0) ** (1 / math.log10(n1 / n0))


def targets(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    by_size = {r["trials"]: r for r in results}
    if 1_000 not in by_size or 100_000 not in by_size:
        return []
    small, large = by_size[1_000], by_size[100_000]
    status_1k, status_100k = small["seconds"]["status"], large["seconds"]["status"]
    first_claim = large["seconds"]["first_claim"]
    free_claim = large["seconds"]["first_claim_history_free"]
    report, page = large["seconds"]["report"], large.get("report_page_bytes")
    return [
        {
            "target": f"status at 100k <= {STATUS_GROWTH_TARGET:g}x its time at 1k",
            "measured": f"{status_100k:.2f} s against {status_1k:.2f} s "
            f"({status_100k / status_1k:.2f}x)",
            "met": status_100k <= STATUS_GROWTH_TARGET * status_1k,
        },
        {
            "target": f"status at 100k under {STATUS_TARGET_S:g} s",
            "measured": f"{status_100k:.2f} s",
            "met": status_100k < STATUS_TARGET_S,
        },
        {
            "target": f"a joining worker's first claim at 100k <= {FIRST_CLAIM_TARGET_S:g} s "
            "(the quick preset's median pruner)",
            "measured": f"{first_claim:.2f} s",
            "met": first_claim <= FIRST_CLAIM_TARGET_S,
        },
        {
            "target": f"the same, no pruner (as the seed preset) <= {FIRST_CLAIM_TARGET_S:g} s",
            "measured": f"{free_claim:.2f} s",
            "met": free_claim <= FIRST_CLAIM_TARGET_S,
        },
        {
            "target": f"report at 100k <= {REPORT_TARGET_S:g} s, "
            f"page <= {REPORT_PAGE_TARGET_BYTES / 1e6:g} MB",
            "measured": "not run"
            if report is None or page is None
            else f"{report:.1f} s, {page / 1e6:.1f} MB",
            "met": report is not None
            and page is not None
            and report <= REPORT_TARGET_S
            and page <= REPORT_PAGE_TARGET_BYTES,
        },
    ]


def table(results: list[dict[str, Any]]) -> str:
    sizes = [r["trials"] for r in results]
    lines = [
        "| seconds | " + " | ".join(f"{n:,} trials" for n in sizes) + " | growth per tenfold |",
        "|---|" + "---|" * (len(sizes) + 1),
    ]
    for key, label in ROWS:
        cells = []
        for r in results:
            value = r["seconds"].get(key)
            cells.append("not run" if value is None else f"{value:.3f}")
        rate = growth(results, key)
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {'' if rate is None else f'{rate:.2f}x'} |"
        )
    pages = " | ".join(
        "-" if r.get("report_page_bytes") is None else f"{r['report_page_bytes'] / 1e6:.2f}"
        for r in results
    )
    lines.append(f"| (the report's page, MB) | {pages} | |")
    fills = " | ".join(f"{r['fill_seconds']:.1f}" for r in results)
    lines.append(f"| (filling the study) | {fills} | |")
    return "\n".join(lines)


def parse_sizes(parser: argparse.ArgumentParser, text: str) -> tuple[int, ...]:
    """`--sizes`: study sizes, comma-separated whole numbers, each at least 1."""
    try:
        sizes = tuple(int(s) for s in text.split(","))
    except ValueError:
        parser.error(f"--sizes {text!r}: whole numbers, comma-separated")
    if not sizes or min(sizes) < 1:
        parser.error(f"--sizes {text!r}: each at least 1")
    return sizes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--sizes",
        default=",".join(str(n) for n in SIZES),
        help="trials in each study, comma-separated (default 1000,10000,100000)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="sizes 200,2000, each thing timed once: seconds"
    )
    parser.add_argument("--backend", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument(
        "--slow-limit",
        type=float,
        default=180.0,
        help="skip report and the best lookup where expected to take longer (default 180 s)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON")
    args = parser.parse_args(argv)
    sizes = QUICK_SIZES if args.quick else parse_sizes(parser, args.sizes)
    out: dict[str, Any] = {
        **storage_run_header(args.backend),
        "sizes": list(sizes),
        "results": [],
    }
    print(f"{out['machine']}, {args.backend}, sizes {list(sizes)}", flush=True)
    rates: dict[str, float] = {}
    with (
        tempfile.TemporaryDirectory(prefix="scale-") as folder,
        databases(args.backend, Path(folder)) as url_for,
    ):
        for n in sorted(sizes):
            repeats = 1 if args.quick else REPEATS
            result = measure(url_for(n), n, args.slow_limit, rates, repeats)
            out["results"].append(result)
            print(f"{n:,} trials: filled in {result['fill_seconds']:.1f} s; " + ", ".join(
                f"{k} {'-' if v is None else f'{v:.3f}'}" for k, v in result["seconds"].items()
            ), flush=True)  # fmt: skip
            for name, why in result["not_run"].items():
                print(f"  {name}: {why}", flush=True)
            out["growth_per_tenfold"] = {key: growth(out["results"], key) for key, _ in ROWS}
            out["targets"] = targets(out["results"])
            if args.json:
                args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(table(out["results"]))
    for target in out["targets"]:
        print(f"{target['target']}: {target['measured']}: {'met' if target['met'] else 'NOT met'}")
    if not all(r["counts_equal"] for r in out["results"]):
        print("the two counting rules disagree: see 'counts' in the results", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
