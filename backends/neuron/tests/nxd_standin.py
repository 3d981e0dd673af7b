"""A stand-in for Neuron hardware under optimum-neuron 0.4.5's own Python code.

Tests of tgi's real executor need optimum-neuron's behaviour (how `forward` routes a call
to the context or the decode graph, how its wrappers pad rows and batches, where its KV
manager writes each row), and that behaviour lives in optimum-neuron's Python. So only
what needs a Neuron device is replaced here, as low as it goes:

- the Neuron-only packages (neuronx_distributed, torch_neuronx, torch_xla, ...) are
  stubbed at import, except the few calls the CPU path makes, which are made real
  (`_REAL_ATTRS`): integer `divide`, the head padding count, a tp=1 gather, and
  `@xla_hlo_call`, whose HLO builders (`DynamicUpdateSlice`, `Rng`) run eagerly here
  with XLA's semantics;
- the compiled `model.pt` (NxD's traced executor) is `_TracedModel`: it routes a call by
  the exact shapes of its inputs, as NxD's router does, to a `_CompiledGraph` that
  refuses any other shape or dtype and runs optimum-neuron's real
  `NxDDecoderModelForCausalLM.forward` (the Python that was traced), with its real
  `KVCacheManager` as the device KV state and its real `Sampler` (on the CPU);
- the decoder layers are small Llama layers (`_LlamaLayer`) over a transformers model's
  weights, with NeuronAttentionBase's contract and math.

Everything above (`NxDModelForCausalLM.forward`, the `NxDDecoderWrapperForCausalLM`
wrappers, the config) is optimum-neuron's code, imported from a `pip --no-deps
--target` copy (`make test-compat` installs it into `.venv-tf457/optimum-neuron`) under
transformers 4.57.x, the version it pins. Elsewhere the tests using it skip; with
TGI_REQUIRE_OPTIMUM_NEURON=1 (set by `make test-compat`) they fail instead.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn
from unittest import mock

import pytest
import torch
from torch import nn

__all__ = [
    "OPTIMUM_NEURON_VERSION",
    "CompiledGraphError",
    "GraphCall",
    "OptimumNeuron",
    "StandInNeuronModel",
    "import_optimum_neuron",
    "tiny_llama",
    "vendored_optimum_neuron",
]

OPTIMUM_NEURON_VERSION = "0.4.5"
REQUIRE_ENV = "TGI_REQUIRE_OPTIMUM_NEURON"
SRC_ENV = "TGI_OPTIMUM_NEURON_SRC"
REPO = Path(__file__).resolve().parents[3]
DEFAULT_SRC = REPO / ".venv-tf457" / "optimum-neuron"

# Packages that exist only on a Neuron host; stubbed while optimum-neuron is imported.
STUBBED = ("neuronx_distributed", "torch_neuronx", "libneuronxla", "neuronxcc", "torch_xla")

_BACKEND = "optimum.neuron.models.inference.backend"
_MODULES = {
    "modeling_decoder": f"{_BACKEND}.modules.decoder.modeling_decoder",
    "decoder_wrappers": f"{_BACKEND}.modules.decoder.decoder_wrappers",
    "kv_cache_manager": f"{_BACKEND}.modules.kvcache.kv_cache_manager",
    "sampling": f"{_BACKEND}.modules.generation.sampling",
    "attention_utils": f"{_BACKEND}.modules.attention.utils",
    "backend_config": f"{_BACKEND}.config",
    "modeling_llama": "optimum.neuron.models.inference.llama.modeling_llama",
}


# -- the stubs, and what in them is made real ---------------------------------------------


def _divide(numerator: int, denominator: int) -> int:
    """neuronx_distributed's `divide`: exact integer division (it asserts divisibility)."""
    if numerator % denominator:
        raise AssertionError(f"{numerator} is not divisible by {denominator}")
    return numerator // denominator


