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
from tgi.models.ops import TORCH_LAYER_OPS, LayerOps
from tgi.models.rope import RopeSpec, Rotary

if TYPE_CHECKING:
    from tgi.parallel.group import ShardGroup
    from tgi.parallel.sharding import ShardPlan
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
        self.group: ShardGroup | None = None  # sharded: o_proj and down_proj sum over ranks

    def forward(
        self,
        hidden: torch.Tensor,  # [N, hidden]
        delta: torch.Tensor | None,  # the previous layer's MLP output, not yet added
        cos: torch.Tensor,  # [N, 1, rotary_dim]
        sin: torch.Tensor,
        attention: AttentionOp,
        metadata: Any,
        ops: LayerOps,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(the residual stream, this layer's MLP output): the caller adds the second,
        fused with the norm that follows (`tgi.models.ops`'s NOTE)."""
        num_tokens = hidden.shape[0]
        hidden, normed = ops.add_rms_norm(hidden, delta, self.input_layernorm)
        qkv = self.qkv_proj(normed)  # [N, (H + 2 KVH) * D]
        qk_size = self.split[0] + self.split[1]
        # q and k sit side by side in the fused output: rotate both heads at once
        qk = ops.rotary(qkv[:, :qk_size].view(num_tokens, -1, self.head_dim), cos, sin)
        q, k = qk[:, : self.num_heads], qk[:, self.num_heads :]  # slices: no Python split()
        v = qkv[:, qk_size:].view(num_tokens, self.num_kv_heads, self.head_dim)
        out = attention(self.index, q, k, v, metadata)  # [N, H, D]
        attended = self.o_proj(out.reshape(num_tokens, -1))
        if self.group is not None:
            self.group.all_reduce_(attended)  # row-parallel: each rank's heads' share
        hidden, normed = ops.add_rms_norm(hidden, attended, self.post_attention_layernorm)
        mlp = self.down_proj(ops.silu_mul(self.gate_up_proj(normed)))
        if self.group is not None:
            self.group.all_reduce_(mlp)
        return hidden, mlp


class LlamaForCausalLM(nn.Module):
    """Embedding, decoder layers, final norm and LM head over a flat batch of tokens.

    Sharded (`shard` given), it is one rank's slice (tgi.parallel.sharding's NOTE): `spec`
    has this rank's heads and MLP columns, the embedding and head this rank's rows of the
    padded vocabulary; the forward takes part in the rank group's collectives and every
    rank returns the whole vocabulary's logits.
    """

    def __init__(self, spec: LlamaSpec, shard: tuple[ShardPlan, ShardGroup] | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.shard = shard
        vocab_rows = spec.vocab_size
        if shard is not None:
            vocab_rows = shard[0].vocab[1] - shard[0].vocab[0]
        self.embed_tokens = nn.Embedding(vocab_rows, spec.hidden_size)
        self.layers = nn.ModuleList(LlamaLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.lm_head = nn.Linear(spec.hidden_size, vocab_rows, bias=False)
        self.rotary = Rotary(spec.rope)
        self.ops: LayerOps = TORCH_LAYER_OPS  # a device may set fused ones (tgi.models.ops)
        if shard is not None:
            for layer in self.layers:
                assert isinstance(layer, LlamaLayer)
                layer.group = shard[1]

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
        hidden = self._embed(input_ids)  # [N, hidden]
        cos, sin = self.rotary.cos_sin(positions, hidden.dtype)
        ops, delta = self.ops, None
        for layer in self.layers:
            hidden, delta = layer(hidden, delta, cos, sin, attention, metadata, ops)
        if logits_index is not None:
            hidden = hidden.index_select(0, logits_index)  # [M, hidden]
            delta = delta.index_select(0, logits_index) if delta is not None else None
        logits = self.lm_head(ops.add_rms_norm(hidden, delta, self.norm)[1]).float()
        if self.shard is None:
            return logits
        plan, group = self.shard
        return group.all_gather_last(logits)[:, : plan.vocab_size]

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.shard is None:
            return self.embed_tokens(input_ids)
        plan, group = self.shard
        start, stop = plan.vocab
        inside = (input_ids >= start) & (input_ids < stop)
        local = torch.where(inside, input_ids - start, 0)
        hidden = self.embed_tokens(local) * inside.unsqueeze(-1).to(self.dtype)
        return group.all_reduce_(hidden)  # each id's row lives on exactly one rank

    @classmethod
    def from_tensors(
        cls,
        spec: LlamaSpec,
        tensors: TensorSource,
        dtype: torch.dtype,
        shard: tuple[ShardPlan, ShardGroup] | None = None,
        device: torch.device | str | None = None,
    ) -> LlamaForCausalLM:
        """Build from HF-named tensors (`model.layers.0.self_attn.q_proj.weight`, ...).

        The model is made on the meta device and every parameter assigned from the fused
        checkpoint tensors, so no random init runs and nothing is held twice. With
        `shard`, only this rank's slices are read (`tgi.parallel.sharding`).
        """
        local = shard[0].local_spec(spec) if shard is not None else spec
        with torch.device("meta"):
            model = cls(local, shard)
        reader = _SliceReader(tensors, dtype, shard[0] if shard is not None else None, device)
        state = _fused_state(spec, reader)
        missing = set(model.state_dict()) - set(state)
        if spec.tie_word_embeddings or "lm_head.weight" not in state:
            missing.discard("lm_head.weight")
        if missing:
            raise ConfigError(f"checkpoint lacks tensors for {sorted(missing)[:5]}")
        model.load_state_dict(state, strict=False, assign=True)
        if "lm_head.weight" not in state:
            model.lm_head.weight = model.embed_tokens.weight  # tied embeddings
        model.rotary = Rotary(spec.rope, device)
        return model.eval().requires_grad_(False)


_Part = Literal["heads", "kv_heads", "intermediate", "vocab"]


class _SliceReader:
    """Checkpoint tensors in the model's dtype, on its device: whole, or this rank's slice
    of them. One tensor at a time goes to the device, so a GPU model never has a whole
    host copy."""

    def __init__(
        self,
        tensors: TensorSource,
        dtype: torch.dtype,
        plan: ShardPlan | None,
        device: torch.device | str | None = None,
    ):
        self.tensors, self.dtype, self.plan, self.device = tensors, dtype, plan, device

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def whole(self, name: str) -> torch.Tensor:
        """Replicated on every rank (norms)."""
        return self.tensors.get(name).to(device=self.device, dtype=self.dtype)

    def rows(self, name: str, part: _Part, unit: int = 1) -> torch.Tensor:
        """Column-parallel: this rank's output rows, its `part` of them (`ShardPlan`'s
        field: heads, kv_heads, intermediate, vocab) in units of `unit` rows."""
        return self._slice(name, 0, part, unit)

    def columns(self, name: str, part: _Part, unit: int = 1) -> torch.Tensor:
        """Row-parallel: this rank's input columns, as `rows`."""
        return self._slice(name, 1, part, unit)

    def _slice(self, name: str, dim: int, part: _Part, unit: int) -> torch.Tensor:
        if self.plan is None:
            return self.whole(name)
        from tgi.weights import read_slice

        start, stop = getattr(self.plan, part)
        part_tensor = read_slice(self.tensors, name, dim, start * unit, stop * unit)
        return part_tensor.to(device=self.device, dtype=self.dtype)

    def rank0_bias(self, name: str) -> torch.Tensor:
        """A row-parallel layer's bias: added once, after the sum, so rank 0 holds it."""
        bias = self.whole(name)
        return bias if self.plan is None or self.plan.rank == 0 else torch.zeros_like(bias)


def _fused_state(spec: LlamaSpec, reader: _SliceReader) -> dict[str, torch.Tensor]:
    """Map HF names onto this module's, concatenating q/k/v and gate/up (this rank's
    slices of each when sharded; see tgi.parallel.sharding's NOTE)."""
    d = spec.head_dim
    state = {
        "embed_tokens.weight": reader.rows("model.embed_tokens.weight", "vocab"),
        "norm.weight": reader.whole("model.norm.weight"),
    }
    if not spec.tie_word_embeddings and "lm_head.weight" in reader:
        state["lm_head.weight"] = reader.rows("lm_head.weight", "vocab")

    def qkv(hf: str, suffix: str) -> torch.Tensor:
        return torch.cat(
            [
                reader.rows(f"{hf}self_attn.q_proj.{suffix}", "heads", d),
                reader.rows(f"{hf}self_attn.k_proj.{suffix}", "kv_heads", d),
                reader.rows(f"{hf}self_attn.v_proj.{suffix}", "kv_heads", d),
            ]
        )

    def gate_up(hf: str, suffix: str) -> torch.Tensor:
        return torch.cat(
            [
                reader.rows(f"{hf}mlp.gate_proj.{suffix}", "intermediate"),
                reader.rows(f"{hf}mlp.up_proj.{suffix}", "intermediate"),
            ]
        )

    for i in range(spec.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers.{i}."
        state[ours + "qkv_proj.weight"] = qkv(hf, "weight")
        if spec.qkv_bias:
            state[ours + "qkv_proj.bias"] = qkv(hf, "bias")
        state[ours + "o_proj.weight"] = reader.columns(f"{hf}self_attn.o_proj.weight", "heads", d)
        if spec.o_bias:
            state[ours + "o_proj.bias"] = reader.rank0_bias(f"{hf}self_attn.o_proj.bias")
        state[ours + "gate_up_proj.weight"] = gate_up(hf, "weight")
        down = reader.columns(f"{hf}mlp.down_proj.weight", "intermediate")
        state[ours + "down_proj.weight"] = down
        if spec.mlp_bias:
            state[ours + "gate_up_proj.bias"] = gate_up(hf, "bias")
            state[ours + "down_proj.bias"] = reader.rank0_bias(f"{hf}mlp.down_proj.bias")
        for norm in ("input_layernorm", "post_attention_layernorm"):
            state[f"{ours}{norm}.weight"] = reader.whole(f"{hf}{norm}.weight")
    return state


def load_llama(
    path: Path | Any,
    dtype: torch.dtype = torch.float32,
    *,
    group: ShardGroup | None = None,
    quantize: str | None = None,
    device: torch.device | str | None = None,
) -> LlamaForCausalLM:
    """Load a Llama-family checkpoint: a model dir, a `ModelFiles`, or a `.gguf` file.

    With `group` of more than one rank, load this rank's shard; ConfigError (before any
    tensor is read) when the model does not split over that many ranks. `device`: where
    the weights go, one tensor at a time (None: the CPU).
    """
    from tgi.weights import open_checkpoint

    config, tensors = open_checkpoint(path)
    spec = LlamaSpec.from_hf(config)
    if group is None or group.world_size == 1:
        return LlamaForCausalLM.from_tensors(spec, tensors, dtype, device=device)
    from tgi.parallel.sharding import check_shardable, plan_shard

    check_shardable(spec, group.world_size, quantize=quantize)
    plan = plan_shard(spec, group.rank, group.world_size)
    return LlamaForCausalLM.from_tensors(spec, tensors, dtype, (plan, group), device)


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
