"""Load a llama-architecture GGUF straight into HF-named float32 tensors and a config dict.

Why, next to the safetensors conversion in `tgi/models/_gguf_convert.py`: tgi's own
model code only needs tensors and a handful of config values, and building them here
skips transformers' model instantiation and tokenizer conversion. The result matches
what `AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)` loads, tensor for
tensor (tests/weights/test_gguf.py checks it on SmolLM2).

NOTE: llama.cpp's converter permutes the rows of attn_q and attn_k so that its rope
rotates adjacent pairs (x0, x1), (x2, x3), ... instead of HF's halves (x0, x64/2), ...
Per head of `dim` rows, HF row (half h, index i) was stored at row (i, half h):

    HF    [h0: r0 r1 .. r(d/2-1) | h1: r0 r1 .. ]    = gguf rows reshaped [d/2, 2] -> [2, d/2]
    gguf  [r0h0 r0h1 r1h0 r1h1 ..]

`_unpermute_rope` undoes that, as transformers' `LlamaTensorProcessor` does.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch

from tgi.errors import ModelNotFound
from tgi.models._gguf_meta import GgufScalar, read_gguf_metadata

logger = logging.getLogger(__name__)

__all__ = ["gguf_llama_config", "iter_gguf_tensors", "load_gguf"]

_ARCHITECTURE = "llama"

# gguf tensor name (block index replaced by {n}) -> HF parameter name, for Llama.
_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# In the GGUF but not an HF parameter: llama3's precomputed rope frequencies, which
# the config's rope scaling recomputes.
_NOT_PARAMETERS = frozenset({"rope_freqs.weight"})
_BLOCK_TENSOR = re.compile(r"^blk\.(?P<layer>\d+)\.(?P<part>[a-z_]+)\.(?P<kind>weight|bias)$")
_TOP_TENSOR = re.compile(r"^(?P<part>[a-z_]+)\.(?P<kind>weight|bias)$")


def load_gguf(
    path: Path, *, only: Callable[[str], bool] | None = None
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The HF `config.json` dict and the HF-named float32 tensors of the llama GGUF `path`.

    Tensors are dequantized one at a time from the memory-mapped file, so peak
    memory is the float32 result plus one tensor. `only(hf_name)` selects a subset.
    Raises `ModelNotFound` for a GGUF of another architecture or an unknown tensor.
    """
    reader = gguf.GGUFReader(path)
    config = gguf_llama_config(path, reader)
    return config, dict(iter_gguf_tensors(reader, config, only=only))


def gguf_llama_config(path: Path, reader: gguf.GGUFReader) -> dict[str, Any]:
    """The transformers `LlamaConfig` dict the GGUF at `path` (open in `reader`) describes.

    Scalars come from the header; the tensor list says whether the lm_head is tied
    (no `output.weight`) and, if the header lacks it, the vocabulary size.
    """
    meta = read_gguf_metadata(path)
    architecture = meta.get(gguf.Keys.General.ARCHITECTURE)
    if architecture != _ARCHITECTURE:
        raise ModelNotFound(f"{path}: architecture {architecture!r} is not {_ARCHITECTURE!r}")

    def arch(key: str) -> GgufScalar | None:
        return meta.get(key.format(arch=_ARCHITECTURE))

    def required(key: str) -> GgufScalar:
        value = arch(key)
        if value is None:
            raise ModelNotFound(f"{path}: GGUF metadata has no {key.format(arch=_ARCHITECTURE)}")
        return value

    keys = gguf.Keys
    hidden_size = int(required(keys.LLM.EMBEDDING_LENGTH))
    num_heads = int(required(keys.Attention.HEAD_COUNT))
    rope_theta = float(arch(keys.Rope.FREQ_BASE) or 10000.0)
    head_dim = arch(keys.Rope.DIMENSION_COUNT)
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "intermediate_size": int(required(keys.LLM.FEED_FORWARD_LENGTH)),
        "num_hidden_layers": int(required(keys.LLM.BLOCK_COUNT)),
        "num_attention_heads": num_heads,
        # Absent means multi-head attention (llama.cpp's default too).
        "num_key_value_heads": int(arch(keys.Attention.HEAD_COUNT_KV) or num_heads),
        "head_dim": int(head_dim) if head_dim is not None else hidden_size // num_heads,
        "rms_norm_eps": float(required(keys.Attention.LAYERNORM_RMS_EPS)),
        # transformers 4.x reads the flat key, 5.x `rope_parameters`; give both.
        "rope_theta": rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": rope_theta},
        "max_position_embeddings": int(required(keys.LLM.CONTEXT_LENGTH)),
        "vocab_size": _vocab_size(path, meta, reader),
        "tie_word_embeddings": not _has_tensor(reader, "output.weight"),
        "attention_bias": _has_tensor(reader, "blk.0.attn_q.bias"),
        "mlp_bias": False,
        "dtype": "float32",
    }
    for config_key, gguf_key in (
        ("bos_token_id", keys.Tokenizer.BOS_ID),
        ("eos_token_id", keys.Tokenizer.EOS_ID),
        ("pad_token_id", keys.Tokenizer.PAD_ID),
    ):
        if meta.get(gguf_key) is not None:
            config[config_key] = int(meta[gguf_key])
    return config


