"""The stand-in for Neuron hardware (nxd_standin.py) under optimum-neuron's own code.

First that it computes what transformers computes (tokens and KV), then that it shows the
runtime's hazards, each asserted as what happens, so that tests of tgi's executor over
it can rely on them: the row-0 copy of a partial decode batch, left padding, cache lines
by row index without continuous batching, on-device sampling, static shapes.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from typing import Any
from unittest import mock

import pytest
import torch

from . import nxd_standin
from .nxd_standin import (
    CompiledGraphError,
    OptimumNeuron,
    StandInNeuronModel,
    import_optimum_neuron,
    tiny_llama,
)

ATOL = 1e-5
SEQUENCE_LENGTH = 16
MAX_CONTEXT = 8


@pytest.fixture(scope="module")
def on() -> OptimumNeuron:
    return import_optimum_neuron()


@pytest.fixture(scope="module")
def hf_model(on: OptimumNeuron) -> Any:
    return tiny_llama(seed=0)


def standin(hf_model: Any, **neuron: Any) -> StandInNeuronModel:
    values = {"sequence_length": SEQUENCE_LENGTH, "max_context_length": MAX_CONTEXT, **neuron}
    return StandInNeuronModel(hf_model, **values)


def ids(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    return torch.tensor([list(row) for row in rows], dtype=torch.long)


def context(
    model: Any, on: OptimumNeuron, rows: Sequence[Sequence[int]], seq_ids: Sequence[int]
) -> Any:
    """One context call: equal-length rows at positions [0, n), greedy sampling params."""
    positions = torch.arange(len(rows[0])).expand(len(rows), -1)
    return model.forward(
        ids(rows), positions, torch.tensor(seq_ids), on.prepare_sampling_params(len(rows))
    )


def decode(
    model: Any,
    on: OptimumNeuron,
    tokens: Sequence[int],
    positions: Sequence[int],
    seq_ids: Sequence[int],
) -> Any:
    """One decode call: one token per row at the given positions."""
    return model.forward(
        ids([[t] for t in tokens]),
        ids([[p] for p in positions]),
        torch.tensor(seq_ids),
        on.prepare_sampling_params(len(tokens)),
    )


def assert_kv_close(
    actual: list[tuple[torch.Tensor, torch.Tensor]],
    expected: list[tuple[torch.Tensor, torch.Tensor]],
    positions: slice | list[int],
) -> None:
    assert len(actual) == len(expected)
    for (k, v), (ref_k, ref_v) in zip(actual, expected, strict=True):
        torch.testing.assert_close(k[:, positions], ref_k[:, positions], atol=ATOL, rtol=0)
        torch.testing.assert_close(v[:, positions], ref_v[:, positions], atol=ATOL, rtol=0)


def last_logits(hf_model: Any, tokens: Sequence[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf_model(input_ids=ids([tokens])).logits[0, -1]


# -- the import ---------------------------------------------------------------------------


def test_import_leaves_no_trace(on: OptimumNeuron) -> None:
    """Importing under the stubs changes nothing global: other tests see no optimum."""
    assert on.version == "0.4.5"
    src = os.environ.get(nxd_standin.SRC_ENV) or str(nxd_standin.DEFAULT_SRC)
    path, meta_path, environ = list(sys.path), list(sys.meta_path), dict(os.environ)
    fresh = nxd_standin._import_isolated.__wrapped__(src)  # uncached: a second import
    assert fresh.modeling_decoder is not on.modeling_decoder
    assert (sys.path, sys.meta_path, dict(os.environ)) == (path, meta_path, environ)
    stubbed = ("optimum", *nxd_standin.STUBBED)
    assert not [name for name in sys.modules if name.split(".")[0] in stubbed]
    assert importlib.util.find_spec("torch_neuronx") is None
    # no module imported meanwhile kept a stub (accelerate caches `import torch_xla`)
    with warnings.catch_warnings():  # isinstance on deprecated torch aliases warns
        warnings.simplefilter("ignore")
        held = [
            (name, attr)
            for name, module in list(sys.modules.items())
            for attr, value in list(getattr(module, "__dict__", {}).items())
            if isinstance(value, mock.NonCallableMock)
            and value._extract_mock_name().split(".")[0] in nxd_standin.STUBBED
        ]
    assert held == []
    accelerate_imports: Any = sys.modules.get("accelerate.utils.imports")
    assert accelerate_imports is None or not accelerate_imports.is_torch_xla_available()


def test_the_model_is_optimum_neurons_own(on: OptimumNeuron, hf_model: Any) -> None:
    model = standin(hf_model, batch_size=2, continuous_batching=True)
    md = on.modeling_decoder
    assert isinstance(model, md.NxDModelForCausalLM)
    assert isinstance(model, StandInNeuronModel)
    assert type(model).forward is md.NxDModelForCausalLM.forward
    assert isinstance(model.neuron_config, on.NxDNeuronConfig)
    assert isinstance(
        model.context_encoding_model, on.decoder_wrappers.NxDDecoderWrapperForCausalLM
    )
    assert model.context_encoding_model.neuron_config.batch_size == 1  # ctx_batch_size with CB
    assert model.token_generation_model.neuron_config.batch_size == 2
    assert model.context_encoding_model.model is model.token_generation_model.model
    assert isinstance(model.kv_mgr, on.kv_cache_manager.KVCacheManager)


# -- what it computes ---------------------------------------------------------------------


def test_single_sequence_matches_transformers(on: OptimumNeuron, hf_model: Any) -> None:
    model = standin(hf_model, batch_size=1)
    prompt, new_tokens = [5, 17, 42, 99, 7], 8
    out = context(model, on, [prompt], [0])
    assert out.shape == (1, 1, hf_model.config.vocab_size)
    torch.testing.assert_close(out[0, -1], last_logits(hf_model, prompt), atol=ATOL, rtol=0)
    tokens = [*prompt, int(out[0, -1].argmax())]
    for position in range(len(prompt), len(prompt) + new_tokens - 1):
        out = decode(model, on, [tokens[-1]], [position], [0])
        tokens.append(int(out[0, -1].argmax()))

    expected = hf_model.generate(
        ids([prompt]),
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        do_sample=False,
        max_new_tokens=new_tokens,
    )
    assert tokens == expected[0].tolist()
    held = len(tokens) - 1  # the last token was sampled, not fed
    assert_kv_close(model.kv(0), model.reference_kv(tokens[:held]), slice(0, held))
    calls = model.graph_calls
    assert [call.tag for call in calls] == ["context_encoding_model"] + [
        "token_generation_model"
    ] * (new_tokens - 1)
    assert calls[0].input_ids.shape == (1, MAX_CONTEXT) and calls[0].input_ids.dtype == torch.int32
    assert calls[0].position_ids[0, len(prompt) :].tolist() == [1] * (MAX_CONTEXT - len(prompt))


# -- the runtime's hazards ----------------------------------------------------------------


def test_partial_decode_batch_overwrites_other_lines_with_row_0(
    on: OptimumNeuron, hf_model: Any
) -> None:
    """(a) Continuous batching, B=2: a decode of slot 0 alone is padded by the wrapper
    with a copy of row 0 for slot 1, whose KV at slot 0's position is overwritten."""
    model = standin(hf_model, batch_size=2, continuous_batching=True)
    prompt0, prompt1 = [3, 4, 5], [60, 61, 62, 63, 64, 65]
    context(model, on, [prompt0], [0])
    context(model, on, [prompt1], [1])
    assert_kv_close(model.kv(1), model.reference_kv(prompt1), slice(0, len(prompt1)))

    position = len(prompt0)
    decode(model, on, [11], [position], [0])
    call = model.graph_calls[-1]
    assert call.input_ids.tolist() == [[11], [11]]
    assert call.position_ids.tolist() == [[position], [position]]
    assert call.seq_ids.tolist() == [0, 1]

    line0, line1 = model.kv(0), model.kv(1)
    # layer 0's KV depends only on the token and its position: slot 0's row, copied
    torch.testing.assert_close(line1[0][0][:, position], line0[0][0][:, position])
    torch.testing.assert_close(line1[0][1][:, position], line0[0][1][:, position])
    # ... over a position of slot 1's prompt, which no longer holds its token's KV
    reference1 = model.reference_kv(prompt1)
    assert not torch.allclose(line1[0][0][:, position], reference1[0][0][:, position])
    others = [p for p in range(len(prompt1)) if p != position]
    assert_kv_close(line1, reference1, others)