def _number_of_extra_heads(n_head: int, tp_degree: int) -> int:
    """neuronx_distributed's head padding count: heads to add to shard over tp_degree."""
    return 0 if n_head % tp_degree == 0 else tp_degree - n_head % tp_degree


def _gather_along_dim(x: torch.Tensor, partition_dim: int, *args: Any, **kwargs: Any) -> Any:
    """The tp gather of the logits: one rank (tp_degree=1) holds them all already."""
    return x


class _HloType:
    """An element type of the HLO scribe (`scribe.u32`, `tensor.dtype`)."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype

    def Constant(self, constant_value: Any) -> _HloValue:
        return _HloValue(torch.tensor(constant_value, dtype=self.dtype))

    def __getitem__(self, shape: Sequence[int]) -> _HloOp:
        return _HloOp(self.dtype, tuple(shape))


class _Scribe:
    """The scribe's typed constructors; unsigned types held in a wider signed dtype."""

    _TYPES = {
        "pred": torch.bool,
        "s8": torch.int8,
        "u8": torch.uint8,
        "s16": torch.int16,
        "s32": torch.int32,
        "u32": torch.int64,
        "s64": torch.int64,
        "u64": torch.int64,
        "f16": torch.float16,
        "bf16": torch.bfloat16,
        "f32": torch.float32,
        "f64": torch.float64,
    }

    def __getattr__(self, name: str) -> _HloType:
        try:
            return _HloType(self._TYPES[name])
        except KeyError:
            raise AttributeError(name) from None


class _HloValue:
    """A tensor as `@xla_hlo_call` builder functions see their operands."""

    def __init__(self, value: torch.Tensor) -> None:
        self.value = value
        self.dtype = _HloType(value.dtype)
        self.sizes = tuple(value.shape)
        self.scribe = _Scribe()


class _HloOp:
    """The HLO ops optimum-neuron's CPU path builds, run eagerly with XLA's semantics."""

    RNG_UNIFORM = 1

    def __init__(self, dtype: torch.dtype, shape: tuple[int, ...]) -> None:
        self.dtype = dtype
        self.shape = shape

    def DynamicUpdateSlice(
        self, operand: _HloValue, update: _HloValue, *start_indices: _HloValue
    ) -> _HloValue:
        """XLA clamps each start index so that the update fits inside the operand."""
        out = operand.value.clone()
        window = []
        for start, size, length in zip(start_indices, out.shape, update.value.shape, strict=True):
            begin = min(max(int(start.value), 0), size - length)
            window.append(slice(begin, begin + length))
        out[tuple(window)] = update.value.to(out.dtype)
        return _HloValue(out)

    def Rng(self, minimum: _HloValue, maximum: _HloValue, distribution: int) -> _HloValue:
        if distribution != self.RNG_UNIFORM:
            raise NotImplementedError(f"Rng distribution {distribution}")
        low, high = minimum.value, maximum.value
        return _HloValue(torch.rand(self.shape, dtype=self.dtype) * (high - low) + low)


def _xla_hlo_call(builder: Callable[..., _HloValue]) -> Callable[..., torch.Tensor]:
    """torch_neuronx's `@xla_hlo_call`: the builder's HLO, run on the CPU tensors."""

    @functools.wraps(builder)
    def run(*args: Any) -> torch.Tensor:
        wrapped = [_HloValue(a) if isinstance(a, torch.Tensor) else a for a in args]
        return builder(*wrapped).value

    return run


# stub module -> attributes that behave as the real ones do on the CPU path
_REAL_ATTRS: dict[str, dict[str, Any]] = {
    "neuronx_distributed.parallel_layers.utils": {"divide": _divide},
    "neuronx_distributed.parallel_layers.pad": {
        "get_number_of_extra_heads": _number_of_extra_heads
    },
    "neuronx_distributed.parallel_layers.mappings": {"_gather_along_dim": _gather_along_dim},
    "torch_neuronx.xla_impl.ops": {"xla_hlo_call": _xla_hlo_call},
}


