#!/usr/bin/env bash
# The GPU check, in two calls that fit one device lease (15 minutes, the machine's start
# included, at most 10 a call):
#
#   GPU_CHECK_CALL=studies benchmarks/gpu_check.sh OUTDIR   # call 1 (the default)
#   GPU_CHECK_CALL=tests   benchmarks/gpu_check.sh OUTDIR   # call 2, with the time left
#
# Call 1 begins with the side-by-side (benchmarks/paths.py, at most 90 s): today's trainer
# (the commit that `make gpu-baseline` puts in .baseline/) and the checkout's, each
# training the seed study's first 8 draws as one stack, eager and as CUDA graphs, with the
# card's ceilings and a check that the two agree. The studies then run on the faster path
# that agreed: on today's where the new one fails or disagrees, on the new one alone where
# there is no .baseline/. Then it carries the studies on from lease to lease. The seed
# study lives in a committed database, results/seed-study/optuna.db: the call copies it
# (or starts the study, the first time), runs the graphs' gate (the chosen path's own
# tests), resumes the study until shortly before its deadline, records the run and hands
# the database back in OUTDIR, for the session to commit over the old one. Once the seed
# study is whole, the next call first retrains its best trial and writes its report, then
# gives its time to the wide study, carried the same way in results/wide-study/optuna.db.
# Call 2 runs the benchmarks, then the CUDA tests, each under its own cap.
# benchmarks/README.md ("The GPU check") gives the session's exact calls and where each
# file that comes back is committed.
#
# Written for a lent machine with one NVIDIA GPU, Python 3.12, PyTorch, torchvision and
# pytest but no Optuna and no network, run from a copy of this repository: the code runs
# from the checkout (today's trainer from .baseline/ on PYTHONPATH, ahead of it, when the
# side-by-side chooses it); Optuna and the study's other dependencies are installed from the
# wheels in .wheels/ (`make gpu-wheels`) when they are missing; MNIST comes from ./data or
# from the gzipped IDX files in .mnist-gz/ (`make gpu-mnist`). On a machine without CUDA
# it runs too (CUDA tests skipped, everything on the CPU, the side-by-side at a CPU's
# sizes, printing CPU times), to try it out:
#
#   make gpu-baseline    # today's trainer in .baseline/ (else the new path runs alone)
#   SEED_STUDY_PRESET=tiny SEED_STUDY_DB=/tmp/tiny/optuna.db GPU_CHECK_SECONDS=150 \
#     benchmarks/gpu_check.sh /tmp/gpu-check
#
# Settings, from the environment:
#   GPU_CHECK_CALL      studies (default) or tests
#   GPU_CHECK_SECONDS   everything ends by then (default 540; give the call's timeout_s
#                       less 30, as the device brings back only what OUTDIR holds by then)
#   GPU_CHECK_QUICK=1   tests call: shortens every benchmark
#   GPU_CHECK_PATH      studies call: auto (default): the side-by-side first, the studies
#                       on the path it chooses; new or baseline: no side-by-side, the
#                       studies on that path
#   GPU_CHECK_PATHS_SECONDS  the side-by-side's cap (default 90; it never takes more than
#                       what leaves the seed study the 90 s it needs at the least)
#   GPU_CHECK_BASELINE  today's trainer (default .baseline, made by `make gpu-baseline`)
#   GPU_CHECK_STUDIES   studies call: which may run, in this order: "seed wide" (default),
#                       "seed", "wide", or "" for none; the wide study runs only once the
#                       seed study is whole and retrained
#   SEED_STUDY_DB       the seed study's database (default results/seed-study/optuna.db;
#                       read, never written: the new one comes back in OUTDIR)
#   SEED_STUDY_PRESET   the seed study's preset (default seed)
#   SEED_STUDY_WORKERS  its `run --workers-per-device` (default 2)
#   SEED_STUDY_TRIALS_PER_WORKER  its `run --trials-per-worker` (default 8)
#   SEED_STUDY_GRAPHS   1: `run --cuda-graphs`; 0: not; auto (default): when CUDA is here
#                       and the graph tests (dropout included) pass first
#   SEED_STUDY_PRECISION  its `run --precision`, passed only when set
#   SEED_STUDY_BUDGET   its `run --n-trials`, passed only when set (the preset's budget,
#                       200, is the study's; a smaller one tries the script out)
#   WIDE_STUDY_DB, WIDE_STUDY_PRESET (wide), WIDE_STUDY_WORKERS (2),
#   WIDE_STUDY_TRIALS_PER_WORKER (4), WIDE_STUDY_GRAPHS (0), WIDE_STUDY_PRECISION,
#   WIDE_STUDY_BUDGET: likewise
#
# OUTDIR gets at most 8 files, as many as the device brings back (each under 16 MiB):
#   check.txt           the set-up (with the wheels' installation); in the tests call, the
#                       benchmarks' and the tests' output, one section each
#   benchmarks.json     tests call: the benchmarks' numbers, written after every case
#   studies.txt         studies call: the side-by-side's table and choice, then what each
#                       study's gate, run, retrain, report and record printed
#   paths.json          studies call: the side-by-side's numbers (benchmarks/paths.py)
#   seed-study.db       the seed study's database after this call (commit it as
#                       results/seed-study/optuna.db)
#   <preset>-study-<gpu>-<date>.json  the seed study's record of this call's run
#   seed-study.tar      once the study is whole: runs/<study>/metrics.json and best.pt,
#                       and the report's PNGs
#   wide-study.db, wide-study-<gpu>-<date>.json: the wide study's, likewise (its tar and
#                       result record wait for a call in which it is whole)
# (At most 8 in a studies call: paths.json, check.txt, studies.txt and the seed study's
# three with the wide study's two where the seed study becomes whole and retrained and
# the wide one starts in one call; in a later call the seed study brings back only its
# database.)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
call=${GPU_CHECK_CALL:-studies}
case $call in
  studies | tests) ;;
  *) echo "GPU_CHECK_CALL: no call '$call' (studies, tests)" >&2; exit 2 ;;
