"""Result files: what a run measured, on which machine, with which command and parameters.

A result is a tree of dataclasses written as JSON by `to_jsonable` and read back by
`from_jsonable`, so plots and comparisons of old files use the same records as a live
run. `SCHEMA` changes when a field changes meaning.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import sys
import types
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar, Union, get_args, get_origin, get_type_hints

from tgi.bench.metrics import LevelMetrics
from tgi.bench.records import RequestOutcome

__all__ = [
    "SCHEMA",
    "Environment",
    "LevelResult",
    "ServeParameters",
    "ServeResult",
    "cpu_pressure",
    "from_jsonable",
    "load_serve_result",
    "merge_by_label",
    "now_iso",
    "to_jsonable",
    "write_json",
]

SCHEMA = "tgi-bench-serve/1"
_PACKAGES = ("tgi-server", "tgi-backend-cpu", "torch", "transformers", "httpx", "numpy")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Environment:
    """The machine and software a run was measured on (the client's side)."""

    platform: str  # platform.platform()
    machine: str  # x86_64, aarch64, ...
    cpu_model: str
    cpu_count: int  # logical CPUs in the machine
    cpus_usable: int  # CPUs this process may run on
    memory_gib: float
    load_average: tuple[float, float, float]  # 1, 5, 15 min, when the run started
    python: str
    packages: dict[str, str]  # distribution -> version, for those installed
    # Linux PSI: % of the last 10 s / 60 s / 300 s some task waited for a CPU; None elsewhere.
    # Anything well above 0 means other work competed with the run.
    cpu_pressure: tuple[float, float, float] | None = None
    # the CPU's matrix and vector extensions (`CPU_FEATURES` it has): which dtype and
    # kernels win depends on them more than on the model name, which a VM often hides
    cpu_features: tuple[str, ...] = ()

    @classmethod
    def collect(cls) -> Environment:
        return cls(
            platform=platform.platform(),
            machine=platform.machine(),
            cpu_model=_cpu_model(),
            cpu_count=os.cpu_count() or 0,
            cpus_usable=len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else (os.cpu_count() or 0),
            memory_gib=_memory_gib(),
            load_average=os.getloadavg() if hasattr(os, "getloadavg") else (0.0, 0.0, 0.0),
            python=sys.version.split()[0],
            packages=_versions(_PACKAGES),
            cpu_pressure=cpu_pressure(),
            cpu_features=cpu_features(),
        )

    @property
    def summary(self) -> str:
        features = f" ({' '.join(self.cpu_features)})" if self.cpu_features else ""
        return (
            f"{self.cpu_model}{features}, {self.cpus_usable} of {self.cpu_count} CPUs usable, "
            f"{self.memory_gib:.0f} GiB, {self.platform}"
        )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: fall back to what platform knows
    return platform.processor() or platform.machine()


# /proc/cpuinfo flags that decide CPU serving speed: bf16/int8 dot products, AMX tiles
CPU_FEATURES = (
    "avx2",
    "avx512f",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_bf16",
    "amx_int8",
)


def cpu_features(cpuinfo: Path = Path("/proc/cpuinfo")) -> tuple[str, ...]:
    """The `CPU_FEATURES` this CPU reports, in that order; () where `cpuinfo` is not."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                return tuple(f for f in CPU_FEATURES if f in flags)
    except OSError:
        pass
    return ()


def cpu_pressure() -> tuple[float, float, float] | None:
    """Linux PSI for the CPU: % of the last 10 s, 60 s, 300 s some task waited to run."""
    try:
        some = Path("/proc/pressure/cpu").read_text().splitlines()[0].split()
    except (OSError, IndexError):
        return None  # no PSI: not Linux, or a kernel without it
    values = dict(item.split("=", 1) for item in some[1:] if "=" in item)
    try:
        return (float(values["avg10"]), float(values["avg60"]), float(values["avg300"]))
    except (KeyError, ValueError):
        return None


def _memory_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass  # not Linux
    return 0.0


def _versions(names: tuple[str, ...]) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


@dataclass(frozen=True, slots=True)
class ServeParameters:
    """Everything `tgi bench serve` was asked for."""

    base_url: str
    api: str  # client.Api value
    endpoint: str
    model: str | None  # the OpenAI `model` field sent
    dataset: str  # "random" or the prompt file
    tokenizer: str | None  # what lengths were measured with; None: the embedded SmolLM2
    input_len: int | None  # random dataset
    output_len: int | None
    range_ratio: float
    ignore_eos: bool
    seed: int
    burstiness: float
    warmup_requests: int
    timeout_s: float
    slo_ms: dict[str, float]  # goodput objectives given: ttft, tpot, e2el
    extra_body: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class LevelResult:
    """One load level: its settings, its metrics and every request's record."""

    request_rate: float | None  # requests per second; None: all at once
    max_concurrency: int | None  # None: no cap
    metrics: LevelMetrics
    requests: tuple[RequestOutcome, ...] = ()
    # CPU pressure (PSI avg10, avg60, avg300 in %) when the level ended: high values mean
    # other work competed with the server or the client during the level
    cpu_pressure: tuple[float, float, float] | None = None


@dataclass(frozen=True, slots=True)
class ServeResult:
    """A whole `tgi bench serve` run against one server."""

    label: str  # the system's name in tables and plots
    created: str  # ISO 8601, UTC
    command: tuple[str, ...]  # argv, to run it again
    environment: Environment
    parameters: ServeParameters
    server_info: dict[str, Any]  # what the server said about itself (/info, /v1/models)
    levels: tuple[LevelResult, ...]
    schema: str = SCHEMA


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def to_jsonable(value: Any) -> Any:
    """Dataclasses, enums, tuples and floats to plain JSON values (inf and NaN -> null)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def from_jsonable(cls: type[T], data: Any) -> T:
    """Rebuild a dataclass tree written by `to_jsonable`; unknown keys are ignored."""
    return _build(cls, data)  # type: ignore[no-any-return]


def _build(annotation: Any, value: Any) -> Any:
    if value is None:
        return None
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        options = [arg for arg in get_args(annotation) if arg is not type(None)]
        return _build(options[0], value) if len(options) == 1 else value
    if origin is tuple:
        item = get_args(annotation)[0]
        return tuple(_build(item, v) for v in value)
    if origin is list:
        return [_build(get_args(annotation)[0], v) for v in value]
    if origin is dict:
        return dict(value)
    if isinstance(annotation, type) and dataclasses.is_dataclass(annotation):
        hints = get_type_hints(annotation)
        kwargs = {
            f.name: _build(hints[f.name], value[f.name])
            for f in dataclasses.fields(annotation)
            if f.name in value and f.init
        }
        return annotation(**kwargs)
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        return annotation(value)
    return value


def write_json(path: Path, value: Any) -> None:
    """Write `value` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_jsonable(value), indent=2) + "\n", encoding="utf-8")


