#!/usr/bin/env bash
# The GPU check: the CUDA tests, every benchmark, then the studies for a fixed wall time,
# each with its retrain, record and report: the seed study first, then the wide study
# when its time is left. Everything is recorded in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Written for a lent machine with one NVIDIA GPU, Python 3.12, PyTorch, torchvision and
# pytest but no Optuna and no network, run from a copy of this repository: the code runs
# from the checkout; Optuna and the study's other dependencies are installed from the
# wheels in .wheels/ (`make gpu-wheels`) when they are missing; MNIST comes from ./data or
# from the gzipped IDX files in .mnist-gz/ (`make gpu-mnist`). benchmarks/README.md gives
# the session's exact calls and where each result is committed. On a machine without CUDA
# it runs too (CUDA tests skipped, everything on the CPU), to try it out:
#
#   GPU_CHECK_QUICK=1 SEED_STUDY_PRESET=tiny SEED_STUDY_SECONDS=40 SEED_STUDY_WORKERS=2 \
#     WIDE_STUDY_PRESET=wide-smoke WIDE_STUDY_SECONDS=40 \
#     GPU_CHECK_SECONDS=1200 benchmarks/gpu_check.sh /tmp/gpu-check
#
# Settings, from the environment:
#   GPU_CHECK_SECONDS   everything ends by then (default 570: the device runs one command
#                       for at most 600 s and brings back only what OUTDIR holds by then)
#   GPU_CHECK_QUICK=1   shortens every benchmark
#   GPU_CHECK_STUDY_ONLY=1  runs neither the tests nor the benchmarks, only the studies
#   GPU_CHECK_STUDIES   which studies run, always in this order: "seed wide" (default),
#                       "seed", "wide" (a second call of a lease can give the wide study
#                       its whole time), or "" for none
#   SEED_STUDY_PRESET   the seed study's preset (default seed)
#   SEED_STUDY_SECONDS  its `run --timeout` (default 420), cut to end by the deadline
#   SEED_STUDY_WORKERS  its `run --workers-per-device` (default 2)
#   SEED_STUDY_TRIALS_PER_WORKER  its `run --trials-per-worker` (default 8)
#   SEED_STUDY_GRAPHS   1: `run --cuda-graphs`; 0: not; auto (default): when CUDA is here
#                       and the graph tests pass first
#   SEED_STUDY_PRECISION  its `run --precision`, passed only when set
#   WIDE_STUDY_PRESET   the wide study's preset (default wide)
#   WIDE_STUDY_SECONDS  its `run --timeout` (default 420), cut to end by the deadline; the
#                       study runs only when 240 s are left (see below)
#   WIDE_STUDY_WORKERS  its `run --workers-per-device` (default 2)
#   WIDE_STUDY_TRIALS_PER_WORKER  its `run --trials-per-worker` (default 4, see below)
#
# OUTDIR gets at most 8 files, as many as the device brings back (each under 16 MiB):
#   check.txt           the set-up (with the wheels' installation), the tests' and the
#                       benchmarks' output, one section each
#   benchmarks.json     the benchmarks' numbers
#   studies.txt         what each study, retrain, report and record printed, a section each
#   <preset>-study-<gpu>-<date>.json  the seed study's record (benchmarks/study_record.py)
#   seed-study.tar      the seed study's folder: optuna.db, runs/<study>/best.pt and
#                       metrics.json, the report's PNGs
#   <preset>-study-<gpu>-<date>.json  the wide study's record, likewise
#   <preset>-<gpu>-<date>.json  the wide retrain's metrics with its fold ensemble, for
#                       results/ (benchmarks/result_record.py)
#   wide-study.tar      the wide study's folder, as the seed's; best.pt only when it is
#                       under 12 MiB (4 layers of 4096 units are 214 MB)
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
studies=" ${GPU_CHECK_STUDIES-seed wide} "
for name in $studies; do
  case $name in
    seed | wide) ;;
    *) echo "GPU_CHECK_STUDIES: no study '$name' (seed, wide)" >&2; exit 2 ;;
  esac
done
wants() { [[ $studies == *" $1 "* ]]; }
mkdir -p "$out" && out=$(cd "$out" && pwd)  # absolute: the studies run in folders of their own
cd "$(dirname "$0")/.." || exit 2
repo=$PWD
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
deadline=$((SECONDS + ${GPU_CHECK_SECONDS:-570}))
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
  echo "== set-up =="
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi: no GPU here"
  "$py" -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
  if ! "$py" -c "$study_imports" 2>/dev/null && [ -f .wheels/requirements.txt ]; then
    echo "installing the study's dependencies from .wheels/"
    time install_wheels
  fi
} > "$out/check.txt" 2>&1
[ -d .pydeps ] && export PYTHONPATH="$PYTHONPATH:$repo/.pydeps"

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  bench_args=(--rounds 1 --full-epochs 1 --trials 1 --max-minutes 0.1 --scaling-epochs 1
              --stack-sizes "1,2" --stack-epochs 1)
