# make demo / make test each do their whole set-up on a fresh machine: a virtual
# environment in .venv with the package and its dev and postgres extras, then MNIST under
# ./data (or $MNIST_ROOT), fetched if missing. Nothing here needs a GPU. The PostgreSQL
# tests also need the server binaries (apt-get install postgresql), and the SLURM tests
# SLURM's and munge's (apt-get install slurm-wlm munge) and root; without them they are
# skipped, with the reason shown.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-kernels data lint format bench clean gpu-wheels gpu-mnist gpu-baseline

demo: data
	$(BIN)/mnist-study run --preset quick --workers 2

# The suite in one test process per CPU, up to 4 (pytest-xdist; tests/conftest.py gives
# each its own share of the CPUs), then the tests that start processes and time them
# (heartbeats, deadlines, signals, a second host joining) one at a time, with the whole
# machine as a user's workers have it: run beside another test process on 2 cores, a
# stack ran past its --timeout and a second PostgreSQL host's worker found no trial left.
# On the 2-core AMD EPYC the whole suite in one process took 13 min 1 s (issue 29).
# TEST_PROCESSES=0 runs the first part in this process too. The SLURM tests share one
# throwaway cluster, so they run in one of the test processes (--dist loadgroup), beside
# the rest: their tasks mostly wait, the time limit's a minute.
TEST_PROCESSES ?= $(shell n=$$(nproc); echo $$((n < 4 ? n : 4)))
TIMED_PROCESS_TESTS := tests/test_workers.py tests/test_postgres.py tests/test_resume.py

test: data
	$(BIN)/python -m pytest -n $(TEST_PROCESSES) --dist loadgroup \
		$(addprefix --ignore=,$(TIMED_PROCESS_TESTS))
	$(BIN)/python -m pytest $(TIMED_PROCESS_TESTS)

# The tests whose numbers depend on how the CPU rounds (they hold two computations of one
# training to each other within rounding, tests/rounding.py), again on kernel paths other
# than this CPU's own: the plainest (ATen without vector code, MKL's SSE2-compatible
# branch) and the commonest other (AVX2). A comparison that holds only on the CPU it was
# written on then fails on any machine, CI's included (.ci/run runs this after `test`).
NUMERIC_TESTS := tests/test_kfold.py tests/test_fastpath.py tests/test_network.py
KERNEL_PATHS := "ATEN_CPU_CAPABILITY=default MKL_CBWR=COMPATIBLE" \
	"ATEN_CPU_CAPABILITY=avx2 MKL_CBWR=AVX2"

# The same for numpy, whose kernels the sampler's draws go through (transcendental
# functions and sorts, tests/rounding.py, 5 and 6): NPY_DISABLE_CPU_FEATURES turns off the
# dispatch targets above AVX2, then those above the X86_V2 baseline (numpy 2.4's names;
# naming one this CPU lacks is allowed), for the tests that compare draws with stored ones.
DRAW_TESTS := tests/test_sampler.py tests/test_study_file.py
NUMPY_PATHS := "X86_V4 AVX512_ICL AVX512_SPR" "X86_V3 X86_V4 AVX512_ICL AVX512_SPR"
NUMPY_TARGETS := import numpy._core._multiarray_umath as m; \
	print("numpy runs", [t for t in m.__cpu_dispatch__ if m.__cpu_features__.get(t)] or "its baseline")

test-kernels: data
	for path in $(KERNEL_PATHS); do \
		echo "== $(NUMERIC_TESTS) with $$path"; \
		env $$path $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) $(NUMERIC_TESTS) || exit 1; \
	done
	for disabled in $(NUMPY_PATHS); do \
		echo "== $(DRAW_TESTS) with NPY_DISABLE_CPU_FEATURES=\"$$disabled\""; \
		NPY_DISABLE_CPU_FEATURES="$$disabled" $(BIN)/python -c '$(NUMPY_TARGETS)' || exit 1; \
		NPY_DISABLE_CPU_FEATURES="$$disabled" $(BIN)/python -m pytest -q -n $(TEST_PROCESSES) \
			$(DRAW_TESTS) || exit 1; \
	done

