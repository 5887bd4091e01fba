# fmnist: `make help` lists the targets. `make test` and `make run` work on a fresh clone: they
# create .venv and install the project into it first when needed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
# `mlflow run` starts commands through `bash -c` and `mlflow models serve` starts `uvicorn` by
# name: the project's environment must come first on PATH.
export PATH := $(BIN):$(PATH)
export MLFLOW_TRACKING_URI ?= sqlite:///$(CURDIR)/mlflow.db
EXPERIMENT ?= fashion-mnist
UI_PORT ?= 5000
UI_URL = http://127.0.0.1:$(UI_PORT)

.DEFAULT_GOAL := help
.PHONY: help install test test-all lint run demo ui bench clean

help: ## List the targets
	@grep -E '^[a-zA-Z_-]+:.*?## ' $(MAKEFILE_LIST) | \
		awk 'BEGIN {FS = ":.*?## "}; {printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile -e '.[dev,ray]'
	@# pip byte-compiles on one core, compileall on every core: the install took 94.8 s instead
	@# of 120.8 s on 2 cores; a file pip would skip too (Python 2 syntax) fails quietly
	-@$(BIN)/python -m compileall -q -j 0 $(VENV)/lib > /dev/null 2>&1
	@touch $(STAMP)

install: $(STAMP) ## Create .venv and install the project with its dev and ray extras (done by other targets)

# The suite runs on every core (pytest-xdist; `auto` is one worker per CPU, 2 here and in CI,
# each with one torch/BLAS thread (tests/conftest.py); measured faster than 3 workers;
# `make test WORKERS=0` runs it in this process). `--dist loadfile` runs each test file on one
# worker, so no module-scoped fixture (a search, a pipeline, a store) is built twice.
WORKERS ?= auto
PYTEST := $(BIN)/python -m pytest -n $(WORKERS) --dist loadfile -q

# Which tests `make test` runs: not the `slow` ones by default. CI (.ci/run) sets
# MARKERS="not slow or fault" so that the slow fault tests (a killed worker, concurrent writers)
# run there too.
MARKERS ?= not slow

test: $(STAMP) ## Run the test suite (not `slow`; `realdata` tests run when FMNIST_DATA_DIR is set)
	$(PYTEST) -m "$(MARKERS)"

test-all: $(STAMP) ## Run every test, slow ones included
	$(PYTEST)

lint: $(STAMP) ## Run ruff
	$(BIN)/ruff check fmnist tests bench
	$(BIN)/ruff format --check fmnist tests bench

run: $(STAMP) ## Full reproduction of the study: MLproject `main` on the embedded store
	$(BIN)/mlflow run . --env-manager local -e main --experiment-name $(EXPERIMENT)

demo: $(STAMP) ## The same pipeline with quick=true (a few minutes)
	$(BIN)/mlflow run . --env-manager local -e main --experiment-name $(EXPERIMENT) -P quick=true

# MLflow 3 opens an experiment on its GenAI overview: the printed link opens its Runs view.
ui: $(STAMP) ## MLflow UI on http://127.0.0.1:$(UI_PORT) against the project's store
	@$(BIN)/python -c 'import mlflow; from fmnist.tracking.ui import ui_url; \
		e = mlflow.get_experiment_by_name("$(EXPERIMENT)"); \
		print("Open", ui_url(e.experiment_id, "$(UI_URL)") if e else "$(UI_URL) (no runs yet)")'
	$(BIN)/mlflow ui --backend-store-uri $(MLFLOW_TRACKING_URI) --host 127.0.0.1 --port $(UI_PORT)

bench: $(STAMP) ## Benchmarks against the study's pipeline (needs the real data)
	$(BIN)/python bench/bench.py

clean: ## Remove caches (keeps .venv and the tracking store)
	rm -rf .pytest_cache .ruff_cache build *.egg-info
