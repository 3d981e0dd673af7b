"""The GGUF header reader agrees with the gguf package's full reader, in a fraction of the time."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import gguf
import pytest

from tgi.errors import ModelNotFound
from tgi.models._gguf_meta import gguf_hf_architecture, read_gguf_metadata


def _scalars_from_gguf_reader(path: Path) -> dict[str, object]:
    """Every non-array field as gguf.GGUFReader decodes it (the slow reference)."""
    reader = gguf.GGUFReader(path)
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if not key.startswith("GGUF.") and field.types[0] != gguf.GGUFValueType.ARRAY
    }


@pytest.mark.parametrize(
    "endian", [gguf.GGUFEndian.LITTLE, gguf.GGUFEndian.BIG], ids=["little", "big"]
)
def test_matches_gguf_reader(tmp_path: Path, make_gguf: Callable, endian: gguf.GGUFEndian) -> None:
    path = make_gguf(tmp_path / "t.gguf", "qwen2", context_length=1234, endian=endian)
    metadata = read_gguf_metadata(path)
    assert metadata == {
        "general.architecture": "qwen2",
        "general.name": "tiny test",
        "qwen2.context_length": 1234,
        "qwen2.block_count": 2,
        "test.flag": True,
        "test.scale": 0.5,
        "tokenizer.chat_template": "{{ messages }}",
    }
    if endian is gguf.GGUFEndian.LITTLE:
        assert metadata == _scalars_from_gguf_reader(path)


@pytest.mark.smollm2
@pytest.mark.slow  # gguf.GGUFReader takes ~6 s on this file
def test_matches_gguf_reader_on_smollm2(smollm2_gguf: Path) -> None:
    metadata = read_gguf_metadata(smollm2_gguf)
    assert metadata == _scalars_from_gguf_reader(smollm2_gguf)
    assert metadata["llama.context_length"] == 8192
    assert "tokenizer.ggml.tokens" not in metadata  # arrays are skipped


def test_truncated_header(tmp_path: Path, make_gguf: Callable) -> None:
    path = make_gguf(tmp_path / "t.gguf")
    data = path.read_bytes()
    path.write_bytes(data[:200])
    with pytest.raises(ModelNotFound, match=r"runs past the end|truncated"):
        read_gguf_metadata(path)


def test_too_short_and_old_versions(tmp_path: Path) -> None:
    short = tmp_path / "short.gguf"
    short.write_bytes(b"GGUF")
    with pytest.raises(ModelNotFound, match="too short for a header"):
        read_gguf_metadata(short)
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(b"GGUF" + (1).to_bytes(4, "little") + b"\0" * 32)
    with pytest.raises(ModelNotFound, match="GGUF version 1 is too old"):
        read_gguf_metadata(v1)


@pytest.mark.parametrize(
    ("arch", "name", "expected"),
    [
        ("llama", "SmolLM2 135M", "LlamaForCausalLM"),
        ("llama", "Mistral 7B Instruct", "MistralForCausalLM"),
        ("qwen2moe", "", "Qwen2MoeForCausalLM"),
        ("rwkv6", "", None),
    ],
)
def test_hf_architecture(arch: str, name: str, expected: str | None) -> None:
    metadata = {"general.architecture": arch, "general.name": name}
    assert gguf_hf_architecture(metadata) == expected  # type: ignore[arg-type]


def test_every_mapped_architecture_exists_in_transformers() -> None:
    import transformers

    from tgi.models import _gguf_meta

    missing = [
        name for name in _gguf_meta._GGUF_ARCHITECTURES.values() if not hasattr(transformers, name)
    ]
    assert missing == []