# Speed benchmarks (about 15 minutes on 2 cores); results in benchmarks/README.md.
bench: data
	$(BIN)/python -m benchmarks.speed all --json benchmarks/last-run.json

# What benchmarks/gpu_check.sh needs on a GPU machine that has Python 3.12, torch and
# torchvision but no Optuna and no network (see benchmarks/README.md, "The GPU check"):
# the wheels of the study CLI's runtime dependencies, at this .venv's versions, and MNIST
# gzipped. The device carries at most 64 MiB in all; numpy and pillow (25 MB of wheels)
# are left out, as torchvision there already brings them.
GPU_WHEELS := optuna|sqlalchemy|plotly|tqdm|matplotlib
GPU_PLATFORM := --only-binary=:all: --python-version 3.12 --implementation cp \
	--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64
MNIST_RAW := $(or $(MNIST_ROOT),data)/MNIST/raw
MNIST_FILES := train-images-idx3-ubyte train-labels-idx1-ubyte t10k-images-idx3-ubyte \
	t10k-labels-idx1-ubyte

gpu-wheels: $(STAMP)
	rm -rf .wheels && mkdir .wheels
	$(BIN)/python -m pip freeze | grep -iE '^($(GPU_WHEELS))==' \
		> .wheels/requirements.txt
	$(BIN)/python -m pip download --quiet --disable-pip-version-check $(GPU_PLATFORM) \
		-d .wheels -r .wheels/requirements.txt
	rm -f .wheels/numpy-*.whl .wheels/pillow-*.whl
	du -sh .wheels

gpu-mnist:
	mkdir -p .mnist-gz
	for f in $(MNIST_FILES); do \
		gzip -9c $(MNIST_RAW)/$$f > .mnist-gz/$$f.gz.tmp && mv .mnist-gz/$$f.gz.tmp .mnist-gz/$$f.gz \
		|| exit 1; done
	du -sh .mnist-gz

# Today's trainer, for the side-by-side that begins the GPU check's first call
# (benchmarks/paths.py): the device machine gets the working tree but no .git, so the code
# the new trainer (issue 31) is measured against travels as an ignored folder, carried
# like .wheels. The commit is the last one before that rewrite: the code that ran the seed
# study's first 32 trials. tests/ comes along for the graphs' gate, which must test the
# trainer the study runs on. GPU_BASELINE_DIR: where (the tests make one in a tmp folder).
BASELINE_COMMIT := 3430d55
BASELINE_PATHS := model tests
GPU_BASELINE_DIR ?= .baseline

gpu-baseline:
	@git rev-parse -q --verify '$(BASELINE_COMMIT)^{commit}' > /dev/null || { echo \
		"gpu-baseline: commit $(BASELINE_COMMIT) is not in this clone (git fetch --unshallow)" \
		>&2; exit 1; }
	rm -rf $(GPU_BASELINE_DIR) && mkdir -p $(GPU_BASELINE_DIR)
	git archive -o $(GPU_BASELINE_DIR)/.archive.tar $(BASELINE_COMMIT) $(BASELINE_PATHS)
	tar -xf $(GPU_BASELINE_DIR)/.archive.tar -C $(GPU_BASELINE_DIR)
	rm $(GPU_BASELINE_DIR)/.archive.tar
	git rev-parse --short '$(BASELINE_COMMIT)^{commit}' > $(GPU_BASELINE_DIR)/COMMIT
	du -sh $(GPU_BASELINE_DIR)

data: $(STAMP)
	$(BIN)/mnist-study data

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Reinstalled when pyproject.toml changes; the stamp is written only after pip succeeds.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,postgres]'
	touch $@

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
