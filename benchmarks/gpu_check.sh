#!/usr/bin/env bash
# The GPU check: the CUDA tests, every benchmark, then the seed study for a fixed wall
# time, its retrain and report, recorded in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Written for a lent machine with one NVIDIA GPU, Python 3.12, PyTorch, torchvision and
# pytest but no Optuna and no network, run from a copy of this repository: the code runs
# from the checkout; Optuna and the study's other dependencies are installed from the
# wheels in .wheels/ (`make gpu-wheels`) when they are missing; MNIST comes from ./data or
# from the gzipped IDX files in .mnist-gz/ (`make gpu-mnist`). benchmarks/README.md gives
# the session's exact call and where each result is committed. On a machine without CUDA
# it runs too (CUDA tests skipped, everything on the CPU), to try it out:
#
#   GPU_CHECK_QUICK=1 SEED_STUDY_PRESET=tiny SEED_STUDY_SECONDS=40 SEED_STUDY_WORKERS=2 \
#     GPU_CHECK_SECONDS=1200 benchmarks/gpu_check.sh /tmp/gpu-check
#
# Settings, from the environment:
#   GPU_CHECK_SECONDS   everything ends by then (default 570: the device runs one command
#                       for at most 600 s and brings back only what OUTDIR holds by then)
#   GPU_CHECK_QUICK=1   shortens every benchmark
#   GPU_CHECK_STUDY_ONLY=1  runs neither the tests nor the benchmarks, only the studies
#   SEED_STUDY_PRESET   the study's preset (default seed)
#   SEED_STUDY_SECONDS  its `run --timeout` (default 420), cut to end by the deadline
#   SEED_STUDY_WORKERS  its `run --workers-per-device` (default 2)
#   SEED_STUDY_TRIALS_PER_WORKER  its `run --trials-per-worker` (default 8)
#   SEED_STUDY_GRAPHS   1: `run --cuda-graphs`; 0: not; auto (default): when CUDA is here
#                       and the graph tests pass first
#   SEED_STUDY_PRECISION  its `run --precision`, passed only when set
#
# OUTDIR gets at most 8 files, as many as the device brings back: machine.txt (with the
# wheels' installation), tests.txt, benchmarks.txt, benchmarks.json, seed-study.txt (what
# the study, retrain, report and record printed), <preset>-study-<gpu>-<date>.json (the
# record: benchmarks/study_record.py), seed-study.tar (the study's folder: optuna.db,
# runs/<study>/best.pt and metrics.json, the report's PNGs) and studies.txt (the studies
# after it, with their metrics).
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the studies run in folders of their own
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))
left() { echo $((deadline - SECONDS)); }

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
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi: no GPU here"
  "$py" -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  if ! "$py" -c "$study_imports" 2>/dev/null && [ -f .wheels/requirements.txt ]; then
    echo "installing the study's dependencies from .wheels/"
    time install_wheels
  fi
} > "$out/machine.txt" 2>&1
[ -d .pydeps ] && export PYTHONPATH="$PYTHONPATH:$repo/.pydeps"

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  bench_args=(--rounds 1 --full-epochs 1 --trials 1 --max-minutes 0.1 --scaling-epochs 1
              --stack-sizes 1,2 --stack-epochs 1)
else
  # About a minute and a half on an H100 (one round is mostly the naive trainer's 30 s);
  # the seed study below measures whole trials, so the estimate times one.
  bench_args=(--rounds 1 --trials 1 --max-minutes 0.25 --stack-sizes 1,2,4,8 --stack-epochs 3
              --graphs)
fi

status=0
if [ "${GPU_CHECK_STUDY_ONLY:-0}" = 1 ]; then
  echo "not run: GPU_CHECK_STUDY_ONLY=1" | tee "$out/tests.txt" > "$out/benchmarks.txt"
else
  # 22 tests, 106 s on an H100. (The exit status is taken at once: after `|| status=1`,
  # $PIPESTATUS would hold the assignment's 0.)
  timeout 180 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_fastpath.py \
    tests/test_kfold.py > "$out/tests.txt" 2>&1
  rc=$?
  echo "pytest exit status: $rc" >> "$out/tests.txt"
  [ "$rc" = 0 ] || status=1

  timeout 180 "$py" -m benchmarks.speed all "${bench_args[@]}" --json "$out/benchmarks.json" \
    > "$out/benchmarks.txt" 2>&1
  rc=$?
  echo "benchmark exit status: $rc" >> "$out/benchmarks.txt"
  [ "$rc" = 0 ] || status=1
fi

# A study runs in a folder of its own (its optuna.db, runs/, reports/), in the machine's
# environment, on this checkout's MNIST.
in_study_dir() { (cd "$1" && shift && MNIST_ROOT="$repo/data" "$@"); }

