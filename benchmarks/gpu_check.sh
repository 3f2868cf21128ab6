#!/usr/bin/env bash
# The GPU check: the CUDA tests and every benchmark, with their results as files in OUTDIR.
#
#   benchmarks/gpu_check.sh OUTDIR
#
# Written for a machine with one NVIDIA GPU, PyTorch and pytest but no Optuna and no
# network, run from a copy of this repository; it needs nothing installed beyond that
# (the code runs from the checkout). MNIST comes from ./data, or from the gzipped IDX
# files in .mnist-gz/ (copied there beforehand, as data/MNIST/raw/*-ubyte.gz).
# On a machine without CUDA it runs too: the CUDA tests are reported as skipped and the
# benchmarks measure the CPU. GPU_CHECK_QUICK=1 shortens every benchmark (to try it out).
# If Optuna can be imported (carried as wheels, say), it also runs the quick-preset study
# end to end on the GPU: two workers, retrain, report.
# Budget on one H100: about 7 minutes in all.
set -uo pipefail
out=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
cd "$(dirname "$0")/.." || exit 2
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}

if [ ! -f data/MNIST/raw/t10k-labels-idx1-ubyte ] && [ -d .mnist-gz ]; then
  mkdir -p data/MNIST/raw
  for f in .mnist-gz/*.gz; do gunzip -c "$f" > "data/MNIST/raw/$(basename "$f" .gz)"; done
fi

{
  date -u
  nvidia-smi 2>&1 || echo "no nvidia-smi: no GPU here"
  "$py" -c 'import platform, torch; print(platform.python_version(), "torch", torch.__version__, "cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
} > "$out/machine.txt" 2>&1

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then
  bench_args=(--rounds 1 --full-epochs 1 --trials 1 --max-minutes 0.1 --scaling-epochs 1)
else
  bench_args=(--rounds 3 --trials 2 --max-minutes 0.5)
fi

status=0
timeout 180 "$py" -m pytest -q -rs -p no:cacheprovider tests/test_fastpath.py tests/test_kfold.py \
  > "$out/tests.txt" 2>&1 || status=1
echo "pytest exit status: ${PIPESTATUS[0]}" >> "$out/tests.txt"

timeout 240 "$py" -m benchmarks.speed all "${bench_args[@]}" --json "$out/benchmarks.json" \
  > "$out/benchmarks.txt" 2>&1 || status=1
echo "benchmark exit status: ${PIPESTATUS[0]}" >> "$out/benchmarks.txt"

if "$py" -c 'import optuna' 2>/dev/null; then
  study_dir=$(mktemp -d)
  ( cd "$study_dir" && MNIST_ROOT="$OLDPWD/data" timeout 150 "$py" -m study \
      run --preset quick --workers 2 --storage "sqlite:///$study_dir/optuna.db" ) \
    > "$out/study.txt" 2>&1
  study_status=$?
  echo "study exit status: $study_status" >> "$out/study.txt"
  [ "$study_status" = 0 ] || status=1
  [ -f "$study_dir/runs/mnist-quick/metrics.json" ] && cp "$study_dir/runs/mnist-quick/metrics.json" "$out/"
  rm -rf "$study_dir"
fi

tail -n 3 "$out/tests.txt"
[ -f "$out/study.txt" ] && tail -n 5 "$out/study.txt"
grep -E "speed-up|minutes|→" "$out/benchmarks.txt"
exit $status
