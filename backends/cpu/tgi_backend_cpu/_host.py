"""Facts about the host CPU this backend decides from: ISA flags, cores, free memory.

Every reader takes the file it reads as an argument so tests can hand in a fake
`/proc/cpuinfo` or `/proc/meminfo`; nothing here reads `os.environ` (the backend's own
settings come from `ServeConfig`, which the core resolves from flags and environment).
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from tgi.errors import BackendError

logger = logging.getLogger(__name__)

__all__ = [
    "KV_MEMORY_SETTING",
    "CpuInfo",
    "DtypeChoice",
    "check_kv_fits",
    "choose_dtype",
    "choose_threads",
    "kv_budget_bytes",
    "mem_available_bytes",
    "read_cpu_info",
]

CPUINFO = Path("/proc/cpuinfo")
MEMINFO = Path("/proc/meminfo")
# How the user sets the KV budget; the core resolves it into ServeConfig.kv_cache_memory.
KV_MEMORY_SETTING = "--kv-cache-memory / TGI_KV_CACHE_MEMORY"

# Flags that mean the CPU multiplies bf16 natively (AVX512-BF16 dot products, AMX tiles);
# without them torch upcasts bf16 per op and it is slower than fp32.
FAST_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
# Native fp16 arithmetic (Sapphire Rapids AVX512-FP16, Granite Rapids AMX-FP16).
FAST_FP16_FLAGS = frozenset({"avx512_fp16", "amx_fp16"})

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True, slots=True)
class CpuInfo:
    """What the probe reports and the dtype choice reads."""

    model_name: str  # "model name" of the first processor, "" when unknown
    flags: frozenset[str]  # ISA flags of the first processor
    capability: str  # torch's dispatch level: "AVX512", "AVX2", "DEFAULT", ...
    num_threads: int  # cores this process may run on

    @property
    def fast_bf16(self) -> bool:
        return bool(self.flags & FAST_BF16_FLAGS)

    @property
    def fast_fp16(self) -> bool:
        return bool(self.flags & FAST_FP16_FLAGS)

    def describe(self) -> str:
        """One line for `tgi backends` and the start-up log."""
        name = self.model_name or "unknown CPU"
        extras = sorted(self.flags & (FAST_BF16_FLAGS | FAST_FP16_FLAGS))
        isa = self.capability + (" + " + ", ".join(extras) if extras else "")
        return f"{name}; torch ISA {isa}; {self.num_threads} usable threads"


@dataclass(frozen=True, slots=True)
class DtypeChoice:
    """The compute dtype and the reason, so the log says why."""

    dtype: torch.dtype
    reason: str


def read_cpu_info(cpuinfo: Path = CPUINFO) -> CpuInfo:
    """Parse the first processor block of `cpuinfo`; missing file gives empty flags."""
    model_name, flags = "", frozenset[str]()
    try:
        text = cpuinfo.read_text()
    except OSError as exc:
        logger.debug("cannot read %s: %s", cpuinfo, exc)
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model_name:
            model_name = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = frozenset(value.split())
        if model_name and flags:
            break
    return CpuInfo(model_name, flags, torch.backends.cpu.get_cpu_capability(), _usable_cores())


def _usable_cores() -> int:
    # sched_getaffinity honours taskset and cgroup cpusets; os.cpu_count() does not.
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def choose_dtype(requested: str | None, cpu: CpuInfo, *, quantized: bool = False) -> DtypeChoice:
    """An explicit `--dtype` wins; otherwise bf16 only where it is the faster choice.

    AVX512-BF16 alone (no AMX) only has bf16 dot products, and torch's bf16 GEMMs on it
    measured slower than float32 (SmolLM2, 2 cores: 128-token prefill 230 vs 136 ms,
    one-row decode 42 vs 34 ms); AMX tiles are several times faster than float32. The
    int8/int4 weight-only kernels take bf16 activations, so a quantized model runs
    bf16 wherever the CPU has native bf16 at all (one-row int4 decode 15.5 vs 20.6 ms).
    """
    if requested is not None:
        return DtypeChoice(_DTYPES[requested], f"--dtype {requested} was asked for")
    if "amx_bf16" in cpu.flags:
        return DtypeChoice(torch.bfloat16, "the CPU multiplies bf16 in AMX tiles")
    if quantized and cpu.fast_bf16:
        return DtypeChoice(
            torch.bfloat16, "the quantized kernels take bf16 and the CPU has avx512_bf16"
        )
    if cpu.fast_bf16:
        return DtypeChoice(
            torch.float32, "avx512_bf16 without AMX runs bf16 GEMMs slower than float32"
        )
    return DtypeChoice(
        torch.float32,
        "the CPU lacks avx512_bf16/amx_bf16, so bf16 would be emulated and slower than float32",
    )


def choose_threads(requested: int | None, cpu: CpuInfo) -> tuple[int, str]:
    """Threads for torch's intra-op pool, and where the number came from."""
    if requested is not None:
        return requested, "--cpu-threads"
    return cpu.num_threads, "cores in this process's affinity mask"


def mem_available_bytes(meminfo: Path = MEMINFO) -> int | None:
    """MemAvailable from `meminfo` (what can be allocated without swapping), or None."""
    try:
        text = meminfo.read_text()
    except OSError as exc:
        logger.debug("cannot read %s: %s", meminfo, exc)
        return None
    match = re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def check_kv_fits(max_batch_total_tokens: int, needed: int, meminfo: Path) -> None:
    """Refuse a --max-batch-total-tokens whose KV (`needed` bytes) exceeds MemAvailable."""
    available = mem_available_bytes(meminfo)
    if available is not None and needed > available:
        raise BackendError(
            f"--max-batch-total-tokens {max_batch_total_tokens} needs {needed} bytes of KV "
            f"but only {available} bytes of memory are available; lower it"
        )


def kv_budget_bytes(explicit: int | None, meminfo: Path, fraction: float) -> tuple[int, str]:
    """The bytes the KV cache may take, and where that number came from: `explicit`
    (`ServeConfig.kv_cache_memory`, i.e. --kv-cache-memory / TGI_KV_CACHE_MEMORY), else
    `fraction` of MemAvailable."""
    if explicit is not None:
        return explicit, KV_MEMORY_SETTING
    available = mem_available_bytes(meminfo)
    if available is None:
        raise BackendError(
            f"cannot read MemAvailable from {meminfo} to size the KV cache; set "
            f"{KV_MEMORY_SETTING} (e.g. 2GiB) or --max-batch-total-tokens"
        )
    return int(available * fraction), f"{fraction:.0%} of {available} bytes available"