def _importer_is_stubbed() -> bool:
    """Whether the code importing is optimum's (or the stubs'): other packages imported
    meanwhile (accelerate probes `import torch_xla` and caches the answer) must keep
    seeing none of the Neuron packages."""
    frame = sys._getframe(1)
    while frame is not None:
        name = frame.f_globals.get("__name__", "")
        if not name.startswith("importlib") and name != __name__:
            return name.split(".")[0] in ("optimum", *STUBBED)
        frame = frame.f_back  # type: ignore[assignment]
    return False


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports every module of STUBBED as a MagicMock, with `_REAL_ATTRS` set on it."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname.split(".")[0] in STUBBED and _importer_is_stubbed():
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> Any:
        module = mock.MagicMock(name=spec.name)
        module.__path__ = []
        module.__spec__ = spec
        return module

    def exec_module(self, module: Any) -> None:
        name = module.__spec__.name
        for attr, value in _REAL_ATTRS.get(name, {}).items():
            setattr(module, attr, value)
        # `from package import submodule` reads an attribute, which a MagicMock would
        # invent: import the submodules that carry real attributes first.
        for child in _REAL_ATTRS:
            parent, _, attr = child.rpartition(".")
            if parent == name:
                setattr(module, attr, importlib.import_module(child))


# -- importing optimum-neuron -------------------------------------------------------------


@dataclass(frozen=True)
class OptimumNeuron:
    """The optimum-neuron modules the stand-in runs (imported once, stubs included)."""

    version: str
    modeling_decoder: ModuleType
    decoder_wrappers: ModuleType
    kv_cache_manager: ModuleType
    sampling: ModuleType
    attention_utils: ModuleType
    backend_config: ModuleType
    modeling_llama: ModuleType

    @property
    def NxDNeuronConfig(self) -> Any:
        return self.backend_config.NxDNeuronConfig

    def prepare_sampling_params(self, batch_size: int, **params: Any) -> torch.Tensor:
        """optimum-neuron's [batch_size, 3] (top_k, top_p, temperature); greedy by default."""
        return self.sampling.prepare_sampling_params(batch_size, **params)


