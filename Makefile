# evomerge — `make demo` runs the main job, `make test` the test suite; both set everything up.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get a CPU build of torch first, so the resolver never pulls a multi-GB CUDA build.
# Off this machine, point pip at a CPU wheel index with TORCH_PIP_ARGS="--index-url ...".
TORCH_SPEC ?= torch==2.13.0
TORCH_PIP_ARGS ?=
STAMP := $(VENV)/.evomerge-installed
PYTEST_ARGS ?=

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup test test-fast lint demo bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@if ! $(BIN)/python -c "import torch" >/dev/null 2>&1; then \
	  if command -v nvidia-smi >/dev/null 2>&1; then $(BIN)/pip install "torch>=2.4"; \
	  else $(BIN)/pip install $(TORCH_PIP_ARGS) "$(TORCH_SPEC)"; fi; \
	fi
	$(BIN)/pip install -e '.[dev]'
	@touch $@

test: setup lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# the edit-test loop: everything but the tests marked slow (training, searches, worker crashes)
test-fast: setup lint
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/evomerge demo

bench: setup
	$(BIN)/python benchmarks/merge_vs_mergekit.py

clean:
	rm -rf results/demo .zoo