else
  # About a minute and a half on an H100 (one round is mostly the naive trainer's 30 s);
  # the seed study below measures whole trials, so the estimate times one.
  bench_args=(--rounds 1 --trials 1 --max-minutes 0.25 --stack-sizes "1,2,4,8" --stack-epochs 3
              --graphs)
fi

status=0
if [ "${GPU_CHECK_STUDY_ONLY:-0}" = 1 ]; then
  echo "not run: GPU_CHECK_STUDY_ONLY=1" | tee "$logs/tests.txt" > "$logs/benchmarks.txt"
else
  # 22 tests, 106 s on an H100. (The exit status is taken at once: after `|| status=1`,
  # $PIPESTATUS would hold the assignment's 0.)
  timeout 180 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_fastpath.py \
    tests/test_kfold.py > "$logs/tests.txt" 2>&1
  rc=$?
  echo "pytest exit status: $rc" >> "$logs/tests.txt"
  [ "$rc" = 0 ] || status=1

  timeout 180 "$py" -m benchmarks.speed all "${bench_args[@]}" --json "$out/benchmarks.json" \
    > "$logs/benchmarks.txt" 2>&1
  rc=$?
  echo "benchmark exit status: $rc" >> "$logs/benchmarks.txt"
  [ "$rc" = 0 ] || status=1
fi
{
  echo "== tests =="; cat "$logs/tests.txt"
  echo "== benchmarks =="; cat "$logs/benchmarks.txt"
} >> "$out/check.txt"

# A study runs in a folder of its own (its optuna.db, runs/, reports/), in the machine's
# environment, on this checkout's MNIST.
in_study_dir() { (cd "$1" && shift && MNIST_ROOT="$repo/data" "$@"); }
# Wall seconds since `date +%s.%N` printed $1.
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.3f", b - a }'; }
# `mnist-study ARGS --timeout $seconds` in folder $1, stopped as Ctrl-C would `margin`
# seconds past its timeout; sets `wall` (its wall seconds) and `status` on failure.
timed_run() {
  local dir=$1 started run_status
  shift
  echo "\$ mnist-study $* --timeout $seconds"
  started=$(date +%s.%N)
  in_study_dir "$dir" timeout -s INT -k 20 $((seconds + margin)) \
    "$py" -m study "$@" --timeout "$seconds"
  run_status=$?
  wall=$(since "$started")
  echo "study exit status: $run_status, wall ${wall} s"
  [ "$run_status" = 0 ] || status=1
}

: > "$out/studies.txt"
if [ -z "${studies// /}" ]; then
  echo "no study: GPU_CHECK_STUDIES is empty" >> "$out/studies.txt"
elif ! "$py" -c "$study_imports" 2>> "$out/studies.txt"; then
  echo "no study: its dependencies do not import (no .wheels/? see check.txt)" \
    >> "$out/studies.txt"
  status=1
