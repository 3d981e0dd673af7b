"""The Llama family (Llama, Mistral, Qwen2, SmolLM2) in plain torch, for any device.

NOTE: one flat batch. A forward takes the step's tokens of every row flattened to [N]
with their absolute positions [N]; rows only meet inside the backend's attention op
(`tgi.models.attention.AttentionOp`), which knows where each row's KV lives. So every
projection is one matmul over all rows, and a decode step of 32 rows reads each weight
once. QKV and gate/up are fused into single `nn.Linear`s at load time; projections stay
`nn.Linear` so `tgi.models.quantize.quantize_linears_` can swap them. Logits are computed
only for `logits_index`, the flat positions whose next token is wanted.

Numerics follow transformers' `modeling_llama.py` (RMSNorm in float32, rotate-half rotary,
residual order), so logits match it on the same weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from tgi.errors import ConfigError
from tgi.models.attention import AttentionOp
from tgi.models.rope import RopeSpec, Rotary, apply_rotary

if TYPE_CHECKING:
    from tgi.weights import TensorSource

logger = logging.getLogger(__name__)

__all__ = [
    "ARCHITECTURES",
    "LlamaForCausalLM",
    "LlamaSpec",
    "load_llama",
    "quantize_model_",
]

ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
_QKV_BIAS_ARCHITECTURES = frozenset({"Qwen2ForCausalLM"})  # q/k/v biased, o_proj not


@dataclass(frozen=True, slots=True)
class LlamaSpec:
    """The shape of a Llama-family model, parsed from HF `config.json`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope: RopeSpec
    tie_word_embeddings: bool
    qkv_bias: bool  # Qwen2, or Llama's `attention_bias`
    o_bias: bool  # Llama's `attention_bias` only
    mlp_bias: bool
    layer_windows: tuple[int | None, ...]  # per layer: sliding window in tokens, None = full
    max_position_embeddings: int | None

    @classmethod
    def from_hf(cls, config: Mapping[str, Any]) -> LlamaSpec:
        """Parse an HF config dict; ConfigError for an architecture outside the family."""
        architectures = config.get("architectures") or ["LlamaForCausalLM"]
        architecture = str(architectures[0])
        if architecture not in ARCHITECTURES:
            raise ConfigError(
                f"{architecture} is not a Llama-family model (supported: "
                f"{', '.join(sorted(ARCHITECTURES))})"
            )
        num_heads = int(config["num_attention_heads"])
        hidden_size = int(config["hidden_size"])
        head_dim = int(config.get("head_dim") or hidden_size // num_heads)
        num_layers = int(config["num_hidden_layers"])
        attention_bias = bool(config.get("attention_bias", False))
        return cls(
            architecture=architecture,
            vocab_size=int(config["vocab_size"]),
            hidden_size=hidden_size,
            intermediate_size=int(config["intermediate_size"]),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=int(config.get("num_key_value_heads") or num_heads),
            head_dim=head_dim,
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            rope=RopeSpec.from_hf(config, head_dim),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            qkv_bias=attention_bias or architecture in _QKV_BIAS_ARCHITECTURES,
            o_bias=attention_bias,
            mlp_bias=bool(config.get("mlp_bias", False)),
            layer_windows=_layer_windows(config, architecture, num_layers),
            max_position_embeddings=config.get("max_position_embeddings"),
        )

    def kv_bytes_per_token(self, dtype: torch.dtype) -> int:
        """KV bytes one token costs: keys and values of every layer."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * itemsize


def _layer_windows(
    config: Mapping[str, Any], architecture: str, num_layers: int
) -> tuple[int | None, ...]:
    """Which layers use a sliding window, as transformers decides it per architecture."""
    window = config.get("sliding_window")
    if architecture == "Qwen2ForCausalLM" and not config.get("use_sliding_window", False):
        window = None
    if window is None:
        return (None,) * num_layers
    layer_types = config.get("layer_types")
    if layer_types is None and architecture == "Qwen2ForCausalLM":
        first = int(config.get("max_window_layers", num_layers))
        layer_types = ["sliding_attention" if i >= first else "full" for i in range(num_layers)]
    if layer_types is None:
        return (int(window),) * num_layers
    return tuple(int(window) if kind == "sliding_attention" else None for kind in layer_types)


class RMSNorm(nn.Module):
    """transformers' LlamaRMSNorm, as one fused op."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps
        self._doubled: torch.Tensor | None = None  # [w, w], for the reduced-precision path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 or x.device.type != "cpu":
            # The same math as transformers in float32; one fused op where the device has one.
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)
        # On a CPU, rms_norm in bf16/fp16 runs as a dozen small ops (~12-22 us at SmolLM2's
        # width, twice per layer per step) but layer_norm has one fused kernel. Over
        # z = [x, -x] the mean is 0 and the variance is mean(x^2), so layer_norm(z)'s first
        # half is x / sqrt(mean(x^2) + eps): RMSNorm, accumulated in float32 as
        # transformers does, the weight applied before the one rounding (transformers rounds
        # before and after it: at most one ulp apart).
        size = x.shape[-1]
        if self._doubled is None or self._doubled.dtype != x.dtype:
            weight = self.weight.to(x.dtype)
            self._doubled = torch.cat((weight, weight))
        doubled = torch.cat((x, x.neg()), dim=-1)
        return F.layer_norm(doubled, (2 * size,), self._doubled, None, self.eps)[..., :size]


