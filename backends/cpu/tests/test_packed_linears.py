"""Linears packed once for oneDNN (`_packed`): in bf16 the same bits as `F.linear`, in
float32 MKL's values to rounding; a paged engine that packs them answers as one that
does not (exactly in bf16, the same greedy tokens in float32)."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from tgi_backend_cpu import _packed, paged
from tgi_backend_cpu._packed import PackedLinear, pack_linears_
from tgi_backend_cpu.paged import PagedCpuBackend
from torch import nn

from tgi.config import ServeConfig
from tgi.models.source import ModelFiles, ModelKind
from tgi.testing.ranks import greedy_steps
from tgi.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(
    not _packed.packing_available(torch.float32), reason="no oneDNN here"
)
# bf16 packing needs the CPU's bf16 path too (AVX512-BW/VL/DQ or AVX-NE-CONVERT)
needs_bf16 = pytest.mark.skipif(
    not _packed.packing_available(torch.bfloat16), reason="no oneDNN bf16 path on this CPU"
)


@needs_bf16
@pytest.mark.parametrize("rows", [1, 7, 32, 130])
@pytest.mark.parametrize(("out", "inp", "bias"), [(960, 576, False), (576, 1536, True)])
def test_a_packed_linear_gives_f_linears_bits(rows: int, out: int, inp: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(inp, out, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 2 * inp, dtype=torch.bfloat16)[:, :inp]  # a strided view, as RMSNorm's
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias))


@needs_bf16
def test_every_bf16_linear_is_packed_and_a_tied_embedding_stays_plain() -> None:
    model = nn.ModuleDict(
        {
            "embed": nn.Embedding(10, 8),
            "inner": nn.Sequential(nn.Linear(8, 8)),
            "head": nn.Linear(8, 10),
        }
    ).to(torch.bfloat16)
    model["head"].weight = model["embed"].weight
    assert pack_linears_(model) == 2
    assert isinstance(model["inner"][0], PackedLinear) and isinstance(model["head"], PackedLinear)
    assert type(model["embed"].weight) is nn.Parameter  # still looked up by rows
    assert pack_linears_(nn.Sequential(nn.Linear(4, 4))) == 0  # float32 ones: not asked
    assert pack_linears_(nn.Sequential(nn.Linear(4, 4)), torch.float32) == 1
    with pytest.raises(ValueError, match="float16"):
        pack_linears_(nn.Sequential(nn.Linear(4, 4)), torch.float16)


@pytest.mark.parametrize("rows", [1, 32, 130])
def test_a_packed_float32_linear_gives_f_linears_values_to_rounding(rows: int) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(576, 960)
    x = torch.randn(rows, 1152)[:, :576]
    with torch.inference_mode():
        packed, plain = PackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias)
    torch.testing.assert_close(packed, plain, rtol=1e-5, atol=1e-4)


def test_a_cpu_without_onednns_bf16_path_keeps_f_linear() -> None:
    """AVX2-only CPUs (oneDNN capped to AVX2 here) cannot pack bf16: no packing, no crash."""
    code = "from tgi_backend_cpu._packed import packing_available; print(packing_available())"
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
    float32 = code.replace("packing_available()", "packing_available(torch.float32)")
    float32 = "import torch; " + float32
    done = subprocess.run([sys.executable, "-c", float32], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"  # oneDNN's float32 path needs no bf16 ISA


@needs_bf16
def test_a_packing_engine_answers_exactly_as_a_plain_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", "llama", tie_word_embeddings=True)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]

    def run(packing: bool) -> tuple[list[list[int]], torch.Tensor]:
        monkeypatch.setattr(paged, "packing_available", lambda dtype: packing)
        engine = PagedCpuBackend(model_dir, dtype=torch.bfloat16, kv_cache_memory=2**24)
        packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
        assert bool(packed) == packing
        result = greedy_steps(engine, prompts, 5)
        return result.tokens, result.first_logits

    (packed_tokens, packed_logits), (plain_tokens, plain_logits) = run(True), run(False)
    assert packed_tokens == plain_tokens
    assert torch.equal(packed_logits, plain_logits)


def test_a_float32_engine_packs_unless_told_not_to_and_keeps_its_greedy_tokens(
    tmp_path: Path,
) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", "llama", tie_word_embeddings=True)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]

    def run(pack_float32: bool) -> tuple[list[list[int]], torch.Tensor]:
        engine = PagedCpuBackend(
            model_dir, dtype=torch.float32, kv_cache_memory=2**24, pack_float32=pack_float32
        )
        packed = [m for m in engine.runner.model.modules() if isinstance(m, PackedLinear)]
        assert bool(packed) == pack_float32
        assert engine.engine_details["linears"] == ("onednn-packed" if pack_float32 else "f.linear")
        result = greedy_steps(engine, prompts, 5)
        return result.tokens, result.first_logits

    (packed_tokens, packed_logits), (plain_tokens, plain_logits) = run(True), run(False)
    assert packed_tokens == plain_tokens
    torch.testing.assert_close(packed_logits, plain_logits, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no cc")
def test_float32_from_config_runs_onednn_and_the_kernels_where_the_cpu_has_avx512(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--dtype float32` packs the linears unless `onednn_float32=false`; the compiled
    attention and layer ops come with AVX-512 only (their float32 loops are scalar
    without it)."""
    model_dir = build_tiny_model(tmp_path / "tiny", "llama")
    files = ModelFiles("tiny", ModelKind.LOCAL_DIR, model_dir, "LlamaForCausalLM", 512, None)
    host = paged.read_cpu_info()

    def details(flags: frozenset[str], **options: bool) -> dict[str, str]:
        cpu = dataclasses.replace(host, flags=flags)
        monkeypatch.setattr(paged, "read_cpu_info", lambda: cpu)
        config = ServeConfig(
            dtype="float32", cpu_threads=1, cache_dir=str(tmp_path / "cache"),
            backend_options=options,
        )  # fmt: skip
        backend = PagedCpuBackend.from_config(config, files)
        try:
            return backend.engine_details
        finally:
            backend.close()

    with_avx512 = frozenset({"avx2", "avx512f"})
    assert details(with_avx512) == {
        "decode_attention": "compiled kernel",
        "linears": "onednn-packed",
        "layer_ops": "compiled",
    }
    assert details(frozenset({"avx2"})) == {
        "decode_attention": "sdpa",
        "linears": "onednn-packed",
        "layer_ops": "torch",
    }
    assert details(with_avx512, onednn_float32=False)["linears"] == "f.linear"