def test_left_padded_context_row_differs(on: OptimumNeuron, hf_model: Any) -> None:
    """(b) The context graph's mask is only causal: left pads are attended to, and the
    row's KV is written from index 0, shifted by the pads."""
    model = standin(hf_model, batch_size=1)
    prompt, pad = [21, 22, 23], 0
    plain = context(model, on, [prompt], [0])[0, -1]
    torch.testing.assert_close(plain, last_logits(hf_model, prompt), atol=ATOL, rtol=0)

    # positions as derived from an attention mask (cumsum - 1, pads at 1)
    padded_ids, padded_positions = ids([[pad, pad, *prompt]]), ids([[1, 1, 0, 1, 2]])
    sampling = on.prepare_sampling_params(1)
    padded = model.forward(padded_ids, padded_positions, torch.tensor([0]), sampling)[0, -1]
    assert model.graph_calls[-1].tag == "context_encoding_model"
    assert not torch.allclose(padded, plain, atol=1e-3)
    reference, line = model.reference_kv(prompt), model.kv(0)
    # the line's first positions hold the pads, not the prompt
    assert not torch.allclose(line[0][0][:, : len(prompt)], reference[0][0], atol=1e-3)
    # the prompt's own KV (indices 2..4) differs past layer 0: it attended to the pads
    assert not torch.allclose(line[-1][0][:, 2:5], reference[-1][0], atol=1e-3)


