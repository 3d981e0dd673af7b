"""Linears packed once for oneDNN (`_packed`): in bf16 the same bits as `F.linear`, in
float32 MKL's values to rounding; a paged engine that packs them answers as one that
does not (exactly in bf16, the same greedy tokens in float32)."""

from __future__ import annotations

import os
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

from tgi.testing.ranks import greedy_steps
from tgi.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(not _packed.packing_available(), reason="no oneDNN here")


@pytest.mark.parametrize("rows", [1, 7, 32, 130])
@pytest.mark.parametrize(("out", "inp", "bias"), [(960, 576, False), (576, 1536, True)])
def test_a_packed_linear_gives_f_linears_bits(rows: int, out: int, inp: int, bias: bool) -> None:
    torch.manual_seed(rows)
    linear = nn.Linear(inp, out, bias=bias).to(torch.bfloat16)
    x = torch.randn(rows, 2 * inp, dtype=torch.bfloat16)[:, :inp]  # a strided view, as RMSNorm's
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear)(x), F.linear(x, linear.weight, linear.bias))


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
    assert not torch.equal(packed_logits, plain_logits)  # oneDNN's GEMM, not MKL's