def _unavailable(reason: str) -> NoReturn:
    """Skip, or fail where the run requires optimum-neuron (TGI_REQUIRE_OPTIMUM_NEURON=1)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_ENV}=1)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def vendored_optimum_neuron() -> Path:
    """The vendored optimum-neuron's directory, to read its source as text (no import,
    so any transformers will do); skips or fails as `import_optimum_neuron` does."""
    src = Path(os.environ.get(SRC_ENV) or DEFAULT_SRC)
    if not (src / "optimum" / "neuron").is_dir():
        _unavailable(f"no optimum-neuron at {src} (`make test-compat` installs it; {SRC_ENV})")
    return src


def import_optimum_neuron() -> OptimumNeuron:
    """optimum-neuron's modules, imported from TGI_OPTIMUM_NEURON_SRC (default
    `<repo>/.venv-tf457/optimum-neuron`); skips (or fails, see `_unavailable`) where that
    copy or transformers 4.57.x is missing. The import leaves sys.path, sys.meta_path and
    sys.modules as they were (no `optimum`, no stubs), so other tests see no trace of it."""
    import transformers

    src = Path(os.environ.get(SRC_ENV) or DEFAULT_SRC)
    if not transformers.__version__.startswith("4.57."):
        _unavailable(
            f"optimum-neuron {OPTIMUM_NEURON_VERSION} needs transformers 4.57.x, "
            f"not {transformers.__version__} (run under .venv-tf457)"
        )
    if not (src / "optimum" / "neuron").is_dir():
        _unavailable(f"no optimum-neuron at {src} (`make test-compat` installs it; {SRC_ENV})")
    versions = {
        dist.metadata["Name"]: dist.version
        for dist in importlib.metadata.distributions(path=[str(src)])
    }
    if versions.get("optimum-neuron") != OPTIMUM_NEURON_VERSION:
        _unavailable(
            f"optimum-neuron {versions.get('optimum-neuron')} at {src}, "
            f"not {OPTIMUM_NEURON_VERSION}"
        )
    return _import_isolated(str(src))


@functools.cache
def _import_isolated(src: str) -> OptimumNeuron:
    """Import once with the stubs; undo every global change but the modules' own state."""
    import transformers  # noqa: F401 (before the stubs: its availability checks stay honest)

    def ours(name: str) -> bool:
        return name.split(".")[0] in ("optimum", *STUBBED)

    saved_path, saved_meta = list(sys.path), list(sys.meta_path)
    saved_env = os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE")
    shadowed = {name: module for name, module in sys.modules.items() if ours(name)}
    for name in shadowed:
        del sys.modules[name]
    before = set(sys.modules)
    try:
        sys.path.insert(0, src)
        sys.meta_path.insert(0, _StubFinder())
        # optimum.neuron's __init__ warns (and logs an error) that this host has no Neuron
        # device, and sets NEURON_PLATFORM_TARGET_OVERRIDE: expected here, and undone.
        with warnings.catch_warnings(), _logging_disabled():
            warnings.simplefilter("ignore")
            modules = {key: importlib.import_module(name) for key, name in _MODULES.items()}
    finally:
        sys.path[:] = saved_path
        sys.meta_path[:] = saved_meta
        sys.path_importer_cache.pop(src, None)
        for name in set(sys.modules) - before:
            module_file = getattr(sys.modules[name], "__file__", None) or ""
            if ours(name) or module_file.startswith(src):
                del sys.modules[name]
        sys.modules.update(shadowed)
        if saved_env is None:
            os.environ.pop("NEURON_PLATFORM_TARGET_OVERRIDE", None)
        else:
            os.environ["NEURON_PLATFORM_TARGET_OVERRIDE"] = saved_env
    return OptimumNeuron(version=OPTIMUM_NEURON_VERSION, **modules)


@contextlib.contextmanager
def _logging_disabled() -> Iterator[None]:
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        yield
    finally:
        logging.disable(previous)


# -- the tiny model -----------------------------------------------------------------------