def test_static_batch_writes_lines_by_row_index(on: OptimumNeuron, hf_model: Any) -> None:
    """(c) Without continuous batching, context rows fill lines 0..B-1 in row order and
    decode rows scatter into line = row index: seq_ids are ignored."""
    model = standin(hf_model, batch_size=2)
    slot0, slot1 = [7, 8, 9, 10], [50, 51, 52, 53]
    out = context(model, on, [slot1, slot0], [1, 0])
    torch.testing.assert_close(out[0, -1], last_logits(hf_model, slot1), atol=ATOL, rtol=0)
    assert_kv_close(model.kv(0), model.reference_kv(slot1), slice(0, 4))
    assert_kv_close(model.kv(1), model.reference_kv(slot0), slice(0, 4))

    decode(model, on, [70, 80], [4, 4], [1, 0])
    assert model.graph_calls[-1].seq_ids.tolist() == [1, 0]  # passed, and not used
    assert_kv_close(model.kv(0), model.reference_kv([*slot1, 70]), slice(0, 5))
    assert_kv_close(model.kv(1), model.reference_kv([*slot0, 80]), slice(0, 5))


def test_on_device_sampling_returns_token_ids(on: OptimumNeuron, hf_model: Any) -> None:
    """(d) With on_device_sampling the graph samples: token ids [n], greedy (top_k=1)
    ones the argmax of the logits a model without it returns for the same calls."""
    logits_model = standin(hf_model, batch_size=2, continuous_batching=True)
    sampling_model = standin(
        hf_model, batch_size=2, continuous_batching=True, on_device_sampling=True
    )
    prompts = {0: [3, 4, 5, 6], 1: [90, 91, 92]}
    tokens = {}
    for slot, prompt in prompts.items():
        logits = context(logits_model, on, [prompt], [slot])
        sampled = context(sampling_model, on, [prompt], [slot])
        assert sampled.shape == (1,)
        assert sampled.tolist() == logits[:, -1].argmax(-1).tolist()
        tokens[slot] = int(sampled[0])
    order = [1, 0]  # unsorted seq_ids: the wrapper sorts rows, then restores the order
    args = ([tokens[s] for s in order], [len(prompts[s]) for s in order], order)
    logits = decode(logits_model, on, *args)
    sampled = decode(sampling_model, on, *args)
    assert sampled.shape == (2,)
    assert sampled.tolist() == logits[:, -1].argmax(-1).tolist()
    for slot in order:
        prompt = ids([prompts[slot]])
        expected = hf_model.generate(
            prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=2
        )
        assert [tokens[slot], int(sampled[order.index(slot)])] == expected[0, -2:].tolist()