def load_serve_result(path: Path) -> ServeResult:
    """Read a `tgi bench serve` result file."""
    data = json.loads(path.read_text(encoding="utf-8"))
    schema = data.get("schema") if isinstance(data, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path} is not a tgi bench serve result (schema {schema!r})")
    return from_jsonable(ServeResult, data)


def merge_by_label(results: Sequence[ServeResult]) -> list[ServeResult]:
    """One result per label, its levels gathered from every file with that label.

    A sweep run one level at a time (interleaved with other systems, as the baseline
    script does) writes one file per level; tables and plots want one series per system.
    The merged result keeps the first file's metadata; the files themselves stay the
    record of how each level was run. Raises `ValueError` when two files of one label
    measured the same level.
    """
    order: list[str] = []
    groups: dict[str, list[ServeResult]] = {}
    for result in results:
        if result.label not in groups:
            order.append(result.label)
        groups.setdefault(result.label, []).append(result)
    merged = []
    for label in order:
        group = groups[label]
        levels = [level for result in group for level in result.levels]
        keys = [(level.request_rate, level.max_concurrency) for level in levels]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{label}: two files measured the same level")
        levels.sort(key=_level_order)
        merged.append(dataclasses.replace(group[0], levels=tuple(levels)))
    return merged


def _level_order(level: LevelResult) -> tuple[float, float]:
    rate = math.inf if level.request_rate is None else level.request_rate
    cap = math.inf if level.max_concurrency is None else float(level.max_concurrency)
    return (rate, cap)