class LlamaLayer(nn.Module):
    """One decoder layer with fused QKV and gate/up projections."""

    def __init__(self, spec: LlamaSpec, index: int) -> None:
        super().__init__()
        self.index = index
        self.num_heads, self.num_kv_heads, self.head_dim = (
            spec.num_heads,
            spec.num_kv_heads,
            spec.head_dim,
        )
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.split = (q_size, kv_size, kv_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.qkv_proj = nn.Linear(spec.hidden_size, q_size + 2 * kv_size, bias=spec.qkv_bias)
        self.o_proj = nn.Linear(q_size, spec.hidden_size, bias=spec.o_bias)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.intermediate_size = spec.intermediate_size
        self.gate_up_proj = nn.Linear(
            spec.hidden_size, 2 * spec.intermediate_size, bias=spec.mlp_bias
        )
        self.down_proj = nn.Linear(spec.intermediate_size, spec.hidden_size, bias=spec.mlp_bias)

    def forward(
        self,
        hidden: torch.Tensor,  # [N, hidden]
        cos: torch.Tensor,  # [N, 1, rotary_dim]
        sin: torch.Tensor,
        attention: AttentionOp,
        metadata: Any,
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(self.input_layernorm(hidden))  # [N, (H + 2 KVH) * D]
        qk_size = self.split[0] + self.split[1]
        # q and k sit side by side in the fused output: rotate both heads at once
        qk = apply_rotary(qkv[:, :qk_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # slices: no Python split()
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attention(self.index, q, k, v, metadata)  # [N, H, D]
        hidden = hidden + self.o_proj(out.reshape(num_tokens, -1))
        gate_up = self.gate_up_proj(self.post_attention_layernorm(hidden))
        size = self.intermediate_size
        return hidden + self.down_proj(F.silu(gate_up[:, :size]) * gate_up[:, size:])


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head over a flat batch of tokens."""

    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.spec = spec
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.rotary = Rotary(spec.rope)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def forward(
        self,
        input_ids: torch.Tensor,  # [N] the step's tokens, all rows flattened
        positions: torch.Tensor,  # [N] absolute position of each token in its sequence
        attention: AttentionOp,
        metadata: Any = None,
        logits_index: torch.Tensor | None = None,  # [M] flat indices wanting logits; None: all
    ) -> torch.Tensor:  # [M, V] float32
        """Run the step; the attention op stores each layer's k/v as a side effect."""
        hidden = self.embed_tokens(input_ids)  # [N, hidden]
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attention, metadata)
        if logits_index is not None:
            hidden = hidden.index_select(0, logits_index)  # [M, hidden]
        return self.lm_head(self.norm(hidden)).float()

    @classmethod
    def from_tensors(
        cls, spec: LlamaSpec, tensors: TensorSource, dtype: torch.dtype
    ) -> LlamaForCausalLM:
        """Build from HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...).

        The model is made on the meta device and every parameter assigned from the fused
        checkpoint tensors, so no random init runs and nothing is held twice.
        """
        with torch.device("meta"):
            model = cls(spec)
        state = _fused_state(spec, tensors, dtype)
        missing = set(model.state_dict()) - set(state)
        if spec.tie_word_embeddings or "lm_head.weight" not in state:
            missing.discard("lm_head.weight")
        if missing:
            raise ConfigError(f"checkpoint lacks tensors for {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False, assign=True)
        if "lm_head.weight" not in state:
            model.lm_head.weight = model.embed_tokens.weight  # tied embeddings
        model.rotary = Rotary(spec.rope)
        return model.eval().requires_grad_(False)


def _fused_state(
    spec: LlamaSpec, tensors: TensorSource, dtype: torch.dtype
) -> dict[str, torch.Tensor]:
    """Map HF names onto this module's, concatenating q/k/v and gate/up."""

    def get(name: str) -> torch.Tensor:
        return tensors.get(name).to(dtype)

    def cat(names: list[str]) -> torch.Tensor:
        return torch.cat([get(name) for name in names], dim=0)

    state = {
        "embed_tokens.weight": get("model.embed_tokens.weight"),
        "norm.weight": get("model.norm.weight"),
    }
    if not spec.tie_word_embeddings and "lm_head.weight" in tensors:
        state["lm_head.weight"] = get("lm_head.weight")
    for i in range(spec.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        attn = [f"{hf}self_attn.{p}_proj" for p in ("q", "k", "v")]
        state[ours + "qkv_proj.weight"] = cat([f"{name}.weight" for name in attn])
        if spec.qkv_bias:
            state[ours + "qkv_proj.bias"] = cat([f"{name}.bias" for name in attn])
        state[ours + "o_proj.weight"] = get(f"{hf}self_attn.o_proj.weight")
        if spec.o_bias:
            state[ours + "o_proj.bias"] = get(f"{hf}self_attn.o_proj.bias")
        mlp = [f"{hf}mlp.gate_proj", f"{hf}mlp.up_proj"]
        state[ours + "gate_up_proj.weight"] = cat([f"{name}.weight" for name in mlp])
        state[ours + "down_proj.weight"] = get(f"{hf}mlp.down_proj.weight")
        if spec.mlp_bias:
            state[ours + "gate_up_proj.bias"] = cat([f"{name}.bias" for name in mlp])
            state[ours + "down_proj.bias"] = get(f"{hf}mlp.down_proj.bias")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{ours}{norm}.weight"] = get(f"{hf}{norm}.weight")
    return state


def load_llama(path: Path | Any, dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    """Load a Llama-family checkpoint: a model dir, a `ModelFiles`, or a `.gguf` file."""
    from tgi.weights import open_checkpoint

    config, tensors = open_checkpoint(path)
    spec = LlamaSpec.from_hf(config)
    return LlamaForCausalLM.from_tensors(spec, tensors, dtype)


def quantize_model_(
    model: nn.Module,
    mode: Literal["int8", "int4"],
    *,
    skip: Callable[[str], bool] | None = None,
    keep_prefill_weights: bool = False,
) -> None:
    """Swap the model's `nn.Linear`s for weight-only quantized ones (tgi.models.quantize);
    `keep_prefill_weights` trades one float copy of the weights for float-speed prefill."""
    from tgi.models.quantize import keep_prefill_weights_, quantize_linears_

    quantize_linears_(model, mode, skip=skip)
    if keep_prefill_weights:
        keep_prefill_weights_(model)