def test_output_logits_breaks_partial_batches(on: OptimumNeuron, hf_model: Any) -> None:
    """With output_logits the graph returns [tokens, logits]; a full batch gets that
    list, but the wrapper's padding and reordering expect one tensor and fail."""
    model = standin(
        hf_model,
        batch_size=2,
        continuous_batching=True,
        on_device_sampling=True,
        output_logits=True,
    )
    tokens, logits = context(model, on, [[3, 4, 5]], [0])
    assert tokens.shape == (1,) and logits.shape == (1, 1, hf_model.config.vocab_size)
    context(model, on, [[6, 7, 8]], [1])
    tokens, logits = decode(model, on, [1, 2], [3, 3], [0, 1])
    assert tokens.tolist() == logits[:, -1].argmax(-1).tolist()
    with pytest.raises(TypeError):
        decode(model, on, [1], [4], [0])  # padded batch: torch.cat of a list
    with pytest.raises(TypeError):
        decode(model, on, [1, 2], [4, 4], [1, 0])  # reordered batch: index_select of a list


def test_compiled_graphs_refuse_other_shapes(on: OptimumNeuron, hf_model: Any) -> None:
    """(e) A compiled graph runs only the shapes and dtypes it was traced with."""
    model = standin(hf_model, batch_size=2, continuous_batching=True)
    graph = model.context_encoding_model.model
    sampling = on.prepare_sampling_params(1)
    int32 = torch.int32
    with pytest.raises(CompiledGraphError, match="no compiled graph"):
        graph(
            torch.ones(1, 4, dtype=int32),
            torch.ones(1, 4, dtype=int32),
            torch.zeros(1, dtype=int32),
            sampling,
        )
    with pytest.raises(CompiledGraphError, match="no compiled graph"):  # a context row per call
        graph(
            torch.ones(2, MAX_CONTEXT, dtype=int32),
            torch.ones(2, MAX_CONTEXT, dtype=int32),
            torch.zeros(2, dtype=int32),
            on.prepare_sampling_params(2),
        )
    with pytest.raises(CompiledGraphError, match="dtypes"):  # the wrappers convert to int32
        graph(
            torch.ones(1, MAX_CONTEXT, dtype=torch.long),
            torch.ones(1, MAX_CONTEXT, dtype=int32),
            torch.zeros(1, dtype=int32),
            sampling,
        )
    context_graph = model.traced_model.graphs["context_encoding_model"]
    with pytest.raises(CompiledGraphError, match="input shapes"):
        context_graph(
            torch.ones(1, 1, dtype=int32),
            torch.ones(1, 1, dtype=int32),
            torch.zeros(1, dtype=int32),
            sampling,
        )
    with pytest.raises(CompiledGraphError):  # every graph takes sampling_params
        model.forward(ids([[3, 4, 5]]), ids([[0, 1, 2]]), torch.tensor([0]), None)
    with pytest.raises(ValueError, match="exceeds the maximum batch size"):  # the wrapper's check
        decode(model, on, [1, 2, 3], [3, 3, 3], [0, 1, 2])
    assert model.graph_calls == []
