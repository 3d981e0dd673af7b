"""The CPU backend's compiled kernels, and decode attention straight from the paged pool.

NOTE: built on first use, not shipped: each `csrc/*.c` library (`decode_attention`, and
`layer_ops` for `_layer_ops`) is compiled for this CPU (`-march=native`, so AVX512-BF16
dot products where the CPU has them) by the C compiler on the PATH (`CC` to choose one),
once per source, compiler, flags and CPU, into `<cache>/cpu-kernels/`; a later start
loads the cached library in milliseconds. It links OpenMP's `libgomp.so.1`, which torch
has already loaded, so its threads are torch's. Without a compiler, or when the build
fails, `load_library` answers None with the reason and the backend keeps torch's ops:
the kernels only make steps faster.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "KERNEL_DTYPES",
    "DecodeAttentionKernel",
    "NativeLibrary",
    "load_decode_attention",
    "load_library",
]

# Not -ffast-math: with -shared, GCC before 13 still links crtfastmath.o, which turns on
# flush-to-zero for the whole process when the library loads. These are the parts the
# kernel needs (vectorised reductions, no errno from expf), without that side effect.
FLAGS = (
    "-O3",
    "-march=native",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fassociative-math",
    "-fno-signed-zeros",
    "-fopenmp",
    "-shared",
    "-fPIC",
)
# The shapes the kernel takes (csrc/decode_attention.c's MAX_HEAD_DIM, MAX_GROUP).
MAX_HEAD_DIM = 256
MAX_GROUP = 32
_P, _I, _L = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64


# The dtypes the compiled kernels take (decode attention: q, KV and out in one of them;
# the layer ops too), by their functions' suffix.
KERNEL_DTYPES = {torch.bfloat16: "bf16", torch.float32: "f32"}


@dataclass(frozen=True, slots=True)
class DecodeAttentionKernel:
    """The loaded library's `tgi_decode_attention_{bf16,f32}`, with what built it."""

    functions: dict[torch.dtype, ctypes._CFuncPtr]  # type: ignore[name-defined]
    path: Path
    build_seconds: float | None  # None: loaded from the cache

    def __call__(
        self,
        q: torch.Tensor,  # [R, H, D] bf16 or float32, last dim contiguous
        keys: torch.Tensor,  # [slots, KVH, D] q's dtype, contiguous
        values: torch.Tensor,
        tables: torch.Tensor,  # [rows, max_blocks] int64, contiguous rows
        table_rows: torch.Tensor,  # [R] int64
        seq_lens: torch.Tensor,  # [R] int64
        *,
        block_size: int,
        scale: float,
        window: int | None,
        max_len: int,
    ) -> torch.Tensor:  # [R, H, D] q's dtype
        rows, heads, head_dim = q.shape
        # the C code reads raw memory: each row's heads dense, one dtype, int64 indices
        assert q.dtype == keys.dtype == values.dtype and q.dtype in self.functions
        assert q.stride(2) == 1 and q.stride(1) == head_dim and keys.is_contiguous()
        assert values.is_contiguous() and tables.stride(1) == 1
        assert table_rows.is_contiguous() and seq_lens.is_contiguous()
        out = torch.empty((rows, heads, head_dim), dtype=q.dtype)
        failed = self.functions[q.dtype](
            q.data_ptr(),
            q.stride(0),
            keys.data_ptr(),
            values.data_ptr(),
            out.data_ptr(),
            tables.data_ptr(),
            tables.stride(0),
            table_rows.data_ptr(),
            seq_lens.data_ptr(),
            rows,
            heads,
            keys.shape[1],
            head_dim,
            block_size,
            scale,
            window or 0,
            max_len,
            torch.get_num_threads(),
        )
        if failed:
            raise RuntimeError(f"decode attention kernel failed on {heads} heads of {head_dim}")
        return out

    @staticmethod
    def fits(num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
        """Whether a model of these heads is within the kernel's limits."""
        group = num_heads // num_kv_heads
        return head_dim <= MAX_HEAD_DIM and group <= MAX_GROUP


@dataclass(frozen=True, slots=True)
class NativeLibrary:
    """A compiled `csrc/NAME.c`, loaded, with what built it."""

    library: ctypes.CDLL
    path: Path
    build_seconds: float | None  # None: loaded from the cache


def load_library(cache_dir: Path, cpu_key: str, name: str) -> tuple[NativeLibrary | None, str]:
    """(`csrc/{name}.c` built for this CPU and loaded, how it was got) or (None, why
    not); `cpu_key` names this CPU's model and ISA flags, since `-march=native` builds
    only for them."""
    csrc = files("tgi_backend_cpu").joinpath("csrc")
    source = csrc.joinpath(f"{name}.c").read_bytes()
    # the headers every source may include (bf16.h), copied beside it and hashed with it
    headers = {
        entry.name: entry.read_bytes() for entry in csrc.iterdir() if entry.name.endswith(".h")
    }
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None, "no C compiler on the PATH (set CC) to build it"
    try:
        version = subprocess.run(
            [compiler, "--version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout.splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError) as exc:
        return None, f"{compiler} does not run: {exc}"
    parts = [source, *(headers[n] for n in sorted(headers)), version.encode()]
    key = hashlib.sha256(
        b"\0".join([*parts, " ".join(FLAGS).encode(), cpu_key.encode()])
    ).hexdigest()[:16]
    path = cache_dir / "cpu-kernels" / f"{name}-{key}.so"
    built = None
    if not path.exists():
        started = time.perf_counter()
        try:
            failure = _build(compiler, source, headers, path)
        except (OSError, subprocess.SubprocessError) as exc:  # a read-only cache, a hang
            failure = f"building {path.name} failed: {exc}"
        if failure is not None:
            return None, failure
        built = time.perf_counter() - started
    try:
        library = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    how = f"built by {version} in {built:.1f} s" if built is not None else "cached"
    return NativeLibrary(library, path, built), f"{path.name} ({how})"


def load_decode_attention(
    cache_dir: Path, cpu_key: str
) -> tuple[DecodeAttentionKernel | None, str]:
    """(the kernel, how it was got) or (None, why not); see `load_library`."""
    loaded, how = load_library(cache_dir, cpu_key, "decode_attention")
    if loaded is None:
        return None, how
    functions = {}
    for dtype, suffix in KERNEL_DTYPES.items():
        function = getattr(loaded.library, f"tgi_decode_attention_{suffix}")
        function.restype = _I
        function.argtypes = [_P, _L, _P, _P, _P, _P, _L, _P, _P, _I, _I, _I, _I, _I,
                             ctypes.c_float, _I, _I, _I]  # fmt: skip
        functions[dtype] = function
    return DecodeAttentionKernel(functions, loaded.path, loaded.build_seconds), how


def _build(compiler: str, source: bytes, headers: dict[str, bytes], path: Path) -> str | None:
    """Compile `source` (with `headers` beside it) into `path` (atomically: concurrent
    ranks may race); None, or why the build failed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as scratch:
        c_file, so_file = Path(scratch) / "kernel.c", Path(scratch) / "kernel.so"
        c_file.write_bytes(source)
        for header, text in headers.items():
            (Path(scratch) / header).write_bytes(text)
        done = subprocess.run(
            [compiler, *FLAGS, str(c_file), "-o", str(so_file), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            return f"{compiler} failed: {done.stderr.strip()[-500:]}"
        os.replace(so_file, path)
    return None
