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

__all__ = ["DictTensors", "SafetensorsCheckpoint", "TensorSource", "open_checkpoint"]


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
