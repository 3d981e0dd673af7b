#!/usr/bin/env bash
# Download the wheels the GPU image lacks into .cache/gpu-wheels/, for `make gpu-check`.
#
# The GPU machine (Python 3.12, x86-64, no network) has torch, Triton, transformers and
# most of the scientific stack, but not tgi's server-side dependencies. A call to it
# carries at most 64 MiB, so this keeps the wheels under 60 MiB and fails above that.
# Versions: the pin in constraints.txt where there is one, else the version in the
# local venv (what `make test` tested), else the newest.
#
#   bash backends/cuda/gpu_check/fetch_wheels.sh        # or: make gpu-wheels
#   FLASHINFER=1 bash backends/cuda/gpu_check/fetch_wheels.sh   # try FlashInfer too
#
# FlashInfer is left out by default: flashinfer-python 0.7.4 alone is a 97 MiB wheel,
# and it needs nvidia-cutlass-dsl and cuda-tile besides, so the check reports it "not run".
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../.." && pwd)"
DEST="${DEST:-$ROOT/.cache/gpu-wheels}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
LIMIT_MIB="${LIMIT_MIB:-60}"

# What tgi-server and tgi-backend-cuda import that the image does not have (checked
# against the image's package list): the server stack (fastapi, pydantic, uvicorn), the
# wire encoding, grammars, GGUF reading, and pytest-asyncio for the tests' asyncio_mode;
# fastapi (0.16x) requires opentelemetry-api.
# typing-extensions is in the image, but pydantic-core needs a recent one: carry it.
PACKAGES=(
    fastapi starlette pydantic pydantic-core annotated-types typing-inspection
    typing-extensions opentelemetry-api uvicorn msgspec llguidance gguf
    pytest-asyncio
)
if [[ "${FLASHINFER:-0}" == 1 ]]; then
    PACKAGES+=(flashinfer-python apache-tvm-ffi cuda-tile nvidia-cutlass-dsl nvidia-cudnn-frontend)
fi
# The image has these; a carried wheel's requirement on one of them is satisfied there.
IMAGE_HAS="torch triton transformers numpy safetensors tokenizers huggingface-hub accelerate
jinja2 markupsafe pluggy typer click rich shellingham prometheus-client nvidia-ml-py pytest
anyio idna h11 pyyaml tqdm annotated-doc packaging requests httpx einops ninja tabulate
cuda-python cuda-bindings"

# pip matches each tag exactly; the image's glibc (Ubuntu 24.04's, 2.39) runs all of
# these (llguidance 1.9 ships manylinux_2_31 only).
PLATFORMS=()
for tag in manylinux_2_{39,35,34,31,28,27,24,17} manylinux2014 manylinux1; do
    PLATFORMS+=(--platform "${tag}_x86_64")
done

# name==version: constraints.txt's pin, else the local venv's version, else bare name
pinned() {
    local name="$1" pin
    pin="$(grep -iE "^${name//-/[-_]}==" "$ROOT/constraints.txt" | head -n1 || true)"
    if [[ -n "$pin" ]]; then
        echo "$pin"
        return
    fi
    "$PYTHON" - "$name" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, version

name = sys.argv[1]
try:
    print(f"{name}=={version(name)}")
except PackageNotFoundError:
    print(name)
EOF
}

rm -rf "$DEST"
mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do
    spec="$(pinned "$name")"
    echo "fetching $spec"
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${PLATFORMS[@]}" --dest "$DEST" "$spec"
done

# This repository's own distributions: tgi-server and tgi-backend-cuda. run.sh puts the
# working tree first on PYTHONPATH, so these give the metadata (entry points), while the
# code that runs is the tree's, never a stale wheel's.
echo "building tgi-server and tgi-backend-cuda"
# Built from a copy, so that setuptools leaves no build/ or egg-info in the tree.
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
mkdir -p "$scratch/server" "$scratch/cuda"
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/tgi" "$scratch/server/"
cp -r "$ROOT/backends/cuda/pyproject.toml" "$ROOT/backends/cuda/tgi_backend_cuda" "$scratch/cuda/"
if ! "$PYTHON" -m pip wheel --no-deps --no-build-isolation --wheel-dir "$DEST" \
    "$scratch/server" "$scratch/cuda" >"$scratch/build.log" 2>&1; then
    cat "$scratch/build.log" >&2
    exit 1
fi

# Every requirement of a carried wheel must be carried too, or be in the image.
"$PYTHON" - "$DEST" "$IMAGE_HAS" <<'EOF'
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

dest, image = Path(sys.argv[1]), {canonicalize_name(n) for n in sys.argv[2].split()}
env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
       "implementation_name": "cpython", "platform_python_implementation": "CPython",
       "extra": ""}
wheels = sorted(dest.glob("*.whl"))
carried = {canonicalize_name(w.name.split("-")[0]) for w in wheels}
missing = set()
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(meta).decode().splitlines()
    for line in lines:
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        if name not in carried and name not in image:
            missing.add(f"{name} (for {wheel.name})")
if missing:
    sys.exit("carried wheels need what is neither carried nor in the image: "
             + ", ".join(sorted(missing)))
EOF

ls -l "$DEST"/*.whl | awk '{printf "%9d  %s\n", $5, $NF}'
total="$(du -cb "$DEST"/*.whl | tail -n1 | cut -f1)"
total_mib="$(awk -v b="$total" 'BEGIN { printf "%.1f", b / 1048576 }')"
echo "total: $total_mib MiB in $(ls "$DEST"/*.whl | wc -l) wheels (limit $LIMIT_MIB MiB)"
if (( total > LIMIT_MIB * 1048576 )); then
    echo "error: the wheels exceed $LIMIT_MIB MiB; a device call carries at most 64 MiB" >&2
    exit 1
fi
