"""Tensors from a directory of safetensors, memory-mapped, single file or sharded.

`safe_open` maps each file; a tensor is read (copied out of the map) only when asked for,
so loading a model never holds the whole checkpoint twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tgi.errors import ConfigError

__all__ = ["SafetensorsCheckpoint"]

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsCheckpoint:
    """HF-named tensors of `model_dir`: `model.safetensors.index.json` or `*.safetensors`."""

    def __init__(self, model_dir: Path) -> None:
        self.model_dir = Path(model_dir)
        self._where: dict[str, Path] = {}  # tensor name -> file
        index = self.model_dir / INDEX_FILE
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            self._where = {name: self.model_dir / file for name, file in weight_map.items()}
        else:
            from safetensors import safe_open

            files = sorted(self.model_dir.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{self.model_dir} holds no *.safetensors files")
            for file in files:
                with safe_open(str(file), framework="pt") as handle:
                    self._where.update(dict.fromkeys(handle.keys(), file))
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self._where)

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor; KeyError naming the tensor and the directory when absent."""
        tensor: torch.Tensor = self._handle(name).get_tensor(name)
        return tensor

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape, from the file's header (nothing read)."""
        return tuple(self._view(name).get_shape())

    def get_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (`dim` 0) or columns (`dim` 1) [start, stop) of one tensor, reading only
        those bytes from the map where the layout allows (a rank's shard)."""
        view = self._view(name)
        tensor: torch.Tensor = view[start:stop] if dim == 0 else view[:, start:stop]
        return tensor

    def _view(self, name: str) -> Any:
        return self._handle(name).get_slice(name)

    def _handle(self, name: str) -> Any:
        """The open map of the file holding `name`; KeyError when no file does."""
        file = self._where.get(name)
        if file is None:
            raise KeyError(f"{name} is not in the checkpoint at {self.model_dir}")
        handle = self._handles.get(file)
        if handle is None:
            from safetensors import safe_open

            handle = self._handles[file] = safe_open(str(file), framework="pt")
        return handle

    def close(self) -> None:
        """Drop the file maps; tensors already read stay valid."""
        self._handles.clear()
