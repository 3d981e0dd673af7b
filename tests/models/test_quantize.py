"""Weight-only int8/int4 linears: accuracy against fp32, module swap, memory actually freed."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch import nn

from tgi.models.quantize import (
    DEQUANT_MIN_ROWS,
    Int4Linear,
    Int8Linear,
    keep_prefill_weights_,
    quantize_linear,
    quantize_linears_,
    quantize_tied_lm_head_,
    quantize_weight,
    weight_bytes,
)

# Relative error measured on Gaussian weights (what trained weights look like, unlike
# nn.Linear's uniform init), bf16 rounding of the activations included: int8 0.008-0.009,
# int4 0.078 / 0.090 / 0.100-0.108 with groups of 32 / 64 / 128.
_BOUNDS = {"int8": 1e-2, "int4": 0.12}


def _gaussian_linear(in_features: int, out_features: int, *, bias: bool = True) -> nn.Linear:
    torch.manual_seed(in_features * 7 + out_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    with torch.no_grad():
        linear.weight.normal_(0.0, 0.02)
        if bias:
            linear.bias.normal_(0.0, 0.02)
    return linear


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected).norm() / expected.norm())


@pytest.mark.parametrize("mode", ["int8", "int4"])
# 1: decode, 32: a decode batch (kernel path), 512: prefill (dequantize + F.linear).
@pytest.mark.parametrize("rows", [1, 32, DEQUANT_MIN_ROWS, 512])
def test_quantized_linear_is_close_to_fp32(mode: str, rows: int) -> None:
    linear = _gaussian_linear(576, 960)
    quantized = quantize_linear(linear, mode)  # type: ignore[arg-type]
    x = torch.randn(rows, 576)
    with torch.inference_mode():
        expected = linear(x)
        actual = quantized(x)
    assert actual.shape == expected.shape and actual.dtype == torch.float32
    assert _relative_error(actual, expected) < _BOUNDS[mode]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_bf16_activations_and_batched_shape(mode: str) -> None:
    linear = _gaussian_linear(128, 192)
    quantized = quantize_linear(linear, mode)  # type: ignore[arg-type]
    x = torch.randn(3, 5, 128)
    with torch.inference_mode():
        actual = quantized(x.bfloat16())
        expected = linear(x)
    assert actual.dtype == torch.bfloat16 and actual.shape == (3, 5, 192)
    assert _relative_error(actual, expected) < _BOUNDS[mode] + 1e-2


def test_kernel_and_dequantized_paths_agree() -> None:
    """The prefill path (unpacked weight + F.linear) computes the same layer as the kernel."""
    linear = _gaussian_linear(256, 320)
    for quantized in (Int8Linear.from_linear(linear), Int4Linear.from_linear(linear, 32)):
        x = torch.randn(DEQUANT_MIN_ROWS, 256)
        with torch.inference_mode():
            one_by_one = torch.cat([quantized(row[None]) for row in x])  # kernel, bf16 in
            together = quantized(x)  # dequantized fp32 weight
        assert _relative_error(one_by_one, together) < 1e-2


def test_int4_falls_back_to_a_dividing_group_or_int8() -> None:
    # 576 is not a multiple of 128: the largest smaller group that divides it is taken.
    layer = quantize_linear(_gaussian_linear(576, 64), "int4", group_size=128)
    assert isinstance(layer, Int4Linear) and layer.group_size == 64
    # out_features 48 is not a multiple of the packer's 64-row blocks.
    assert isinstance(quantize_linear(_gaussian_linear(64, 48), "int4"), Int8Linear)
    # in_features 40: no group size divides it.
    assert isinstance(quantize_linear(_gaussian_linear(40, 64), "int4"), Int8Linear)


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv = _gaussian_linear(64, 192)
        self.down = _gaussian_linear(128, 64, bias=False)
        self.norm = nn.LayerNorm(64)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, 64)
        self.layers = nn.ModuleList([_Block(), _Block()])
        self.lm_head = nn.Linear(64, 256, bias=False)
        self.lm_head.weight = self.embed.weight  # tied, as SmolLM2's


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantize_linears_swaps_in_place_and_keeps_names_and_bias(mode: str) -> None:
    model = _Model()
    bias = model.layers[0].qkv.bias.detach().clone()
    quantize_linears_(model, mode, skip=lambda name: name == "lm_head")  # type: ignore[arg-type]
    names = {name: type(m) for name, m in model.named_modules()}
    expected_type = Int8Linear if mode == "int8" else Int4Linear
    for layer in range(2):
        assert names[f"layers.{layer}.qkv"] is expected_type
        assert names[f"layers.{layer}.down"] is expected_type
        assert names[f"layers.{layer}.norm"] is nn.LayerNorm
    assert names["lm_head"] is nn.Linear  # skipped
    assert model.lm_head.weight is model.embed.weight
    qkv = model.layers[0].qkv
    assert torch.equal(qkv.bias, bias) and model.layers[0].down.bias is None
    assert (qkv.in_features, qkv.out_features) == (64, 192)
    # No float copy of any quantized weight survives anywhere in the state.
    state = model.state_dict()
    assert not any(key.endswith(("qkv.weight", "down.weight")) for key in state)
    assert "layers.0.qkv.bias" in state


@pytest.mark.parametrize(("mode", "max_ratio"), [("int8", 0.27), ("int4", 0.16)])
def test_memory_is_really_saved(mode: str, max_ratio: float) -> None:
    model = nn.Sequential(_gaussian_linear(512, 1024, bias=False), nn.ReLU())
    before = weight_bytes(model)
    quantize_linears_(model, mode)  # type: ignore[arg-type]
    after = weight_bytes(model)
    assert after < before * max_ratio
    float_tensors = [t for t in model.state_dict().values() if t.numel() >= 512 * 1024 / 8]
    assert all(not t.is_floating_point() for t in float_tensors)


def test_the_float_weights_are_freed() -> None:
    model = nn.Sequential(_gaussian_linear(64, 128), _gaussian_linear(128, 64))
    weights = [weakref.ref(layer.weight) for layer in model]
    quantize_linears_(model, "int4")
    gc.collect()
    assert [ref() for ref in weights] == [None, None]


def test_quantize_weight_from_a_bare_embedding_table() -> None:
    """A head that multiplies by the table directly (no nn.Linear) gets its own copy."""
    embed = nn.Embedding(512, 64)
    with torch.no_grad():
        embed.weight.normal_(0.0, 0.02)
    table = embed.weight.detach().clone()
    head = quantize_weight(embed.weight, "int4")
    assert isinstance(head, Int4Linear) and head.bias is None
    assert torch.equal(embed.weight, table)  # the gather still sees float rows
    hidden = torch.randn(3, 64)
    with torch.inference_mode():
        assert _relative_error(head(hidden), hidden @ table.T) < _BOUNDS["int4"]


def test_tied_lm_head_is_quantized_apart_from_the_embedding() -> None:
    model = _Model()
    table = model.embed.weight.detach().clone()
    quantize_tied_lm_head_(model, "int8")
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.embed, nn.Embedding) and torch.equal(model.embed.weight, table)
    hidden = torch.randn(2, 64)
    with torch.inference_mode():
        logits = model.lm_head(hidden)
    assert _relative_error(logits, hidden @ table.T) < _BOUNDS["int8"]


def test_unknown_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown quantization mode 'int3'"):
        quantize_linears_(_Model(), "int3")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unknown quantization mode"):
        quantize_linear(nn.Linear(4, 4), "fp8")  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_kept_prefill_weights_are_built_once_and_give_the_same_output(mode: str) -> None:
    model = nn.Sequential(_gaussian_linear(128, 192), nn.ReLU(), _gaussian_linear(192, 128))
    quantize_linears_(model, mode)  # type: ignore[arg-type]
    x = torch.randn(DEQUANT_MIN_ROWS + 4, 128)
    rebuilt = model(x)
    assert keep_prefill_weights_(model) == 2
    kept = model(x)
    torch.testing.assert_close(kept, rebuilt, rtol=0, atol=0)
    first = model[0].prefill_weight(torch.float32)
    assert model[0].prefill_weight(torch.float32) is first  # cached, not rebuilt
    torch.testing.assert_close(first, model[0].dequantized(torch.float32), rtol=0, atol=0)
