# make demo / make test each do their whole set-up on a fresh machine: a virtual
# environment in .venv with the package and its dev and postgres extras, then MNIST under
# ./data (or $MNIST_ROOT), fetched if missing. Nothing here needs a GPU. The PostgreSQL
# tests also need the server binaries (apt-get install postgresql); without them they are
# skipped, with the reason shown.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test data lint format bench clean

demo: data
	$(BIN)/mnist-study run --preset quick --workers 2

test: data
	$(BIN)/python -m pytest

# Speed benchmarks (about 15 minutes on 2 cores); results in benchmarks/README.md.
bench: data
	$(BIN)/python -m benchmarks.speed all --json benchmarks/last-run.json

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
