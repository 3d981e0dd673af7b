"""Writing the check's results: whole files replaced at once, after every measurement.

A stage runs under a time limit that may kill it mid-way; a file written by replacement
is either the previous complete version or the new one, never half of either.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Mode", "describe_device", "error_text", "write_json", "write_text"]


@dataclass(frozen=True, slots=True)
class Mode:
    """How the check runs: on the GPU, or as the CPU dry run with tiny shapes."""

    out: Path  # where each stage writes its files
    dry_run: bool  # CPU test mode: tiny shapes, few steps

    @property
    def device(self) -> torch.device:
        return torch.device("cpu" if self.dry_run else "cuda")


def write_text(path: Path, text: str) -> None:
    """Replace `path` with `text` in one rename."""
    scratch = path.with_name(f".{path.name}.tmp")
    scratch.write_text(text)
    os.replace(scratch, path)


def write_json(path: Path, value: Any) -> None:
    """Replace `path` with `value` (dataclasses included) as indented JSON."""
    write_text(path, json.dumps(_plain(value), indent=2) + "\n")


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float):
        return round(value, 6)
    return value


def describe_device(device: torch.device) -> dict[str, Any]:
    """The versions and the device a result was measured with, for every file."""
    import transformers

    described: dict[str, Any] = {
        "device": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }
    if device.type == "cuda":
        described["device"] = torch.cuda.get_device_name(device)
        described["cuda"] = torch.version.cuda
    try:
        import triton

        described["triton"] = triton.__version__
    except ImportError:
        described["triton"] = None
    return described


def error_text(exc: BaseException) -> str:
    """One line naming the exception, for a result that failed."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {first}"[:500]