else
  devices=$("$py" -c 'import torch; print(max(1, torch.cuda.device_count()))')

  # --- The seed study ---------------------------------------------------------------
  preset=${SEED_STUDY_PRESET:-seed}
  study=mnist-$preset
  # Two workers of 8 stacked trials each: one stack of the seed protocol holds about
  # 22 GB (40 networks over 48,000 images, the images repeated for each), so two fit an
  # H100 with room; a second process fills the gaps while one reads back. A guess, not
  # a measurement: the record states the numbers.
  workers=${SEED_STUDY_WORKERS:-2}
  per_worker=${SEED_STUDY_TRIALS_PER_WORKER:-8}
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
  {
    echo "== seed study ($preset) =="
    if ! wants seed; then
      echo "seed study not run: GPU_CHECK_STUDIES=\"${GPU_CHECK_STUDIES-}\""
    else
      # Whole epochs as CUDA graphs only where their own test has just passed on this GPU.
      graphs=${SEED_STUDY_GRAPHS:-auto}
      if [ "$graphs" = auto ]; then
        graphs=0
        if "$py" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())' &&
          timeout 120 "$py" -m pytest -q -p no:cacheprovider tests/test_fastpath.py \
            -k "cuda_graph_epochs_give"; then
          graphs=1
        fi
      fi
      [ "$graphs" = 1 ] && run_args+=(--cuda-graphs)
      if [ "$fit" -lt "$seconds" ]; then
        echo "study time cut from $seconds s to $fit s, to end by GPU_CHECK_SECONDS"
        seconds=$fit
      fi
      if [ "$seconds" -lt 30 ]; then
        echo "no study: ${seconds} s left for it"
        status=1
      else
        timed_run "$study_dir" "${run_args[@]}"
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
        tar -C "$study_dir" --exclude index.html -cf "$out/seed-study.tar" optuna.db runs \
          reports || status=1
      fi
    fi
  } >> "$out/studies.txt" 2>&1
  rm -rf "$study_dir"

  # --- The wide study, when its time is left ------------------------------------------
  preset=${WIDE_STUDY_PRESET:-wide}
  study=mnist-$preset
  # Trials stacked per worker: 4, not the mini-batch default of 16. A stack is padded to
  # its widest trial in each layer, and at the top of the space (4 layers of 4096 units)
  # a network has 53.6 M weights. Each takes 20 bytes in fp32: the weight, its gradient,
  # Adam's two moments and the early-stopping copy of the best weights, so 1.07 GB a
  # network; the validation pass adds about 0.7 GB more (20,000 images tiled to each
  # network, two 4096-wide activations of them alive at once), and dropping a finished
  # trial rebuilds the stack beside the old one. So 4 trials × 3 folds take 13 GB of
  # state and up to 26 GB at a rebuild, about 52 GB for two workers on an 80 GB H100;
  # 16 trials would take 51 GB a worker before any of that. An estimate from the shapes,
  # not a measurement: the record states what ran, and the log any out-of-memory trial.
  workers=${WIDE_STUDY_WORKERS:-2}
  per_worker=${WIDE_STUDY_TRIALS_PER_WORKER:-4}
  seconds=${WIDE_STUDY_SECONDS:-420}
  # `margin` for the trials in hand, as for the seed study (a stack of four widest trials
  # at mini-batches of 64 can take longer: `timeout` then stops it and the record says
  # so); `after` for the retrain, which trains the best configuration k + 1 times (on all
  # 60,000 images, then its k folds again for the ensemble), the two records, the report
  # and the tar. The study itself gets at least `least`, so that each worker's first
  # stack can finish: 240 s in all, or the block is not run.
  margin=60 after=120 least=60
  needs=$((margin + after + least))
  {
    echo "== wide study ($preset) =="
    if ! wants wide; then
      echo "wide study not run: GPU_CHECK_STUDIES=\"${GPU_CHECK_STUDIES-}\""
    elif [ "$(left)" -lt "$needs" ]; then
      echo "wide study not run: $(left) s left, it needs $needs ($least for the study," \
        "$margin for the trials in hand, $after for the retrain, records, report and tar)"
    else
      fit=$(($(left) - margin - after))
      if [ "$fit" -lt "$seconds" ]; then
        echo "study time cut from $seconds s to $fit s, to end by GPU_CHECK_SECONDS"
        seconds=$fit
      fi
      study_dir=$(mktemp -d)
      url="sqlite:///$study_dir/optuna.db"
      run_args=(run --preset "$preset" --storage "$url" --workers-per-device "$workers"
                --no-retrain --trials-per-worker "$per_worker")
      timed_run "$study_dir" "${run_args[@]}"
      # The retrain measures the fold ensemble too: the wide presets ask for it.
      in_study_dir "$study_dir" timeout 150 "$py" -m study retrain --storage "$url" \
        --study "$study" || status=1
      if result=$(timeout 60 "$py" -m benchmarks.result_record \
          "$study_dir/runs/$study/metrics.json" --what "$preset" --out "$out"); then
        "$py" -c 'import json, sys
r = json.load(open(sys.argv[1]))
e = r.get("ensemble")
head = (sys.argv[1], r["test_accuracy"], r["epochs"])
print("%s: test accuracy %.4f after %d epochs; " % head
      + ("no fold ensemble" if e is None
         else "fold ensemble of %d networks: %.4f" % (e["networks"], e["test_accuracy"])))' \
          "$result" || status=1
      else
        status=1
      fi
      timeout 60 "$py" -m benchmarks.study_record --storage "$url" --study "$study" \
        --wall-seconds "$wall" --workers $((workers * devices)) \
        --trials-per-worker "$per_worker" --out "$out" || status=1
      in_study_dir "$study_dir" timeout 100 "$py" -m study report --storage "$url" \
        --study "$study" || status=1
      # The device brings back files of up to 16 MiB: a checkpoint larger than 12 MiB
      # stays out of the tar (its configuration and test metrics are in metrics.json).
      excluded=(--exclude index.html)
      checkpoint="$study_dir/runs/$study/best.pt"
      if [ -f "$checkpoint" ] && [ "$(stat -c %s "$checkpoint")" -gt $((12 << 20)) ]; then
        echo "best.pt left out of wide-study.tar: $(stat -c %s "$checkpoint") bytes," \
          "over the 12 MiB kept for it"
        excluded+=(--exclude best.pt)
      fi
      parts=()
      for part in optuna.db runs reports; do
        [ -e "$study_dir/$part" ] && parts+=("$part")
      done
      tar -C "$study_dir" "${excluded[@]}" -cf "$out/wide-study.tar" "${parts[@]}" || status=1
      size=$(stat -c %s "$out/wide-study.tar" 2>/dev/null || echo 0)
      if [ "$size" -gt $((16 << 20)) ]; then
        echo "wide-study.tar is $size bytes, left out: the device brings back 16 MiB a file"
        status=1
      fi
      rm -rf "$study_dir"
    fi
  } >> "$out/studies.txt" 2>&1
fi

tail -n 3 "$logs/tests.txt"
grep -E "speed-up|minutes|→|exit status: [^0]" "$logs/benchmarks.txt"
grep -E "^== |cut from|not run|^no study|exit status|trials \(|test accuracy|left out" \
  "$out/studies.txt"
exit $status