esac
studies=" ${GPU_CHECK_STUDIES-seed wide} "
for name in $studies; do
  case $name in
    seed | wide) ;;
    *) echo "GPU_CHECK_STUDIES: no study '$name' (seed, wide)" >&2; exit 2 ;;
  esac
done
wants() { [[ $studies == *" $1 "* ]]; }
path_choice=${GPU_CHECK_PATH:-auto}
case $path_choice in
  auto | new | baseline) ;;
  *) echo "GPU_CHECK_PATH: no path '$path_choice' (auto, new, baseline)" >&2; exit 2 ;;
esac
# Today's trainer, as an absolute path: the studies run in folders of their own.
baseline=${GPU_CHECK_BASELINE:-$(dirname "$0")/../.baseline}
[ -d "$baseline" ] && baseline=$(cd "$baseline" && pwd)
if [ "$path_choice" = baseline ] && [ ! -d "$baseline/model" ]; then
  echo "GPU_CHECK_PATH=baseline: no model/ in $baseline (make gpu-baseline)" >&2
  exit 2
fi
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the studies run in folders of their own
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-540}))
left() { echo $((deadline - SECONDS)); }
# Each step's own output, before it joins check.txt; the summary reads it from here.
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT

if [ ! -f data/MNIST/raw/t10k-labels-idx1-ubyte ] && [ -d .mnist-gz ]; then
  mkdir -p data/MNIST/raw
  for f in .mnist-gz/*.gz; do gunzip -c "$f" > "data/MNIST/raw/$(basename "$f" .gz)"; done
fi

# What the study CLI imports beyond torch and torchvision, which the machine has.
study_imports='import optuna, sqlalchemy, plotly, tqdm, matplotlib'
install_wheels() {
  "$py" -m pip install --no-index --find-links .wheels -r .wheels/requirements.txt && return
  # A system Python refuses pip's installs (PEP 668, "externally managed"): into a folder
  # of our own instead, every carried wheel, the machine's numpy and pillow beneath them.
  echo "installing into .pydeps instead"
  "$py" -m pip install --no-index --no-deps --target .pydeps .wheels/*.whl && return
  # No pip at all: a wheel is a zip archive laid out as site-packages.
  echo "no pip: unpacking the wheels into .pydeps"
  local wheel
  for wheel in .wheels/*.whl; do "$py" -m zipfile -e "$wheel" .pydeps || return 1; done
}

{
  echo "== set-up ($call call) =="
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi: no GPU here"
  "$py" -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  if [ "$call" = studies ] && ! "$py" -c "$study_imports" 2>/dev/null \
      && [ -f .wheels/requirements.txt ]; then
    echo "installing the study's dependencies from .wheels/"
    time install_wheels
  fi
} > "$out/check.txt" 2>&1
[ -d .pydeps ] && export PYTHONPATH="$PYTHONPATH:$repo/.pydeps"
status=0

# --- Call 2: the benchmarks, then the CUDA tests ---------------------------------------
if [ "$call" = tests ]; then
  if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
    bench_args=(--rounds 1 --full-epochs 1 --trials 1 --max-minutes 0.1 --scaling-epochs 1
                --stack-sizes "1,2" --stack-epochs 1)
  else
    # The seed study times whole trials, so the estimate times one; the stacking case's
    # graph way is timed over 20 replayed epochs (speed.py, `_graph_replays`).
    bench_args=(--rounds 1 --trials 1 --max-minutes 0.25 --stack-sizes "1,2,4,8"
                --stack-epochs 20 --graphs)
  fi
  # The benchmarks get at most half the call (their stacking case first, which the GPU
  # default of trials per worker waits on), the tests the rest; each writes as it goes
  # (the benchmarks' file after every case, pytest's report line by line), so a cap that
  # cuts one short still brings back what it did. The exit status is taken at once:
  # after `|| status=1`, $PIPESTATUS would hold the assignment's 0.
  timeout $(($(left) / 2)) "$py" -m benchmarks.speed all "${bench_args[@]}" \
    --json "$out/benchmarks.json" > "$logs/benchmarks.txt" 2>&1
  rc=$?
  echo "benchmark exit status: $rc" >> "$logs/benchmarks.txt"
  [ "$rc" = 0 ] || status=1
  timeout $(($(left) - 10)) "$py" -m pytest -q -rs -p no:cacheprovider \
    tests/test_fastpath.py tests/test_kfold.py \
    tests/test_resume.py::test_cuda_trials_resumed_from_snapshots_end_as_the_uninterrupted_run \
    > "$logs/tests.txt" 2>&1
  rc=$?
  echo "pytest exit status: $rc" >> "$logs/tests.txt"
  [ "$rc" = 0 ] || status=1
  {
    echo "== benchmarks =="; cat "$logs/benchmarks.txt"
    echo "== tests =="; cat "$logs/tests.txt"
  } >> "$out/check.txt"
  tail -n 3 "$logs/tests.txt"
  grep -E "speed-up|minutes|→|trials/s|exit status: [^0]" "$logs/benchmarks.txt"
  exit $status
fi

# --- Call 1: the studies, each resumed from its committed database ----------------------

# A study runs in a folder of its own (its optuna.db, runs/, reports/), in the machine's
# environment, on this checkout's MNIST.
in_study_dir() { (cd "$1" && shift && MNIST_ROOT="$repo/data" "$@"); }
# Wall seconds since `date +%s.%N` printed $1.
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }'; }
# One setting of the study of kind $kind: SEED_STUDY_$1 or WIDE_STUDY_$1, else $2.
setting() { local name="${kind^^}_STUDY_$1"; echo "${!name:-$2}"; }
has_cuda() { "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; }
# Where the study stands, from `mnist-study status --json`: sets finished, budget, best
# and retrained (trial numbers, or -); fails, saying so, where the database cannot tell.
read_standing() {
  local line
  line=$(in_study_dir "$dir" "$py" -m study status --storage "$url" --study "$study" --json |
    "$py" -c 'import json, sys
s = next(iter(json.load(sys.stdin).values()))
best = "-" if s["best"] is None else s["best"]["number"]
retrained = "-" if s["retrained_trial"] is None else s["retrained_trial"]
print(s["finished"], s["budget"], best, retrained)' 2>/dev/null) || {
    echo "cannot read the $kind study's standing from its database"
    status=1
    return 1
  }
  read -r finished budget best retrained <<< "$line"
}

# Seconds the study block keeps after the run: `margin` for the trials in hand (workers
# claim no stack that they expect to end past `--timeout`, so this is for an estimate
# gone wrong), `after` for the record and the database. A block that would have less
# than `least` seconds of study does not start. `finish` is what the retrain, the report
# and the tar need, once the study is whole.
margin=20 after=25 least=45 finish=150

# study_block KIND: the seed or the wide study, resumed from its committed database.
study_block() {
  kind=$1
  local preset db workers per_worker graphs precision trials seconds started wall before
  local finished budget best retrained run_status record_args=()
  preset=$(setting PRESET "$kind")
  db=$(setting DB "results/$kind-study/optuna.db")
  workers=$(setting WORKERS 2)
  per_worker=$(setting TRIALS_PER_WORKER "$([ "$kind" = seed ] && echo 8 || echo 4)")
  graphs=$(setting GRAPHS "$([ "$kind" = seed ] && echo auto || echo 0)")
  precision=$(setting PRECISION "")
  trials=$(setting BUDGET "")
  study=mnist-$preset
  dir=$(mktemp -d)
  url="sqlite:///$dir/optuna.db"
  echo "== $kind study ($preset) =="
  if [ -f "$db" ]; then
    cp "$db" "$dir/optuna.db" || { status=1; return 1; }
    read_standing || return 1
    echo "resumed from $db: $finished/$budget trials finished"
  else
    echo "no $db: the study starts here"
    finished=0 budget=1 best=- retrained=-
  fi
  # A budget given anew replaces the stored one (`run --n-trials`).
  [ -n "$trials" ] && budget=$trials
  before=$finished

  if [ "$finished" -lt "$budget" ]; then
    if [ "$graphs" = auto ]; then
      # Whole epochs as CUDA graphs only where they have just trained the study's own
      # kind of stack (dropout, both optimizers, a stack that shrinks) as well as eager
      # epochs on this GPU, with no capture falling back. The tests that compare their
      # numbers with eager ones to the last few ulps run in the tests call: on 2026-12-04
      # one of them failed on an H200 on a near-tie of two epochs' losses, and kept graphs
      # from a study they would not have harmed.
      # They are the chosen path's own tests, run from its folder, whose model/ `python -m`
      # puts first on the path: today's tests gate today's trainer.
      graphs=0
      if has_cuda; then
        if (cd "$gate_dir" && MNIST_ROOT="$repo/data" timeout $(($(left) / 3)) "$py" -m pytest \
            -q -p no:cacheprovider tests/test_fastpath.py \
            -k "graph_epochs_with_dropout or graph_epochs_of_seed_trials or failed_capture"); then
          graphs=1
        else
          echo "graphs' gate failed: the study runs eager epochs"
        fi
      fi
    fi
    seconds=$(($(left) - margin - after))
    if [ "$seconds" -lt "$least" ]; then
      echo "$kind study not run: $(left) s left, it needs $((least + margin + after))"
      status=1
    else
      local args=(run --preset "$preset" --storage "$url" --workers-per-device "$workers"
                  --no-retrain --trials-per-worker "$per_worker")
      [ "$graphs" = 1 ] && args+=(--cuda-graphs)
      [ -n "$precision" ] && args+=(--precision "$precision")
      [ -n "$trials" ] && args+=(--n-trials "$trials")
      echo "\$ mnist-study ${args[*]} --timeout $seconds"
      started=$(date +%s.%N)
      # Past `margin`, stopped as Ctrl-C would: the trials in hand are queued again.
      # (`-k 25`: `run` gives its workers 20 s to queue their trials again.)
      in_study_dir "$dir" timeout -s INT -k 25 $((seconds + margin)) \
        "$py" -m study "${args[@]}" --timeout "$seconds"
      run_status=$?
      wall=$(since "$started")
      echo "study exit status: $run_status, wall ${wall} s"
      [ "$run_status" = 0 ] || status=1
      record_args=(--storage "$url" --study "$study" --wall-seconds "$wall"
                   --workers "$workers" --trials-per-worker "$per_worker"
                   --cuda-graphs "$graphs" --precision "$precision"
                   --finished-before "$before" --run-started "${started%.*}" --out "$out")
      timeout 30 "$py" -m benchmarks.study_record "${record_args[@]}" || status=1
      read_standing || return 1
    fi
  fi
  # The database goes back whatever happened: it holds every trial told so far.
  [ -f "$dir/optuna.db" ] && { cp "$dir/optuna.db" "$out/$kind-study.db" || status=1; }

  if [ "$finished" -ge "$budget" ] && [ "$retrained" != "$best" ]; then
    if [ "$(left)" -lt "$finish" ]; then
      echo "$kind study whole: its retrain and report wait for the next call ($(left) s left)"
    else
      echo "$kind study whole: retraining trial $best and writing the report"
      # Half the time left, then the rest less 20 s for the report (its gradient ascent
      # takes 40 s on a 2-core CPU; the retrain of a seed trial, seconds on a GPU).
      in_study_dir "$dir" timeout $((($(left) - 20) / 2)) "$py" -m study retrain \
        --storage "$url" --study "$study" || status=1
      # This call's run, recorded again with the test accuracy (it replaces its entry in
      # the study's log of runs); a retrain at the start of a call has no run to record.
      if [ "${#record_args[@]}" -gt 0 ]; then
        timeout 30 "$py" -m benchmarks.study_record "${record_args[@]}" || status=1
      fi
      in_study_dir "$dir" timeout $(($(left) - 20)) "$py" -m study report --storage "$url" \
        --study "$study" || status=1
      cp "$dir/optuna.db" "$out/$kind-study.db" || status=1
      local parts=() part
      for part in runs reports; do [ -e "$dir/$part" ] && parts+=("$part"); done
      # The page itself stays out: its plotly script is 4 MB and `report` rebuilds it.
      # The device brings back 16 MiB a file: a checkpoint over 12 MiB stays out too.
      local excluded=(--exclude index.html)
      local checkpoint="$dir/runs/$study/best.pt"
      if [ -f "$checkpoint" ] && [ "$(stat -c %s "$checkpoint")" -gt $((12 << 20)) ]; then
        echo "best.pt left out of $kind-study.tar: over 12 MiB"
        excluded+=(--exclude best.pt)
      fi
      tar -C "$dir" "${excluded[@]}" -cf "$out/$kind-study.tar" "${parts[@]}" || status=1
      read_standing || return 1
    fi
  fi
  rm -rf "$dir"
  # The next study may start only from a seed study that is whole and retrained.
  [ "$finished" -ge "$budget" ] && [ "$retrained" = "$best" ]
}

: > "$out/studies.txt"
# The side-by-side, first: the lease's figure of the new trainer against today's, and the
# choice of the code the studies run on. It leaves the seed study what it needs at the
# least; until it has measured both paths, its choice file says today's.
if [ "$path_choice" = auto ]; then
  paths_seconds=$(($(left) - least - margin - after - 5))
  cap=${GPU_CHECK_PATHS_SECONDS:-90}
  [ "$paths_seconds" -gt "$cap" ] && paths_seconds=$cap
  path_choice=new
  [ -d "$baseline/model" ] && path_choice=baseline
  {
    echo "== side by side: today's trainer and the new one =="
    if [ "$paths_seconds" -lt 20 ]; then
      echo "side-by-side not run: $(left) s left; the studies run on the $path_choice path"
    else
      paths_args=(compare "$out" --seconds "$paths_seconds" --choice "$logs/path")
      [ -d "$baseline/model" ] && paths_args+=(--baseline "$baseline")
      has_cuda || paths_args+=(--small)
      # Past its cap by 20 s, for a measurement gone wrong: it keeps to its cap itself.
      timeout -k 5 $((paths_seconds + 20)) "$py" -m benchmarks.paths "${paths_args[@]}"
      rc=$?
      echo "side-by-side exit status: $rc"
      [ -s "$logs/path" ] && path_choice=$(< "$logs/path")
    fi
  } >> "$out/studies.txt" 2>&1
  grep -q "^side-by-side exit status: 0$" "$out/studies.txt" || status=1
fi
gate_dir=$repo
if [ "$path_choice" = baseline ]; then
  # Ahead of the checkout: the study's workers, the retrain and the report load its model/.
  export PYTHONPATH="$baseline:$PYTHONPATH"
  gate_dir=$baseline
fi
echo "the studies run on the $path_choice path: model/ from" \
  "$(cd "$logs" && "$py" -c 'import os, model; print(os.path.dirname(model.__file__))' 2>&1)" \
  >> "$out/studies.txt"
if [ -z "${studies// /}" ]; then
  echo "no study: GPU_CHECK_STUDIES is empty" >> "$out/studies.txt"
elif ! "$py" -c "$study_imports" 2>> "$out/studies.txt"; then
  echo "no study: its dependencies do not import (no .wheels/? see check.txt)" \
    >> "$out/studies.txt"
  status=1
else
  seed_done=1
  if wants seed; then
    study_block seed >> "$out/studies.txt" 2>&1 || seed_done=0
  fi
  if wants wide; then
    if [ "$seed_done" = 1 ]; then
      study_block wide >> "$out/studies.txt" 2>&1
    else
      echo "wide study not run: the seed study is not yet whole and retrained" \
        >> "$out/studies.txt"
    fi
  fi
fi

grep -E "^== |^side by side:|^  (eager|CUDA graphs)|^agreement|^choice:|^no baseline|^the studies run on|failed \(|timed out|^resumed|^no .*: the study starts|not run|gate failed|whole|^no study|exit status|trials \(|test accuracy|left out|starting no more" \
  "$out/studies.txt"
exit $status