if ! "$py" -c "$study_imports" 2> "$out/seed-study.txt"; then
  echo "no study: its dependencies do not import (no .wheels/? see machine.txt)" \
    >> "$out/seed-study.txt"
  status=1
else
  preset=${SEED_STUDY_PRESET:-seed}
  study=mnist-$preset
  # Two workers of 8 stacked trials each: one stack of the seed protocol holds about
  # 22 GB (40 networks over 48,000 images, the images repeated for each), so two fit an
  # H100 with room; a second process fills the gaps while one reads back. A guess, not
  # a measurement: the record states the numbers.
  workers=${SEED_STUDY_WORKERS:-2}
  per_worker=${SEED_STUDY_TRIALS_PER_WORKER:-8}
  devices=$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')
  seconds=${SEED_STUDY_SECONDS:-420}
  # `--timeout` lets each worker finish the trial in hand: `margin` for that (a seed trial
  # at its 2000-epoch cap took 11 s alone on an H100, so up to 4 times that shared by 4
  # workers) before `timeout` stops the run as Ctrl-C would; then `after` for the retrain,
  # the report, the record and the tar.
  margin=60 after=75
  fit=$(($(left) - margin - after))
  study_dir=$(mktemp -d)
  url="sqlite:///$study_dir/optuna.db"
  run_args=(run --preset "$preset" --storage "$url" --workers-per-device "$workers" --no-retrain
            --trials-per-worker "$per_worker")
  [ -n "${SEED_STUDY_PRECISION:-}" ] && run_args+=(--precision "$SEED_STUDY_PRECISION")
  # Whole epochs as CUDA graphs only where their own test has just passed on this GPU.
  graphs=${SEED_STUDY_GRAPHS:-auto}
  if [ "$graphs" = auto ]; then
    graphs=0
    if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' &&
      timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_fastpath.py \
        -k "cuda_graph_epochs_give" >> "$out/seed-study.txt" 2>&1; then
      graphs=1
    fi
  fi
  [ "$graphs" = 1 ] && run_args+=(--cuda-graphs)
  {
    if [ "$fit" -lt "$seconds" ]; then
      echo "study time cut from $seconds s to $fit s, to end by GPU_CHECK_SECONDS"
      seconds=$fit
    fi
    if [ "$seconds" -lt 30 ]; then
      echo "no study: ${seconds} s left for it"
      status=1
    else
      echo "\$ mnist-study ${run_args[*]} --timeout $seconds"
      started=$(date +%s.%N)
      in_study_dir "$study_dir" timeout -s INT -k 20 $((seconds + margin)) \
        "$py" -m study "${run_args[@]}" --timeout "$seconds"
      run_status=$?
      wall=$(awk -v a="$started" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }')
      echo "study exit status: $run_status, wall ${wall} s"
      [ "$run_status" = 0 ] || status=1
      # A study stopped before its budget is retrained and recorded all the same (the
      # record says partial); the record comes before the report, which may run late.
      in_study_dir "$study_dir" timeout 100 "$py" -m study retrain --storage "$url" \
        --study "$study" || status=1
      timeout 60 "$py" -m benchmarks.study_record --storage "$url" --study "$study" \
        --wall-seconds "$wall" --workers $((workers * devices)) \
        --trials-per-worker "$per_worker" --cuda-graphs "$graphs" \
        --precision "${SEED_STUDY_PRECISION:-}" --out "$out" || status=1
      in_study_dir "$study_dir" timeout 100 "$py" -m study report --storage "$url" \
        --study "$study" || status=1
      # The page itself stays out: its plotly script is 4 MB and it is rebuilt from these.
      tar -C "$study_dir" --exclude index.html -cf "$out/seed-study.tar" optuna.db runs reports \
        || status=1
    fi
  } >> "$out/seed-study.txt" 2>&1
  rm -rf "$study_dir"

  # The studies after it, each only when the time it needs is left, into studies.txt.
  # Hook: the `wide` preset, once it exists, gets one more block like this one, after it.
  : > "$out/studies.txt"
  if [ "$(left)" -ge 160 ]; then
    study_dir=$(mktemp -d)
    {
      in_study_dir "$study_dir" timeout 150 "$py" -m study run --preset quick --workers 2 \
        --storage "sqlite:///$study_dir/optuna.db"
      quick_status=$?
      echo "quick study exit status: $quick_status"
      [ "$quick_status" = 0 ] || status=1
      cat "$study_dir/runs/mnist-quick/metrics.json"
    } >> "$out/studies.txt" 2>&1
    rm -rf "$study_dir"
  else
    echo "quick study not run: $(left) s left, it needs 160" >> "$out/studies.txt"
  fi
fi

tail -n 3 "$out/tests.txt"
grep -E "speed-up|minutes|→" "$out/benchmarks.txt"
tail -n 4 "$out/seed-study.txt"
grep -E "^  trials |exit status|not run" "$out/studies.txt"
exit $status
