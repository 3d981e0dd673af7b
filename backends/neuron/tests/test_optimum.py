"""The real executor's code path, against a stand-in for optimum-neuron (no SDK here).

`FakeNeuronModel` answers the calls `OptimumNeuronModel` makes of
`NeuronModelForCausalLM` (`from_pretrained`, `prepare_inputs_for_prefill/decode`,
`__call__`) the way the real one interprets them: positions from the attention mask,
KV addressed by `seq_ids`. Its "model" is the fake backend's computable one, so the
expected tokens are known; what these tests check is the padding, masks, slots and
export parameters the real path sends.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_neuron._compiled import CompiledShape
from tgi_backend_neuron._optimum import OptimumNeuronModel, export_kwargs
from tgi_backend_neuron._options import NeuronOptions
from tgi_backend_neuron._plan import NeuronPlan
from tgi_backend_neuron.backend import NeuronBackend
from tgi_backend_neuron.plugin import create_backend

from tgi.backend.contract import Limits
from tgi.config import resolve_config
from tgi.errors import BackendError
from tgi.models.source import ModelFiles, ModelKind
from tgi.testing.fake_backend import expected_tokens as fake_expected_tokens

from .conftest import Steps

VOCAB = 64
PAD = 0


def expected_tokens(prompt: Sequence[int], num_tokens: int) -> list[int]:
    """What `FakeNeuronModel` generates greedily: `FakeBackend`'s model at VOCAB."""
    return fake_expected_tokens(prompt, num_tokens, VOCAB)


@dataclass
class FakeNeuronConfig:
    batch_size: int = 4
    sequence_length: int = 32
    continuous_batching: bool = True
    max_context_length: int = 16
    torch_dtype: torch.dtype = torch.bfloat16


class FakeNeuronModel:
    """Stands in for optimum.neuron.NeuronModelForCausalLM."""

    loads: list[tuple[str, dict[str, Any]]] = []
    next_config = FakeNeuronConfig()

    def __init__(self, neuron_config: FakeNeuronConfig) -> None:
        self.neuron_config = neuron_config
        self.config = types.SimpleNamespace(
            vocab_size=VOCAB,
            num_attention_heads=4,
            num_key_value_heads=2,
            hidden_size=32,
            num_hidden_layers=2,
        )
        self.kv: dict[int, list[int]] = {}  # slot -> tokens held on the "device"
        self.calls: list[dict[str, torch.Tensor]] = []

    @classmethod
    def from_pretrained(cls, model_id: str, **kwargs: Any) -> FakeNeuronModel:
        cls.loads.append((model_id, kwargs))
        return cls(cls.next_config)

    @staticmethod
    def _inputs(input_ids: Any, mask: Any, seq_ids: Any, decode: bool) -> dict[str, Any]:
        position_ids = mask.long().cumsum(-1) - 1  # as optimum-neuron derives positions
        position_ids.masked_fill_(mask == 0, 1)
        if decode:
            position_ids = torch.amax(position_ids, 1, keepdim=True)
        return {
            "input_ids": input_ids,
            "position_ids": position_ids,
            "attention_mask": mask,
            "seq_ids": seq_ids,
            "sampling_params": None,
        }

    def prepare_inputs_for_prefill(
        self, input_ids: Any, attention_mask: Any = None, seq_ids: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self._inputs(input_ids, attention_mask, seq_ids, decode=False)

    def prepare_inputs_for_decode(
        self, input_ids: Any, attention_mask: Any = None, seq_ids: Any = None, **kwargs: Any
    ) -> dict[str, Any]:
        return self._inputs(input_ids, attention_mask, seq_ids, decode=True)

    def __call__(self, **inputs: Any) -> tuple[torch.Tensor]:
        self.calls.append(inputs)
        ids, mask, positions = inputs["input_ids"], inputs["attention_mask"], inputs["position_ids"]
        logits = torch.zeros(ids.shape[0], 1, VOCAB)
        for i, slot in enumerate(inputs["seq_ids"].tolist()):
            if ids.shape[1] == 1 and int(positions[i, 0]) > 0:  # decode: write at a position
                history = self.kv.setdefault(slot, [])
                del history[int(positions[i, 0]) :]  # a wrong position garbles the output
                history.append(int(ids[i, 0]))
            else:  # prefill: the unpadded tokens
                self.kv[slot] = [int(t) for t, m in zip(ids[i], mask[i], strict=True) if m]
            history = self.kv[slot]
            logits[i, 0, (sum(history) + len(history)) % VOCAB] = 10.0
        return (logits,)


@pytest.fixture
def fake_sdk(monkeypatch: pytest.MonkeyPatch) -> Iterator[type[FakeNeuronModel]]:
    """`optimum.neuron` importable, with FakeNeuronModel as NeuronModelForCausalLM."""
    optimum = types.ModuleType("optimum")
    neuron = types.ModuleType("optimum.neuron")
    neuron.NeuronModelForCausalLM = FakeNeuronModel  # type: ignore[attr-defined]
    optimum.neuron = neuron  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "optimum", optimum)
    monkeypatch.setitem(sys.modules, "optimum.neuron", neuron)
    FakeNeuronModel.loads = []
    FakeNeuronModel.next_config = FakeNeuronConfig()
    yield FakeNeuronModel


