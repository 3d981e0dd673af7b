"""The compiled layer ops (`_layer_ops`, `csrc/layer_ops.c`): each equal to the torch op it
replaces (in bf16 RMSNorm within one rounding step; in float32 to its rounding), torch's
path for what they do not take, and inside the paged engine the same steps as torch's
ops."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu._layer_ops import CpuLayerOps, load_layer_ops
from tgi_backend_cpu.paged import PagedCpuBackend

from tgi.models.llama import RMSNorm
from tgi.models.ops import TORCH_LAYER_OPS
from tgi.models.rope import RopeSpec, Rotary
from tgi.testing.steps import mixed_step_logits
from tgi.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)
BF16 = torch.bfloat16


@pytest.fixture(scope="module")
def ops(tmp_path_factory: pytest.TempPathFactory) -> CpuLayerOps:
    built, how = load_layer_ops(tmp_path_factory.mktemp("kernels"), "test-cpu")
    assert built is not None, how
    return built


def _norm(size: int, dtype: torch.dtype = BF16) -> RMSNorm:
    norm = RMSNorm(size, 1e-5)
    norm.weight.data = torch.randn(size)
    return norm.to(dtype)


def _compiled_calls(
    monkeypatch: pytest.MonkeyPatch, functions: dict[torch.dtype, Any], dtype: torch.dtype
) -> list[int]:
    """Counts the calls of `dtype`'s C function: a silent fall back to torch would pass
    the comparisons alone."""
    calls: list[int] = []
    function = functions[dtype]

    def counted(*args: Any) -> int:
        calls.append(1)
        return int(function(*args))

    monkeypatch.setitem(functions, dtype, counted)
    return calls


def _within_one_rounding(got: torch.Tensor, want: torch.Tensor) -> None:
    """bf16 values equal, or one bf16 step apart (a float32 sum taken in another order
    can round the other way); near zero, within 1e-6 (torch's bf16 RMSNorm, a layer_norm
    over [x, -x], leaves a mean of ~1e-9 where ours has exactly 0). float32: within a
    few of its own steps (sums and exp in another order)."""
    assert got.dtype == want.dtype
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        return
    step = want.float().abs() * 2.0**-7 + 1e-6
    assert bool(((got.float() - want.float()).abs() <= step).all())
    assert (got != want).float().mean() < 0.01


DTYPES = [BF16, torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 7, 200])  # 200 x 576: threads share the rows
def test_add_rms_norm_equals_torchs(
    ops: CpuLayerOps, rows: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _compiled_calls(monkeypatch, ops._norm, dtype)
    torch.manual_seed(rows)
    norm = _norm(576, dtype)
    hidden, delta = torch.randn(rows, 576, dtype=dtype), torch.randn(rows, 576, dtype=dtype)
    summed, normed = ops.add_rms_norm(hidden, delta, norm)
    want_summed, want_normed = TORCH_LAYER_OPS.add_rms_norm(hidden, delta, norm)
    assert torch.equal(summed, want_summed)  # one add: the same rounding
    _within_one_rounding(normed, want_normed)
    alone, normed = ops.add_rms_norm(hidden, None, norm)
    assert alone is hidden
    _within_one_rounding(normed, TORCH_LAYER_OPS.add_rms_norm(hidden, None, norm)[1])
    assert len(calls) == 2


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "rotary_dim"), [(1, 64), (33, 64), (300, 64), (5, 32)])
def test_rotary_rotates_q_and_k_in_place_as_torch_does(
    ops: CpuLayerOps,
    rows: int,
    rotary_dim: int,
    dtype: torch.dtype,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """In place in the fused QKV output (q and k heads; v left alone), bitwise torch's
    in bf16 (float32: to its rounding, a multiply-add may be fused or not); a partial
    rotary (32 of 64 dims) leaves the other dims as they were."""
    torch.manual_seed(rows)
    heads, kv_heads, head_dim = 9, 3, 64
    qkv = torch.randn(rows, (heads + 2 * kv_heads) * head_dim, dtype=dtype)
    rope = RopeSpec.from_hf(
        {"rope_theta": 10000.0, "partial_rotary_factor": rotary_dim / head_dim}, head_dim
    )
    cos, sin = Rotary(rope).cos_sin(torch.randint(0, 4000, (rows,)), dtype)
    qk_size = (heads + kv_heads) * head_dim
    want = TORCH_LAYER_OPS.rotary(qkv[:, :qk_size].view(rows, -1, head_dim), cos, sin)
    inplace = qkv.clone()
    calls = _compiled_calls(monkeypatch, ops._rotary, dtype)
    got = ops.rotary(inplace[:, :qk_size].view(rows, -1, head_dim), cos, sin)
    assert calls == [1]
    assert got.data_ptr() == inplace.data_ptr()
    if dtype == BF16:
        assert torch.equal(got, want)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert torch.equal(inplace[:, qk_size:], qkv[:, qk_size:])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [1, 32, 100])
def test_silu_mul_equals_torchs(
    ops: CpuLayerOps, rows: int, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _compiled_calls(monkeypatch, ops._silu_mul, dtype)
    torch.manual_seed(rows)
    gate_up = torch.randn(rows, 2 * 1000, dtype=dtype) * 4  # 1000: a tail past 16-wide
    gate_up[0, :6] = torch.tensor([-100.0, -89.0, 0.0, 89.0, 100.0, -0.0])  # exp's edges
    _within_one_rounding(ops.silu_mul(gate_up), TORCH_LAYER_OPS.silu_mul(gate_up))
    assert calls == [1]


@pytest.mark.parametrize("dtype", DTYPES)
def test_write_kv_equals_index_copy_and_refuses_a_slot_outside_the_pool(
    ops: CpuLayerOps, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _compiled_calls(monkeypatch, ops._write_kv, dtype)
    torch.manual_seed(0)
    qkv = torch.randn(4, (9 + 6) * 64, dtype=dtype).view(4, 15, 64)
    k, v = qkv[:, 9:12], qkv[:, 12:]  # strided rows, as the layer hands them
    pool_k, pool_v = torch.zeros(32, 3, 64, dtype=dtype), torch.zeros(32, 3, 64, dtype=dtype)
    slots = torch.tensor([5, 17, 0, 31])
    ops.write_kv(k, v, pool_k, pool_v, slots)
    want_k, want_v = torch.zeros_like(pool_k), torch.zeros_like(pool_v)
    want_k.index_copy_(0, slots, k)
    want_v.index_copy_(0, slots, v)
    assert torch.equal(pool_k, want_k) and torch.equal(pool_v, want_v)
    with pytest.raises(IndexError):
        ops.write_kv(k, v, pool_k, pool_v, torch.tensor([1, 2, 32, 3]))
    assert torch.equal(pool_k, want_k)  # checked before anything is written
    assert calls == [1, 1]  # the refusal came from the C function, not index_copy_


def test_what_the_kernels_do_not_take_goes_to_torch(ops: CpuLayerOps) -> None:
    """float16 (no compiled ops) takes torch's ops."""
    torch.manual_seed(0)
    half = torch.float16
    norm = _norm(64, half)
    hidden, delta = torch.randn(3, 64, dtype=half), torch.randn(3, 64, dtype=half)
    got = ops.add_rms_norm(hidden, delta, norm)
    want = TORCH_LAYER_OPS.add_rms_norm(hidden, delta, norm)
    assert all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    gate_up = torch.randn(3, 64, dtype=half)
    assert torch.equal(ops.silu_mul(gate_up), TORCH_LAYER_OPS.silu_mul(gate_up))


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_paged_engine_steps_with_the_compiled_ops_as_with_torchs(
    ops: CpuLayerOps, tmp_path: Path, dtype: torch.dtype
) -> None:
    """Engines with and without the compiled ops: prefill, decode and a mixed step give
    close logits (float32: to its rounding) and the same greedy tokens; /info says which
    ops ran."""
    model = build_tiny_model(tmp_path / "tiny", "llama")
    engines = [
        PagedCpuBackend(model, dtype=dtype, kv_cache_memory=2**24, layer_ops=layer_ops)
        for layer_ops in (ops, None)
    ]
    assert [e.engine_details["layer_ops"] for e in engines] == ["compiled", "torch"]
    outs = [mixed_step_logits(engine) for engine in engines]
    tolerance = 0.05 if dtype == BF16 else 1e-4
    for compiled, with_torch in zip(*outs, strict=True):
        torch.testing.assert_close(compiled, with_torch, rtol=tolerance, atol=tolerance)
        assert torch.equal(compiled.argmax(-1), with_torch.argmax(-1))
