"""The neuron backend's own settings, read from `ServeConfig.environ` (never os.environ).

`HF_BATCH_SIZE`, `HF_SEQUENCE_LENGTH`, `HF_NUM_CORES` and `HF_AUTO_CAST_TYPE` are the
export parameters SageMaker users already set for optimum-neuron; `TGI_NEURON_*` are
tgi's own. Each value remembers the variable it came from, so errors can name it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict

from tgi.errors import ConfigError

__all__ = [
    "AUTO_CAST_TYPES",
    "ENV",
    "NeuronOptions",
    "normalize_cast_type",
]

# field name -> environment variable
ENV: dict[str, str] = {
    "emulate": "TGI_NEURON_EMULATE",
    "continuous_batching": "TGI_NEURON_CONTINUOUS_BATCHING",
    "on_device_sampling": "TGI_NEURON_ON_DEVICE_SAMPLING",
    "batch_size": "HF_BATCH_SIZE",
    "sequence_length": "HF_SEQUENCE_LENGTH",
    "num_cores": "HF_NUM_CORES",
    "auto_cast_type": "HF_AUTO_CAST_TYPE",
}

# What optimum-neuron and Neuron configs spell a cast type as -> the torch dtype name.
AUTO_CAST_TYPES: dict[str, str] = {
    "bf16": "bfloat16",
    "bfloat16": "bfloat16",
    "fp16": "float16",
    "float16": "float16",
    "fp32": "float32",
    "float32": "float32",
}

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def normalize_cast_type(text: str) -> str:
    """'bf16', 'torch.bfloat16', 'BFLOAT16' -> 'bfloat16'; ValueError for anything else."""
    key = text.strip().lower().removeprefix("torch.")
    try:
        return AUTO_CAST_TYPES[key]
    except KeyError:
        raise ValueError(f"expected one of {', '.join(sorted(AUTO_CAST_TYPES))}") from None


class NeuronOptions(BaseModel):
    """Settings of the neuron backend; None means "not set"."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    emulate: bool = False  # run the CPU emulator instead of Neuron hardware
    continuous_batching: bool | None = None  # export or emulator: insert (True) or rebuild
    on_device_sampling: bool | None = None  # export or emulator: the graph samples tokens
    batch_size: int | None = None  # export: compiled batch size B
    sequence_length: int | None = None  # export: compiled sequence length L
    num_cores: int | None = None  # export: NeuronCores (tensor parallel degree)
    auto_cast_type: str | None = None  # export: bfloat16, float16 or float32

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> NeuronOptions:
        """Parse the variables in `ENV`; ConfigError names the variable and its value."""
        values: dict[str, Any] = {}
        for name, var in ENV.items():
            raw = environ.get(var)
            if raw is None or raw.strip() == "":
                continue
            try:
                values[name] = _parse(name, raw)
            except ValueError as exc:
                raise ConfigError(f"environment variable {var}={raw!r}: {exc}") from None
        return cls(**values)

    def source(self, name: str) -> str:
        """Where a set value came from, for messages: 'env HF_BATCH_SIZE'."""
        return f"env {ENV[name]}"


def _parse(name: str, raw: str) -> object:
    text = raw.strip()
    if name in ("emulate", "continuous_batching", "on_device_sampling"):
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError("expected 1 or 0 (true/false)")
    if name == "auto_cast_type":
        return normalize_cast_type(text)
    value = int(text)
    if value <= 0:
        raise ValueError("must be a positive integer")
    return value
