"""Which CPU engine the plugin builds: paged for the Llama family, generic otherwise,
`TGI_CPU_ENGINE` to force one, and `--quantize` only where the paged engine runs."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu import plugin
from tgi_backend_cpu.backend import TransformersCpuBackend
from tgi_backend_cpu.paged import BLOCK_SIZE, PagedCpuBackend

from tgi.backend.contract import Limits
from tgi.config import ServeConfig, parse_bytes
from tgi.errors import ConfigError
from tgi.models.source import ModelFiles, ModelKind
from tgi.testing.tiny_models import build_tiny_model

KV_BYTES = parse_bytes("1MiB")
LIMITS = Limits(16, 32, 64, max_batch_total_tokens=None, max_batch_size=None)


def model_files(model_id: str, path: Path, architecture: str | None) -> ModelFiles:
    return ModelFiles(model_id, ModelKind.LOCAL_DIR, path, architecture, 512, None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), "qwen2")


@pytest.fixture
def restore_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _config(engine: str | None = None, **values: Any) -> ServeConfig:
    environ = {plugin.ENGINE_ENV: engine} if engine is not None else {}
    return ServeConfig(
        dtype="float32", cpu_threads=1, kv_cache_memory=KV_BYTES, environ=environ, **values
    )


@pytest.mark.parametrize(
    ("engine", "architecture", "expected"),
    [
        (None, "LlamaForCausalLM", "paged"),
        ("auto", "Qwen2ForCausalLM", "paged"),
        (None, "GPT2LMHeadModel", "generic"),
        (None, None, "generic"),
        ("generic", "MistralForCausalLM", "generic"),
        ("PAGED", "MistralForCausalLM", "paged"),
    ],
)
def test_choose_engine(engine: str | None, architecture: str | None, expected: str) -> None:
    assert plugin.choose_engine(_config(engine), architecture) == expected


def test_bad_pairings_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="TGI_CPU_ENGINE='fast'"):
        plugin.choose_engine(_config("fast"), "LlamaForCausalLM")
    with pytest.raises(ConfigError, match="this model is GPT2LMHeadModel"):
        plugin.choose_engine(_config("paged"), "GPT2LMHeadModel")
    with pytest.raises(ConfigError, match="--quantize int8 needs the cpu backend's paged engine"):
        plugin.choose_engine(_config(quantize="int8"), "GPT2LMHeadModel")
    with pytest.raises(ConfigError, match="TGI_CPU_ENGINE=generic is set"):
        plugin.tgi_validate_config(config=_config("generic", quantize="int4"))


def test_create_builds_each_engine(model_dir: Path, restore_threads: None) -> None:
    files = model_files("tiny", model_dir, "Qwen2ForCausalLM")
    paged = plugin.tgi_backend_create(config=_config(), model=files, rank=0, world_size=1)
    assert isinstance(paged, PagedCpuBackend) and paged.dtype == torch.float32
    # Both engines size KV from config.kv_cache_memory, not from a MemAvailable share.
    block_bytes = paged.bytes_per_token * BLOCK_SIZE
    assert paged.warmup(LIMITS).kv.total_tokens == KV_BYTES // block_bytes * BLOCK_SIZE
    paged.close()
    generic = plugin.tgi_backend_create(
        config=_config("generic"), model=files, rank=0, world_size=1
    )
    assert isinstance(generic, TransformersCpuBackend)
    assert generic.warmup(LIMITS).kv.total_tokens == KV_BYTES // generic.bytes_per_token
    generic.close()


def test_create_quantizes_the_paged_engine(model_dir: Path, restore_threads: None) -> None:
    pytest.importorskip("tgi.models.quantize", reason="engineer C's quantize module")
    files = model_files("tiny", model_dir, "Qwen2ForCausalLM")
    backend = plugin.tgi_backend_create(
        config=_config(quantize="int8"), model=files, rank=0, world_size=1
    )
    assert isinstance(backend, PagedCpuBackend)
    model = backend._require_model()
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    backend.health()
    backend.close()
