#!/usr/bin/env bash
# Build llama.cpp's `llama-server` from the sources vendored in the llama-cpp-python sdist.
#
# The binary lands in .cache/llama.cpp/bin/llama-server (git-ignored) and later runs reuse
# it. Only the `llama-server` target is built, in Release, CPU only, without the web UI
# (which would need npm or a download) and without libcurl/OpenSSL (models are local
# files). On 2 cores this takes several minutes.
#
#   benchmarks/build_llama_server.sh            # build once, print the binary's path
#   JOBS=4 benchmarks/build_llama_server.sh     # more compile jobs
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${LLAMA_CACHE_DIR:-$ROOT/.cache/llama.cpp}"
PIP="${PIP:-$ROOT/.venv/bin/pip}"
JOBS="${JOBS:-2}"
VERSION="${LLAMA_CPP_PYTHON_VERSION:-}"   # empty: the newest sdist
BIN="$CACHE/bin/llama-server"

if [[ -x "$BIN" ]]; then
    echo "$BIN"
    exit 0
fi
mkdir -p "$CACHE/sdist" "$CACHE/bin"

spec="llama-cpp-python${VERSION:+==$VERSION}"
if ! ls "$CACHE"/sdist/llama_cpp_python-*.tar.gz >/dev/null 2>&1; then
    "$PIP" download --no-deps --no-binary :all: "$spec" -d "$CACHE/sdist" >&2
fi
sdist="$(ls -1 "$CACHE"/sdist/llama_cpp_python-*.tar.gz | sort -V | tail -n 1)"
src_root="$CACHE/$(basename "$sdist" .tar.gz)"
if [[ ! -d "$src_root/vendor/llama.cpp" ]]; then
    tar -xzf "$sdist" -C "$CACHE"
fi
src="$src_root/vendor/llama.cpp"

cmake -S "$src" -B "$CACHE/build" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_CURL=OFF \
    -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_UI=OFF \
    -DLLAMA_USE_PREBUILT_UI=OFF \
    -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=ON \
    -DGGML_NATIVE=ON >&2
cmake --build "$CACHE/build" --config Release --target llama-server -j "$JOBS" >&2
cp "$CACHE/build/bin/llama-server" "$BIN"
echo "$BIN"