def plan(export: bool, **shape: Any) -> NeuronPlan:
    values: dict[str, Any] = {
        "batch_size": 4,
        "sequence_length": 32,
        "num_cores": 2,
        "auto_cast_type": "bfloat16",
        "continuous_batching": True,
        "max_context_length": 16,
        "path": None if export else Path("/exported"),
    }
    return NeuronPlan(NeuronOptions(), CompiledShape(**{**values, **shape}), export=export)


LIMITS = Limits(16, 32, 64, None, 4)
# Without continuous batching a rebuild row holds up to max_total_tokens - 1 tokens,
# and max_context_length is 16.
REBUILD_LIMITS = Limits(16, 17, 64, None, 4)


def test_export_parameters_are_optimum_neurons() -> None:
    assert export_kwargs(plan(export=True)) == {
        "batch_size": 4,
        "sequence_length": 32,
        "num_cores": 2,
        "auto_cast_type": "bf16",
    }
    assert export_kwargs(plan(export=True, num_cores=None, auto_cast_type=None)) == {
        "batch_size": 4,
        "sequence_length": 32,
    }


def test_a_plain_checkpoint_is_exported_an_exported_one_loaded(
    fake_sdk: type[FakeNeuronModel],
) -> None:
    OptimumNeuronModel.load(plan(export=True), Path("/ckpt"), pad_token_id=PAD)
    OptimumNeuronModel.load(plan(export=False), Path("/ckpt"), pad_token_id=PAD)
    assert fake_sdk.loads == [
        (
            "/ckpt",
            {
                "export": True,
                "batch_size": 4,
                "sequence_length": 32,
                "num_cores": 2,
                "auto_cast_type": "bf16",
            },
        ),
        ("/exported", {}),
    ]


def test_a_loaded_model_of_other_shapes_stops_start_up(fake_sdk: type[FakeNeuronModel]) -> None:
    fake_sdk.next_config = FakeNeuronConfig(batch_size=8)
    with pytest.raises(BackendError, match="runs batch_size=8, sequence_length=32, but start-up"):
        OptimumNeuronModel.load(plan(export=False), Path("/ckpt"), pad_token_id=PAD)


def run(
    backend: NeuronBackend, prompts: dict[int, tuple[int, ...]], steps: int
) -> dict[int, list[int]]:
    """Start `prompts` together in slots 0, 1, ..., then decode them together `steps` times."""
    slotted = {seq_id: (slot, prompt) for slot, (seq_id, prompt) in enumerate(prompts.items())}
    return Steps(backend).run(slotted, steps + 1)


PROMPTS = {1: (5, 6, 7), 2: (9,) * 7, 3: (1, 2)}


