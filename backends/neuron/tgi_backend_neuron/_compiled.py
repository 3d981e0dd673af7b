"""The shapes a Neuron model was compiled for, and which exported variant to serve.

A model exported for Neuron records its static shapes next to its config:

- optimum-neuron's NxD exports write `neuron_config.json` (`batch_size`,
  `sequence_length`, `tp_degree`, `torch_dtype`, `continuous_batching`,
  `max_context_length`, `on_device_sampling`);
- earlier exports (transformers-neuronx) keep a `neuron` section in `config.json`
  (`batch_size`, `sequence_length`, `num_cores`, `auto_cast_type`), compiled without
  continuous batching, so their prefill rebuilds the whole batch's KV.

A model directory may hold several exported variants (itself and/or one per
subdirectory, e.g. `bs4-len4096/`, `bs8-len2048/`). `select_variant` keeps those the
request fits and prefers the exact batch size over a larger one, then the exact
sequence length over a longer one.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgi.errors import ConfigError
from tgi_backend_neuron._options import normalize_cast_type

logger = logging.getLogger(__name__)

__all__ = [
    "NEURON_CONFIG_FILE",
    "CompiledShape",
    "Wanted",
    "find_variants",
    "read_compiled_shape",
    "select_variant",
]

NEURON_CONFIG_FILE = "neuron_config.json"


@dataclass(frozen=True, slots=True)
class CompiledShape:
    """Static shapes and settings of one exported (or to-be-exported) Neuron model."""

    batch_size: int  # B: slots in the static batch
    sequence_length: int  # L: tokens one slot holds, prompt and generated
    num_cores: int | None  # NeuronCores it is sharded over (tp degree); None: unknown
    auto_cast_type: str | None  # torch dtype name it computes in; None: the model's own
    continuous_batching: bool  # False: every prefill rewrites the whole batch's KV
    max_context_length: int  # longest prompt one prefill row may carry
    on_device_sampling: bool = False  # the graph returns tokens instead of logits
    where: str = "export parameters"  # where these values were read, for messages
    path: Path | None = None  # the exported model's directory; None: not exported yet
    batch_size_from: str = ""  # export parameters only: which setting gave batch_size
    sequence_length_from: str = ""  # ... and sequence_length

    def origin(self, name: str) -> str:
        """Where the compiled `batch_size` or `sequence_length` came from."""
        detail = self.batch_size_from if name == "batch_size" else self.sequence_length_from
        return detail or self.where

    def describe(self) -> str:
        parts = [f"batch_size={self.batch_size}", f"sequence_length={self.sequence_length}"]
        if self.num_cores is not None:
            parts.append(f"num_cores={self.num_cores}")
        if self.auto_cast_type is not None:
            parts.append(f"auto_cast_type={self.auto_cast_type}")
        parts.append(f"continuous_batching={self.continuous_batching}")
        return ", ".join(parts)


@dataclass(frozen=True, slots=True)
class Wanted:
    """A value the launcher or environment asks of the compiled model."""

    value: int | str
    flag: str  # what the user set, as they would write it: "--max-batch-size", "HF_BATCH_SIZE"
    source: str  # "cli", "env MAX_BATCH_SIZE", ...

    def describe(self) -> str:
        return f"{self.flag} {self.value} ({self.source})"


def _positive_int(section: Mapping[str, Any], key: str, where: str) -> int | None:
    value = section.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}: {key} must be a positive integer, got {value!r}")
    return value


def _shape_from(section: Mapping[str, Any], where: str, path: Path, legacy: bool) -> CompiledShape:
    batch_size = _positive_int(section, "batch_size", where)
    sequence_length = _positive_int(section, "sequence_length", where)
    if batch_size is None or sequence_length is None:
        raise ConfigError(f"{where} lacks batch_size or sequence_length; re-export the model")
    num_cores = _positive_int(section, "tp_degree", where) or _positive_int(
        section, "num_cores", where
    )
    raw_cast = section.get("auto_cast_type", section.get("torch_dtype"))
    try:
        cast = normalize_cast_type(str(raw_cast)) if raw_cast is not None else None
    except ValueError as exc:
        raise ConfigError(f"{where}: auto_cast_type {raw_cast!r}: {exc}") from None
    context = _positive_int(section, "max_context_length", where) or sequence_length
    # transformers-neuronx exports predate continuous batching: absent means rebuild.
    continuous = bool(section.get("continuous_batching", False if legacy else batch_size > 1))
    return CompiledShape(
        batch_size=batch_size,
        sequence_length=sequence_length,
        num_cores=num_cores,
        auto_cast_type=cast,
        continuous_batching=continuous,
        max_context_length=min(context, sequence_length),
        on_device_sampling=bool(section.get("on_device_sampling", False)),
        where=where,
        path=path,
    )


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path} cannot be read as JSON: {exc}") from exc
    return loaded if isinstance(loaded, dict) else None


def read_compiled_shape(model_dir: Path) -> CompiledShape | None:
    """The compiled shape recorded in `model_dir`, or None for a plain checkpoint."""
    neuron_config = _read_json(model_dir / NEURON_CONFIG_FILE)
    if neuron_config is not None:
        where = f"{model_dir / NEURON_CONFIG_FILE}"
        return _shape_from(neuron_config, where, model_dir, legacy=False)
    config = _read_json(model_dir / "config.json")
    section = config.get("neuron") if config is not None else None
    if isinstance(section, dict):
        where = f"the neuron section of {model_dir / 'config.json'}"
        return _shape_from(section, where, model_dir, legacy=True)
    return None


def find_variants(model_dir: Path) -> list[CompiledShape]:
    """Every exported variant: `model_dir` itself and its direct subdirectories."""
    variants = []
    candidates = [model_dir]
    try:
        candidates += sorted(path for path in model_dir.iterdir() if path.is_dir())
    except OSError as exc:
        logger.debug("cannot list %s: %s", model_dir, exc)
    for candidate in candidates:
        shape = read_compiled_shape(candidate)
        if shape is not None:
            variants.append(shape)
    return variants


def _mismatch(shape: CompiledShape, wanted: Mapping[str, Sequence[Wanted]]) -> str | None:
    """Why `shape` cannot serve what is wanted, or None when it can."""
    for item in wanted.get("batch_size", ()):
        if shape.batch_size < int(item.value):
            return f"batch_size {shape.batch_size} < {item.describe()}"
    for item in wanted.get("sequence_length", ()):
        if shape.sequence_length < int(item.value):
            return f"sequence_length {shape.sequence_length} < {item.describe()}"
    for item in wanted.get("num_cores", ()):
        if shape.num_cores is not None and shape.num_cores != int(item.value):
            return f"num_cores {shape.num_cores} != {item.describe()}"
    for item in wanted.get("auto_cast_type", ()):
        if shape.auto_cast_type is not None and shape.auto_cast_type != item.value:
            return f"auto_cast_type {shape.auto_cast_type} != {item.describe()}"
    return None


def _preference(shape: CompiledShape, wanted: Mapping[str, Sequence[Wanted]]) -> tuple[Any, ...]:
    """Sort key: exact batch size, then the smallest larger one (largest when none is
    asked); the same for the sequence length; then the path, for a stable choice."""
    keys: list[Any] = []
    for name, value in (
        ("batch_size", shape.batch_size),
        ("sequence_length", shape.sequence_length),
    ):
        asked = [int(item.value) for item in wanted.get(name, ())]
        if asked:
            keys += [value != max(asked), value]
        else:
            keys += [False, -value]
    keys.append(str(shape.path))
    return tuple(keys)


def select_variant(
    variants: Sequence[CompiledShape], wanted: Mapping[str, Sequence[Wanted]]
) -> CompiledShape:
    """The variant to serve; ConfigError naming each variant and what it lacks.

    `wanted` maps batch_size / sequence_length / num_cores / auto_cast_type to what the
    flags and HF_* variables ask; a variant must hold at least the batch and length
    asked and match the cores and cast type exactly.
    """
    if not variants:
        raise ValueError("select_variant needs at least one variant")
    fitting = [shape for shape in variants if _mismatch(shape, wanted) is None]
    if not fitting:
        lines = "; ".join(f"{shape.where}: {_mismatch(shape, wanted)}" for shape in variants)
        raise ConfigError(
            f"no exported Neuron variant fits the settings: {lines}. Lower the settings "
            "named to what a variant was compiled for, or export the model again with "
            "them (HF_BATCH_SIZE, HF_SEQUENCE_LENGTH, HF_NUM_CORES, HF_AUTO_CAST_TYPE)"
        )
    chosen = min(fitting, key=lambda shape: _preference(shape, wanted))
    if len(variants) > 1:
        logger.info(
            "neuron: %d exported variants; serving %s (%s)",
            len(variants),
            chosen.where,
            chosen.describe(),
        )
    return chosen
