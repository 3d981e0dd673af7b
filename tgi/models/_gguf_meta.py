"""Read the key/value header of a GGUF file without touching its tensors.

`gguf.GGUFReader` parses every field, including the ~100k-entry token and merge
arrays, into numpy views: about 5 s for SmolLM2. Start-up only needs a few scalars
(architecture, context length, name), so this walks the header with `struct` over an
mmap and skips arrays by their length prefixes, in tens of milliseconds. Type codes
and key names come from the `gguf` package so they track the format.

NOTE: layout (GGUF v2 and v3; v1 used 32-bit counts and is not read):

    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64 | kv * kv_count | ...
    kv     = key: string | value_type u32 | value
    string = length u64 | utf-8 bytes
    array  = item_type u32 | count u64 | item * count
"""

from __future__ import annotations

import logging
import mmap
import struct
from pathlib import Path
from typing import Any

import gguf

from tgi.errors import ModelNotFound

logger = logging.getLogger(__name__)

__all__ = ["GgufScalar", "gguf_hf_architecture", "read_gguf_metadata"]

GgufScalar = str | int | float | bool

_SCALAR_FORMATS: dict[gguf.GGUFValueType, str] = {
    gguf.GGUFValueType.UINT8: "B",
    gguf.GGUFValueType.INT8: "b",
    gguf.GGUFValueType.UINT16: "H",
    gguf.GGUFValueType.INT16: "h",
    gguf.GGUFValueType.UINT32: "I",
    gguf.GGUFValueType.INT32: "i",
    gguf.GGUFValueType.FLOAT32: "f",
    gguf.GGUFValueType.BOOL: "?",
    gguf.GGUFValueType.UINT64: "Q",
    gguf.GGUFValueType.INT64: "q",
    gguf.GGUFValueType.FLOAT64: "d",
}

# GGUF `general.architecture` -> the transformers class a converted checkpoint names.
# These are the causal LMs transformers' GGUF loader reads; anything else gives None
# here and a clear error at conversion time.
_GGUF_ARCHITECTURES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen2moe": "Qwen2MoeForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3moe": "Qwen3MoeForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "gemma3": "Gemma3ForCausalLM",
    "falcon": "FalconForCausalLM",
    "stablelm": "StableLmForCausalLM",
    "starcoder2": "Starcoder2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
    "bloom": "BloomForCausalLM",
    "nemotron": "NemotronForCausalLM",
    "mamba": "MambaForCausalLM",
}


class _Cursor:
    """A read position over the mapped file that raises `ModelNotFound` on truncation."""

    def __init__(self, data: mmap.mmap, path: Path, endian: str) -> None:
        self.data = data
        self.path = path
        self.endian = endian
        self.offset = 0

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        if self.offset + size > len(self.data):
            raise ModelNotFound(f"{self.path}: GGUF header is truncated at byte {self.offset}")
        (value,) = struct.unpack_from(self.endian + fmt, self.data, self.offset)
        self.offset += size
        return value

    def string(self) -> str:
        length = int(self.unpack("Q"))
        end = self.offset + length
        if end > len(self.data):
            raise ModelNotFound(f"{self.path}: GGUF string runs past the end of the file")
        raw = self.data[self.offset : end]
        self.offset = end
        return raw.decode("utf-8", errors="replace")

    def skip_array(self) -> None:
        item_type = self.value_type()
        count = int(self.unpack("Q"))
        if item_type is gguf.GGUFValueType.STRING:
            for _ in range(count):
                length = int(self.unpack("Q"))
                self.offset += length
        elif item_type is gguf.GGUFValueType.ARRAY:
            for _ in range(count):
                self.skip_array()
        else:
            self.offset += struct.calcsize(_SCALAR_FORMATS[item_type]) * count
        if self.offset > len(self.data):
            raise ModelNotFound(f"{self.path}: GGUF array runs past the end of the file")

    def value_type(self) -> gguf.GGUFValueType:
        code = int(self.unpack("I"))
        try:
            return gguf.GGUFValueType(code)
        except ValueError:
            raise ModelNotFound(
                f"{self.path}: unknown GGUF value type {code} at byte {self.offset - 4}"
            ) from None


def read_gguf_metadata(path: Path) -> dict[str, GgufScalar]:
    """Return the scalar and string metadata of the GGUF file at `path`.

    Arrays (tokens, merges, token types) are skipped, not returned. Raises
    `ModelNotFound` when the file is not a GGUF file or its header is cut short.
    """
    with path.open("rb") as handle:
        if path.stat().st_size < 24:
            raise ModelNotFound(f"{path} is not a GGUF file: it is too short for a header")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _read_header(data, path)


def _read_header(data: mmap.mmap, path: Path) -> dict[str, GgufScalar]:
    (magic,) = struct.unpack_from("<I", data, 0)
    if magic != gguf.GGUF_MAGIC:
        raise ModelNotFound(f"{path} is not a GGUF file: bad magic {bytes(data[:4])!r}")
    # Big-endian files exist (s390x builds); their version reads as a huge number in LE.
    (version,) = struct.unpack_from("<I", data, 4)
    endian = "<"
    if version & 0xFFFF == 0:
        (version,) = struct.unpack_from(">I", data, 4)
        endian = ">"
    if version < 2:
        raise ModelNotFound(f"{path}: GGUF version {version} is too old (need 2 or later)")
    cursor = _Cursor(data, path, endian)
    cursor.offset = 8
    cursor.unpack("Q")  # tensor_count
    kv_count = int(cursor.unpack("Q"))
    metadata: dict[str, GgufScalar] = {}
    for _ in range(kv_count):
        key = cursor.string()
        value_type = cursor.value_type()
        if value_type is gguf.GGUFValueType.STRING:
            metadata[key] = cursor.string()
        elif value_type is gguf.GGUFValueType.ARRAY:
            cursor.skip_array()
        else:
            metadata[key] = cursor.unpack(_SCALAR_FORMATS[value_type])
    logger.debug("read %d GGUF metadata keys of %s", len(metadata), path)
    return metadata


def gguf_hf_architecture(metadata: dict[str, GgufScalar]) -> str | None:
    """The transformers architecture class this GGUF converts to, or None if unknown.

    llama.cpp files Mistral models under `llama`; transformers tells them apart by
    `general.name`, and so does this.
    """
    arch = str(metadata.get(gguf.Keys.General.ARCHITECTURE, ""))
    name = str(metadata.get(gguf.Keys.General.NAME, "")).lower()
    if arch == "llama" and "mistral" in name:
        arch = "mistral"
    return _GGUF_ARCHITECTURES.get(arch)
