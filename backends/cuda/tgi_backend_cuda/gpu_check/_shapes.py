"""The model shapes the GPU check runs, and random-weight models of them built on a device.

No checkpoint travels to the GPU machine (a call carries 64 MiB; SmolLM2-135M's file
alone is 94 MiB), so every model here is made from its config with random weights,
directly on the device the check runs on.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from tgi.models.llama import LlamaForCausalLM

__all__ = ["BENCH_SHAPES", "SMOLLM2_135M", "TINY", "Shape", "hf_config", "random_tgi_model"]


@dataclass(frozen=True, slots=True)
class Shape:
    """A named Llama-family shape: the keyword arguments of transformers' LlamaConfig."""

    name: str
    config: Mapping[str, Any]
    # N(0, init_std) weights. At 0.02 (the configs' own initializer_range) the layers add
    # little to the residual and a tied head maps each token to itself: greedy decoding
    # repeats the last token whatever the attention did. Larger, the tokens vary with
    # context, so a parity check sees attention mistakes.
    init_std: float = 0.02

    def decode_weight_bytes(self, dtype: torch.dtype) -> int:
        """Weight bytes one decode step reads: every matrix and norm, the LM head, but not
        the embedding table (a step gathers one row of it) unless the head is tied to it."""
        c = self.config
        hidden, inter = int(c["hidden_size"]), int(c["intermediate_size"])
        heads, kv_heads = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
        head_dim = int(c.get("head_dim") or hidden // heads)
        attention = hidden * (heads + 2 * kv_heads) * head_dim + heads * head_dim * hidden
        layer = attention + 3 * hidden * inter + 2 * hidden
        params = int(c["num_hidden_layers"]) * layer + hidden + int(c["vocab_size"]) * hidden
        return params * torch.empty((), dtype=dtype).element_size()


_COMMON = {"rms_norm_eps": 1e-5, "hidden_act": "silu", "attention_bias": False}

# HuggingFaceTB/SmolLM2-135M's config.json, less its tokenizer ids
SMOLLM2_135M = Shape(
    "smollm2-135m",
    {
        **_COMMON,
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "tie_word_embeddings": True,
        "rope_theta": 100000.0,
        "max_position_embeddings": 8192,
    },
    init_std=0.1,
)

# Llama-3.2-1B and Llama-3.1-8B without their llama3 rope scaling (it changes no cost)
LLAMA_1B = Shape(
    "1b",
    {
        **_COMMON,
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "tie_word_embeddings": True,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
)
LLAMA_8B = Shape(
    "8b",
    {
        **_COMMON,
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "tie_word_embeddings": False,
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
    },
)

# the dry run's stand-in for all of them
TINY = Shape(
    "tiny",
    {
        **_COMMON,
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 512,
    },
    init_std=0.2,
)

BENCH_SHAPES = {shape.name: shape for shape in (LLAMA_1B, LLAMA_8B, TINY)}


def hf_config(shape: Shape) -> Any:
    """transformers' LlamaConfig of `shape`, with no EOS: random weights would stop at
    a random step, and both sides must generate the same number of tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(
        **shape.config,
        architectures=["LlamaForCausalLM"],
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        initializer_range=shape.init_std,
    )


def random_tgi_model(
    shape: Shape, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> LlamaForCausalLM:
    """tgi's LlamaForCausalLM of `shape` with N(0, init_std) weights and unit norms, made on
    the meta device and materialised on `device` (no host copy of an 8B model)."""
    from tgi.models.llama import LlamaForCausalLM, LlamaSpec
    from tgi.models.rope import Rotary

    spec = LlamaSpec.from_hf(hf_config(shape).to_dict())
    with torch.device("meta"):
        model = LlamaForCausalLM(spec).to(dtype)
    model.to_empty(device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            elif param.ndim == 1:
                param.zero_()  # biases
            else:
                param.normal_(0.0, shape.init_std, generator=generator)
    if spec.tie_word_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    model.rotary = Rotary(spec.rope, device)  # made on meta above: its table is empty
    return model.eval().requires_grad_(False)