def tiny_llama(seed: int = 0, **config: Any) -> Any:
    """A random float32 LlamaForCausalLM small enough for millisecond steps: 2 layers,
    hidden 32, vocab 128, 4 heads over 2 KV heads (GQA), no EOS (generate never stops
    early), eager attention (the reference the stand-in's KV is compared with)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    values: dict[str, Any] = {
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 128,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": 0,
        "attn_implementation": "eager",
        **config,
    }
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**values)).float().eval()


# -- the compiled graphs ------------------------------------------------------------------


class CompiledGraphError(RuntimeError):
    """Inputs a compiled Neuron graph refuses (a shape or dtype it was not traced with)."""


@dataclass(frozen=True)
class GraphCall:
    """One call that reached a compiled graph, inputs as the graph got them."""

    tag: str
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    seq_ids: torch.Tensor
    sampling_params: torch.Tensor


class _LlamaLayer(nn.Module):
    """A Llama decoder layer over a transformers layer's weights, with the contract
    `NxDDecoderModelForCausalLM.forward` calls its layers with and NeuronAttentionBase's
    math: context encoding attends the step's own tokens under the given causal mask;
    decoding attends the cached keys under the mask [b, 1, 1, L] plus the active token.
    Returns (hidden, (new_k, new_v) post-RoPE [b, kv_heads, s, d], cos, sin)."""

    def __init__(self, hf_layer: nn.Module, rotary_emb: nn.Module, utils: ModuleType) -> None:
        super().__init__()
        attn: Any = hf_layer.self_attn
        if getattr(attn, "q_norm", None) is not None or getattr(attn, "sliding_window", None):
            raise NotImplementedError("only plain Llama attention is stood in for")
        self.hf_layer = hf_layer
        self.rotary_emb = rotary_emb
        self.utils = utils  # optimum-neuron's attention helpers (repeat_kv, rope, softmax)
        self.head_dim = int(attn.head_dim)
        self.num_heads = attn.config.num_attention_heads
        self.num_kv_heads = attn.config.num_key_value_heads
        self.scaling = float(attn.scaling)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        past_key_value: Sequence[torch.Tensor] | None = None,
        active_mask: torch.Tensor | None = None,
        cos_cache: torch.Tensor | None = None,
        sin_cache: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor], torch.Tensor, torch.Tensor]:
        layer: Any = self.hf_layer
        attn, utils = layer.self_attn, self.utils
        assert attention_mask is not None and position_ids is not None
        if active_mask is not None:
            raise NotImplementedError("speculation is not stood in for")
        bsz, q_len, _ = hidden_states.shape
        x = layer.input_layernorm(hidden_states)
        q = attn.q_proj(x).view(bsz, q_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = attn.k_proj(x).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = attn.v_proj(x).view(bsz, q_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        if cos_cache is None or sin_cache is None:
            cos_cache, sin_cache = self.rotary_emb(v, position_ids)
        q, k = utils.apply_rotary_pos_emb(q, k, cos_cache, sin_cache)
        groups = self.num_heads // self.num_kv_heads
        lowest = torch.finfo(q.dtype).min
        if past_key_value is None:  # context encoding: the step's tokens only
            scores = q @ utils.repeat_kv(k, groups).transpose(2, 3) * self.scaling
            scores = torch.where(attention_mask[:, :, :q_len, :q_len], scores, lowest)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out = probs @ utils.repeat_kv(v, groups)
        else:  # decoding: the cache (masked) and the active token
            k_prior = utils.repeat_kv(past_key_value[0], groups)
            v_prior = utils.repeat_kv(past_key_value[1], groups)
            prior = torch.where(attention_mask, q @ k_prior.transpose(2, 3) * self.scaling, lowest)
            active = q @ utils.repeat_kv(k, groups).transpose(2, 3) * self.scaling
            p_prior, p_active = utils.manual_softmax(prior.float(), active.float())
            out = p_prior.to(q.dtype) @ v_prior + p_active.to(q.dtype) @ utils.repeat_kv(v, groups)
        out = attn.o_proj(out.transpose(1, 2).reshape(bsz, q_len, self.num_heads * self.head_dim))
        hidden = hidden_states + out
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return hidden, (k, v), cos_cache, sin_cache


class _LmHead(nn.Module):
    """The lm_head as the traced forward reads it: outputs gathered (tp=1), no pad_size."""

    gather_output = True

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.linear(hidden_states)


class _CompiledGraph:
    """One compiled graph: fixed input shapes and dtypes, the traced Python as body.

    The body is optimum-neuron's `NxDDecoderModelForCausalLM.forward`, whose outputs are
    [res, (logits if output_logits), *updated KV]; the KV outputs are aliased to the
    device state (the KVCacheManager's parameters), so they are written back there and
    only the rest is returned, as NxD's executor does: the tensor itself when it is the
    only one, else the list."""

    def __init__(
        self, tag: str, module: nn.Module, batch_size: int, tokens: int, calls: list[GraphCall]
    ) -> None:
        self.tag = tag
        self.module = module
        self.batch_size = batch_size
        self.tokens = tokens
        self._calls = calls
        self._num_outputs = 2 if module.neuron_config.output_logits else 1

    @property
    def input_shapes(self) -> list[list[int]]:
        """input_ids, position_ids, seq_ids, sampling_params, as traced."""
        b, t = self.batch_size, self.tokens
        return [[b, t], [b, t], [b], [b, 3]]

    def check(self, inputs: Sequence[Any]) -> None:
        """Raise CompiledGraphError unless the inputs are exactly what was traced."""
        if len(inputs) != 4 or not all(isinstance(t, torch.Tensor) for t in inputs):
            raise CompiledGraphError(f"{self.tag}: expects 4 tensors, got {inputs!r}")
        shapes = [list(t.shape) for t in inputs]
        if shapes != self.input_shapes:
            raise CompiledGraphError(
                f"{self.tag}: compiled for input shapes {self.input_shapes}, got {shapes}"
            )
        dtypes = [t.dtype for t in inputs]
        expected = [torch.int32, torch.int32, torch.int32, torch.float32]
        if dtypes != expected:
            raise CompiledGraphError(f"{self.tag}: compiled for dtypes {expected}, got {dtypes}")

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        self.check(inputs)
        self._calls.append(GraphCall(self.tag, *(t.clone() for t in inputs)))
        with torch.no_grad():
            outputs = self.module(*inputs)
            results, states = outputs[: self._num_outputs], outputs[self._num_outputs :]
            cache = self.module.kv_mgr.past_key_values
            assert len(states) == len(cache)
            for param, state in zip(cache, states, strict=True):
                param.copy_(state)
        return results[0] if len(results) == 1 else list(results)


class _TracedModel:
    """The loaded `model.pt` (NxD's executor): one object for every graph, which routes
    each call by the exact shapes of its inputs, as NxD's router does; a call that
    matches no graph's shapes is refused."""

    def __init__(self, graphs: Sequence[_CompiledGraph], calls: list[GraphCall]) -> None:
        self.graphs = {graph.tag: graph for graph in graphs}
        self.calls = calls

    def __call__(self, *inputs: Any) -> torch.Tensor | list[torch.Tensor]:
        shapes = [list(t.shape) if isinstance(t, torch.Tensor) else t for t in inputs]
        for graph in self.graphs.values():
            if graph.input_shapes == shapes:
                return graph(*inputs)
        compiled = {tag: g.input_shapes for tag, g in self.graphs.items()}
        raise CompiledGraphError(f"no compiled graph for input shapes {shapes}: {compiled}")


def _build_graphs(
    on: OptimumNeuron, hf_model: Any, config: Any, neuron_config: Any
) -> _TracedModel:
    """The context and token generation graphs, as optimum-neuron's graph builders
    shape them, over one copy of the weights and one KVCacheManager."""
    md = on.modeling_decoder
    base = copy.deepcopy(hf_model)  # the graphs' own weights: hf_model stays the reference
    rotary = base.model.rotary_emb
    layers = nn.ModuleList(
        _LlamaLayer(layer, rotary, on.attention_utils) for layer in base.model.layers
    )
    lm_head = _LmHead(base.lm_head)
    dtype = neuron_config.torch_dtype
    calls: list[GraphCall] = []
    graphs, kv_mgr = [], None
    specs = [
        (
            "context_encoding_model",
            md.NxDModelForCausalLM._create_context_encoding_config(neuron_config),
            neuron_config.max_context_length,  # tokens per row, and n_positions
        ),
        (
            "token_generation_model",
            md.NxDModelForCausalLM._create_token_generation_config(neuron_config),
            1,
        ),
    ]
    for tag, graph_config, tokens in specs:
        module = md.NxDDecoderModelForCausalLM(config, graph_config)
        # DecoderModelInstanceForCausalLM.load_module: n_positions = the graph's max_tokens
        module.n_positions = tokens if tokens > 1 else graph_config.sequence_length
        module.embed_tokens = base.model.embed_tokens
        module.layers = layers
        module.norm = base.model.norm
        module.lm_head = lm_head
        if kv_mgr is None:
            kv_mgr = module.kv_mgr
        module.kv_mgr = kv_mgr  # both graphs alias the same device KV state
        if graph_config.on_device_sampling:
            module.sampler = on.sampling.Sampler(graph_config, do_sample=True, on_cpu=True)
        if dtype != torch.float32:  # as load_module casts the float model
            module._apply(lambda t: t.to(dtype) if t.is_floating_point() else t)
        module.eval()
        graphs.append(_CompiledGraph(tag, module, graph_config.batch_size, tokens, calls))
    return _TracedModel(graphs, calls)


# -- the loaded model ---------------------------------------------------------------------


class StandInNeuronModel:
    """What `NeuronModelForCausalLM.from_pretrained(exported_dir)` returns on a Neuron
    host, for a Llama export: a real optimum-neuron `LlamaNxDModelForCausalLM` (an
    instance of a subclass of it and of this class), whose traced model is
    `_TracedModel`. Its `forward`, wrappers and config are optimum-neuron's own.

    neuron_kwargs are NxDNeuronConfig's (batch_size, sequence_length, max_context_length,
    continuous_batching, on_device_sampling, max_topk, output_logits, torch_dtype...);
    tp_degree is 1, torch_dtype float32 unless given, max_topk at most the vocabulary."""

    hf_model: Any
    traced_model: _TracedModel
    optimum_neuron: OptimumNeuron

    def __new__(cls, hf_model: Any, **neuron_kwargs: Any) -> StandInNeuronModel:
        if cls is StandInNeuronModel:
            cls = _loaded_model_class(import_optimum_neuron())
        return super().__new__(cls)

    def __init__(self, hf_model: Any, **neuron_kwargs: Any) -> None:
        on = import_optimum_neuron()
        config = copy.deepcopy(hf_model.config)  # the wrappers set pad_token_id on theirs
        if config.model_type != "llama":
            raise ValueError(f"a Llama model is stood in for, not {config.model_type!r}")
        if neuron_kwargs.pop("tp_degree", 1) != 1:
            raise ValueError("the stand-in runs one rank: tp_degree=1")
        if neuron_kwargs.get("speculation_length", 0):
            raise ValueError("speculation is not stood in for")
        neuron_kwargs.setdefault("torch_dtype", torch.float32)
        neuron_kwargs.setdefault("max_topk", min(256, config.vocab_size))
        if (
            neuron_kwargs.get("on_device_sampling")
            and neuron_kwargs["max_topk"] > config.vocab_size
        ):
            raise ValueError("max_topk exceeds the vocabulary (the CPU sampler's topk)")
        neuron_config = on.NxDNeuronConfig(tp_degree=1, **neuron_kwargs)
        traced_model = _build_graphs(on, hf_model, config, neuron_config)
        super().__init__(config, neuron_config, traced_model, {})  # type: ignore[call-arg]
        self.hf_model = hf_model
        self.traced_model = traced_model
        self.optimum_neuron = on

    @property
    def kv_mgr(self) -> Any:
        """The real KVCacheManager both graphs share: its parameters are the device KV."""
        graph = self.traced_model.graphs["token_generation_model"]
        return graph.module.kv_mgr

    @property
    def graph_calls(self) -> list[GraphCall]:
        """Every call that reached a compiled graph, in order."""
        return self.traced_model.calls

    def kv(self, slot: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The device KV of one cache line: per layer (k, v), each [kv_heads, L, d]."""
        cache = self.kv_mgr.past_key_values
        return [
            (cache[i][slot].detach().clone(), cache[i + 1][slot].detach().clone())
            for i in range(0, len(cache), 2)
        ]

    def reference_kv(self, token_ids: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """transformers' KV for token_ids at positions [0, n): per layer (k, v) [kv_heads,
        n, d], to compare with `kv(slot)[layer][..., :n, :]`."""
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long)
        with torch.no_grad():
            cache = self.hf_model(input_ids=input_ids, use_cache=True).past_key_values
        return [(layer.keys[0].clone(), layer.values[0].clone()) for layer in cache.layers]


@functools.cache
def _loaded_model_class(on: OptimumNeuron) -> type:
    """StandInNeuronModel's helpers over optimum-neuron's real loaded-model class."""
    real = on.modeling_llama.LlamaNxDModelForCausalLM
    return type("StandInNeuronModel", (StandInNeuronModel, real), {"__module__": __name__})