def test_rows_are_left_padded_with_masks_and_address_their_slots(
    fake_sdk: type[FakeNeuronModel],
) -> None:
    executor = OptimumNeuronModel(fake_sdk(FakeNeuronConfig()), pad_token_id=PAD)
    backend = NeuronBackend(executor, device_type="neuron")
    backend.warmup(LIMITS)
    tokens = run(backend, PROMPTS, steps=4)
    assert tokens == {s: expected_tokens(p, 5) for s, p in PROMPTS.items()}
    model = executor._model
    prefill = model.calls[1]  # calls[0] is warmup
    assert prefill["seq_ids"].tolist() == [0, 1, 2]
    assert prefill["input_ids"].tolist()[2] == [PAD] * 5 + [1, 2]
    assert prefill["attention_mask"].tolist()[0] == [0, 0, 0, 0, 1, 1, 1]
    decode = model.calls[2]
    assert decode["input_ids"].shape == (3, 1)
    assert decode["position_ids"].tolist() == [[3], [7], [2]]


def test_without_continuous_batching_every_call_runs_the_whole_batch(
    fake_sdk: type[FakeNeuronModel],
) -> None:
    config = FakeNeuronConfig(continuous_batching=False)
    executor = OptimumNeuronModel(fake_sdk(config), pad_token_id=PAD)
    backend = NeuronBackend(executor, device_type="neuron")
    assert backend.capabilities.prefill_rebuilds_cache
    backend.warmup(REBUILD_LIMITS)
    prompts = {1: (5, 6, 7), 2: (1, 2)}
    tokens = run(backend, prompts, steps=3)
    assert tokens == {s: expected_tokens(p, 4) for s, p in prompts.items()}
    model = executor._model
    assert [call["seq_ids"].tolist() for call in model.calls[1:3]] == [[0, 1, 2, 3]] * 2
    assert backend.kv_usage().seq_ids == frozenset({1, 2})


@pytest.mark.parametrize("continuous_batching", [True, False])
def test_a_row_joining_mid_stream_leaves_the_running_slots_intact(
    fake_sdk: type[FakeNeuronModel], continuous_batching: bool
) -> None:
    config = FakeNeuronConfig(continuous_batching=continuous_batching)
    executor = OptimumNeuronModel(fake_sdk(config), pad_token_id=PAD)
    backend = NeuronBackend(executor, device_type="neuron")
    backend.warmup(LIMITS if continuous_batching else REBUILD_LIMITS)
    model = executor._model
    steps = Steps(backend)
    steps.step({1: (2, (5, 6, 7))})
    steps.step()
    joined = len(model.calls)
    steps.step({2: (0, (1, 2))})  # one prefill call, then one decode call
    for _ in range(3):
        steps.step()
    assert steps.generated == {1: expected_tokens((5, 6, 7), 6), 2: expected_tokens((1, 2), 4)}
    prefill, decode = model.calls[joined : joined + 2]
    if continuous_batching:
        assert prefill["seq_ids"].tolist() == [0] and decode["seq_ids"].tolist() == [2]
        return
    # Rebuild: seq 1's slot is re-prefilled with the 4 tokens its KV held; its pending
    # token is decoded next, while slot 0 (just written) gets a dummy past its tokens.
    assert prefill["seq_ids"].tolist() == [0, 2, 1, 3]
    assert prefill["input_ids"].tolist()[1] == [5, 6, 7, expected_tokens((5, 6, 7), 1)[0]]
    assert prefill["input_ids"].tolist()[0] == [PAD, PAD, 1, 2]
    assert decode["seq_ids"].tolist() == [2, 0, 1, 3]
    assert decode["position_ids"].tolist()[:2] == [[4], [2]]  # slot 0: past its 2 tokens
    assert backend.rebuilt_rows == 1


def test_the_plugin_builds_the_real_backend_where_the_sdk_is(
    fake_sdk: type[FakeNeuronModel], tiny_model: Path
) -> None:
    config = resolve_config({"backend": "neuron"}, environ={"HF_BATCH_SIZE": "4"})
    config = config.with_values("test", max_total_tokens=32)
    files = ModelFiles("tiny", ModelKind.LOCAL_DIR, tiny_model, "LlamaForCausalLM", 512, None)
    backend = create_backend(config, files)
    assert isinstance(backend, NeuronBackend)
    assert backend.device_type == "neuron"
    assert backend.capabilities.static_batch_size == 4
    assert backend.dtype == torch.bfloat16
    assert fake_sdk.loads == [
        (str(tiny_model), {"export": True, "batch_size": 4, "sequence_length": 32})
    ]