def iter_gguf_tensors(
    reader: gguf.GGUFReader,
    config: dict[str, Any],
    *,
    only: Callable[[str], bool] | None = None,
) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor) for each tensor of `reader`, dequantized lazily.

    `config` is `gguf_llama_config`'s result: its head counts undo the q/k permutation.
    """
    for tensor in reader.tensors:
        if tensor.name in _NOT_PARAMETERS:
            # transformers ignores it too; a llama3 GGUF's long-context scaling is lost.
            logger.warning("%s is not loaded: rope scaling from it is not applied", tensor.name)
            continue
        name, layer_part = _hf_name(tensor.name)
        if only is not None and not only(name):
            continue
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)  # [rows, cols]
        values = values.reshape(tuple(int(d) for d in reversed(tensor.shape)))
        if layer_part == "attn_q":
            values = _unpermute_rope(values, config["num_attention_heads"])
        elif layer_part == "attn_k":
            values = _unpermute_rope(values, config["num_key_value_heads"])
        if not values.flags.writeable or not values.flags.c_contiguous:
            # F32 tensors come back as read-only views of the file's memory map.
            values = np.array(values, dtype=np.float32, order="C")
        yield name, torch.from_numpy(values.astype(np.float32, copy=False))


def _hf_name(gguf_name: str) -> tuple[str, str | None]:
    """HF parameter name of a gguf tensor, and its block part (e.g. "attn_q") if any."""
    block = _BLOCK_TENSOR.match(gguf_name)
    if block is not None and block["part"] in _BLOCK_NAMES:
        hf_part = _BLOCK_NAMES[block["part"]]
        return f"model.layers.{block['layer']}.{hf_part}.{block['kind']}", block["part"]
    top = _TOP_TENSOR.match(gguf_name)
    if top is not None and top["part"] in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[top['part']]}.{top['kind']}", None
    raise ModelNotFound(f"GGUF tensor {gguf_name!r} has no Llama parameter to load into")


def _unpermute_rope(values: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (see the NOTE at the top). [rows, ...]"""
    head_rows = values.shape[0] // num_heads
    per_head = values.reshape(num_heads, head_rows // 2, 2, *values.shape[1:])
    return per_head.swapaxes(1, 2).reshape(values.shape)


def _has_tensor(reader: gguf.GGUFReader, name: str) -> bool:
    return any(tensor.name == name for tensor in reader.tensors)


def _vocab_size(path: Path, meta: dict[str, GgufScalar], reader: gguf.GGUFReader) -> int:
    declared = meta.get(gguf.Keys.LLM.VOCAB_SIZE.format(arch=_ARCHITECTURE))
    if declared is not None:
        return int(declared)
    for tensor in reader.tensors:
        if tensor.name == "token_embd.weight":
            return int(tensor.shape[-1])  # ggml order: [hidden, vocab]
    raise ModelNotFound(f"{path}: no llama.vocab_size in the GGUF and no embedding to count")
