"""Checkpoint readers: HF-named tensors straight from disk, without a transformers model.

`open_checkpoint(path)` gives the HF config dict and a `TensorSource` for a directory of
safetensors (single file or sharded), a `ModelFiles`, or a `.gguf` file (through
`tgi.weights.gguf.load_gguf`, which dequantizes to HF names).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch

from tgi.errors import ConfigError
from tgi.weights.safetensors import SafetensorsCheckpoint

__all__ = [
    "DictTensors",
    "SafetensorsCheckpoint",
    "TensorSource",
    "open_checkpoint",
    "read_slice",
]


class TensorSource(Protocol):
    """HF-named tensors, read on demand."""

    def __contains__(self, name: object) -> bool: ...

    def __iter__(self) -> Iterator[str]: ...

    def get(self, name: str) -> torch.Tensor:
        """The tensor called `name`; KeyError naming it when absent."""
        ...


class DictTensors:
    """A `TensorSource` over tensors already in memory (a dequantized GGUF)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._tensors = dict(tensors)

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def get(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._tensors[name].shape)


def read_slice(tensors: TensorSource, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows (`dim` 0) or columns (`dim` 1) [start, stop) of tensor `name`; rows past its
    end come back as zeros (a vocabulary padded to a multiple of the shard count).

    A source with `get_slice` (memory-mapped safetensors) reads only the slice."""
    size = _dim_size(tensors, name, dim)
    # the part inside the tensor (empty for a slice wholly past its end)
    inside_start, inside_stop = min(start, size), min(stop, size)
    get_slice = getattr(tensors, "get_slice", None)
    if get_slice is not None:
        part: torch.Tensor = get_slice(name, dim, inside_start, inside_stop)
    else:
        part = tensors.get(name).narrow(dim, inside_start, inside_stop - inside_start)
    missing = (stop - start) - (inside_stop - inside_start)
    if missing:
        shape = list(part.shape)
        shape[dim] = missing
        part = torch.cat([part, part.new_zeros(shape)], dim=dim)
    return part


def _dim_size(tensors: TensorSource, name: str, dim: int) -> int:
    shape = getattr(tensors, "shape", None)
    if shape is not None:
        return int(shape(name)[dim])
    return int(tensors.get(name).shape[dim])


def open_checkpoint(path: Path | Any) -> tuple[dict[str, Any], TensorSource]:
    """(HF config dict, tensors) for a model dir, a `ModelFiles` (its `.path`), or a .gguf."""
    path = Path(getattr(path, "path", path))
    if path.is_file() and path.suffix == ".gguf":
        try:
            from tgi.weights.gguf import load_gguf  # type: ignore[import-not-found,unused-ignore]
        except ImportError as exc:
            raise ConfigError(
                f"{path} is a GGUF file but tgi.weights.gguf is not available ({exc}); "
                "pass the converted checkpoint directory instead"
            ) from exc
        config, tensors = load_gguf(path)
        return dict(config), DictTensors(tensors)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{path} has no config.json")
    config = json.loads(config_file.read_text())
    text = config.get("text_config")
    if isinstance(text, dict) and "num_hidden_layers" not in config:
        config = {**text, "architectures": config.get("architectures")}
    return config, SafetensorsCheckpoint(path)
