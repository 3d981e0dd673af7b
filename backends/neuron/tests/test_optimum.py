"""The real executor (`_optimum.py`) over optimum-neuron 0.4.5's own Python.

`StandInNeuronModel` (nxd_standin.py) is what `NeuronModelForCausalLM.from_pretrained`
returns on a Neuron host, with only the compiled graphs stood in for: optimum-neuron's
`forward` routing, its decoder wrappers (context padding, `_forward_with_pad`'s row-0
copies, continuous batching's reordering), its `KVCacheManager` writes and its sampler
all run as released. Each step pattern the review found dangerous runs through
`NeuronBackend`, and every sequence's tokens must equal transformers' `generate()` and
every live slot's KV transformers' own KV.

Each pattern also runs with one of the reviewed bugs put back (an executor subclass
below), and must then fail by a token or KV assertion: left-padded prefill rows, rows
in router order instead of slot order, short decode batches padded by the wrapper with
copies of row 0, and padding rows written at position 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest
import torch
from tgi_backend_neuron._optimum import OptimumNeuronModel
from tgi_backend_neuron._sampling import GREEDY, RowSampling
from tgi_backend_neuron.backend import NeuronBackend

from tgi.backend.contract import Limits, NewSequence, StepPlan
from tgi.errors import BackendError
from tgi.sampling.params import SamplingParams
from tgi.testing.reference import ReferenceModel

from .conftest import Steps, make_prompt
from .nxd_standin import StandInNeuronModel, import_optimum_neuron, tiny_llama

SLOTS = 4
LENGTH = 48  # compiled sequence length (and context length: rebuild rows fit)
VOCAB = 128
PAD = 0


@pytest.fixture(scope="module")
def hf_model() -> Any:
    import_optimum_neuron()  # skips (or fails, in the compat run) without optimum-neuron
    return tiny_llama(seed=3)


# -- the bugs, put back -------------------------------------------------------------------


class LeftPadded(OptimumNeuronModel):
    """New rows of one step in one context call, left padded to the longest (as the
    executor written for optimum-neuron < 0.4 did)."""

    def prefill(self, slots: Any, token_ids: Any, sampling: Any = None) -> torch.Tensor:
        rows = [list(tokens) for tokens in token_ids]
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), PAD, dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row)
            positions[i, width - len(row) :] = torch.arange(len(row))
        out = self._run(input_ids, positions, list(slots), [GREEDY.as_row()] * len(rows))
        for slot, row in zip(slots, rows, strict=True):
            self._lengths[slot] = len(row)
        return out


class RowZeroPadded(OptimumNeuronModel):
    """Decode calls carry only the rows that decode; optimum-neuron's wrapper pads the
    batch with copies of row 0 (its `_forward_with_pad`). Health is a one-token prefill
    on a free slot, as before."""

    def _decode_call(self, rows: dict[int, tuple[int, int, RowSampling]]) -> torch.Tensor:
        slots = list(rows)
        input_ids = torch.tensor([[rows[slot][0]] for slot in slots], dtype=torch.long)
        positions = torch.tensor([[rows[slot][1]] for slot in slots], dtype=torch.long)
        params = [rows[slot][2].as_row() for slot in slots]
        out = self._run(input_ids, positions, slots, params)
        for slot, (_, position, _) in rows.items():
            self._lengths[slot] = position + 1
        return out

    def health(self) -> None:
        free = [slot for slot in range(self.batch_size) if self._lengths[slot] == 0]
        if free:
            self.prefill([free[0]], [[PAD]])
            self.clear([free[0]])


class RouterOrder(OptimumNeuronModel):
    """Without continuous batching, context rows sent in the order given (new rows, then
    the rebuilt ones) with the absent slots after them, so row index != slot."""

    def _context(self, rows: dict[int, tuple[list[int], RowSampling]]) -> torch.Tensor:
        if self.continuous_batching:
            return super()._context(rows)
        order = list(rows) + [slot for slot in range(self.batch_size) if slot not in rows]
        width = self.max_context_length
        input_ids = torch.full((len(order), width), PAD, dtype=torch.long)
        positions = torch.zeros((len(order), width), dtype=torch.long)
        for i, slot in enumerate(order):
            tokens = rows[slot][0] if slot in rows else [PAD]
            input_ids[i, : len(tokens)] = torch.tensor(tokens)
            positions[i, : len(tokens)] = torch.arange(len(tokens))
        out = self._run(input_ids, positions, order, [GREEDY.as_row()] * len(order))
        for slot in order:
            self._lengths[slot] = len(rows[slot][0]) if slot in rows else 0
        return out[: len(rows)]


class PaddingAtZero(OptimumNeuronModel):
    """Padding rows of a decode call write position 0 of their slot."""

    def _decode_call(self, rows: dict[int, tuple[int, int, RowSampling]]) -> torch.Tensor:
        lengths = self._lengths
        self._lengths = [0] * self.batch_size  # what the padding rows read
        try:
            for slot in rows:
                self._lengths[slot] = lengths[slot]
            return super()._decode_call(rows)
        finally:
            for slot, (_, position, _) in rows.items():
                lengths[slot] = position + 1
            self._lengths = lengths


# -- running a pattern --------------------------------------------------------------------


def run_backend(
    hf_model: Any, executor_class: type[OptimumNeuronModel], **neuron: Any
) -> tuple[StandInNeuronModel, NeuronBackend, Steps]:
    model = StandInNeuronModel(
        hf_model,
        batch_size=SLOTS,
        sequence_length=LENGTH,
        max_context_length=LENGTH,
        **{"continuous_batching": True, **neuron},
    )
    backend = NeuronBackend(executor_class(model, pad_token_id=PAD), device_type="xla")
    backend.warmup(
        Limits(
            max_input_tokens=24,
            max_total_tokens=LENGTH,
            max_batch_prefill_tokens=SLOTS * 24,
            max_batch_total_tokens=SLOTS * LENGTH,
            max_batch_size=SLOTS,
        )
    )
    return model, backend, Steps(backend)


def problems(model: StandInNeuronModel, backend: NeuronBackend, steps: Steps) -> list[str]:
    """Where a sequence's tokens differ from generate(), or a live slot's KV from
    transformers' KV of the tokens it was fed."""
    found = []
    for seq_id, generated in steps.generated.items():
        prompt = steps.prompts[seq_id]
        expected = greedy_reference(model, prompt, len(generated))
        if generated != expected:
            found.append(f"seq {seq_id}: tokens {generated} != generate() {expected}")
        slot = backend.slot_of(seq_id)
        if slot is None:
            continue
        fed = [*prompt, *generated[:-1]]
        for layer, ((keys, values), (ref_k, ref_v)) in enumerate(
            zip(model.kv(slot), model.reference_kv(fed), strict=True)
        ):
            n = len(fed)
            if not (
                torch.allclose(keys[:, :n], ref_k, atol=1e-4)
                and torch.allclose(values[:, :n], ref_v, atol=1e-4)
            ):
                found.append(f"seq {seq_id} (slot {slot}): layer {layer} KV differs")
                break
    return found


def greedy_reference(model: StandInNeuronModel, prompt: Sequence[int], count: int) -> list[int]:
    reference = ReferenceModel.wrapping(model.hf_model)
    return reference.greedy(prompt, count, stop_at_eos=False)


def prompt(seed: int, length: int) -> tuple[int, ...]:
    return make_prompt(seed, length, VOCAB)


# -- the patterns -------------------------------------------------------------------------


@pytest.mark.parametrize(("executor", "buggy"), [(OptimumNeuronModel, False), (LeftPadded, True)])
def test_a_multi_row_prefill(hf_model: Any, executor: type, buggy: bool) -> None:
    """Two prompts of different lengths join in one step (continuous batching)."""
    model, backend, steps = run_backend(hf_model, executor)
    steps.step({1: (0, prompt(1, 9)), 2: (2, prompt(2, 4))})
    for _ in range(4):
        steps.step()
    assert bool(problems(model, backend, steps)) is buggy


@pytest.mark.parametrize(
    ("executor", "buggy"), [(OptimumNeuronModel, False), (RowZeroPadded, True)]
)
def test_a_prefill_and_a_partial_decode_in_one_step(
    hf_model: Any, executor: type, buggy: bool
) -> None:
    """A short sequence decodes while a longer one is prefilled in the same step: the
    decode call's padding rows must not write into the new slot."""
    model, backend, steps = run_backend(hf_model, executor)
    steps.step({1: (0, prompt(3, 3))})
    steps.step({2: (1, prompt(4, 12))})  # seq 1 decodes at position 3 < 12
    for _ in range(3):
        steps.step()
    assert bool(problems(model, backend, steps)) is buggy


@pytest.mark.parametrize(
    ("executor", "buggy"), [(OptimumNeuronModel, False), (RowZeroPadded, True)]
)
def test_a_one_token_prompt(hf_model: Any, executor: type, buggy: bool) -> None:
    """A one-token prompt is decoded at position 0 in its slot, nowhere else."""
    model, backend, steps = run_backend(hf_model, executor)
    steps.step({1: (0, prompt(5, 6))})
    steps.step()
    steps.step({2: (3, prompt(6, 1))})
    for _ in range(3):
        steps.step()
    assert bool(problems(model, backend, steps)) is buggy


@pytest.mark.parametrize(
    ("executor", "buggy"), [(OptimumNeuronModel, False), (RowZeroPadded, True)]
)
@pytest.mark.parametrize("continuous_batching", [True, False])
def test_health_during_traffic(
    hf_model: Any, executor: type, buggy: bool, continuous_batching: bool
) -> None:
    model, backend, steps = run_backend(hf_model, executor, continuous_batching=continuous_batching)
    steps.step({1: (0, prompt(7, 5)), 2: (1, prompt(8, 7))})
    for _ in range(2):
        backend.health()
        steps.step()
    assert bool(problems(model, backend, steps)) is buggy


@pytest.mark.parametrize(
    ("executor", "buggy"),
    [(OptimumNeuronModel, False), (RouterOrder, True), (PaddingAtZero, True)],
)
def test_rebuild_with_several_slots(hf_model: Any, executor: type, buggy: bool) -> None:
    """Without continuous batching: sequences join and leave a running batch of B=4, each
    join re-prefilling every live slot, rows always in slot order."""
    model, backend, steps = run_backend(hf_model, executor, continuous_batching=False)
    steps.step({1: (2, prompt(9, 6))})
    steps.step()
    steps.step({2: (0, prompt(10, 8))})
    steps.step()
    steps.step({3: (1, prompt(11, 5))}, finished=[1])
    for _ in range(3):
        steps.step()
    found = problems(model, backend, steps)
    assert bool(found) is buggy, found
    if not buggy:
        assert backend.rebuilt_rows == 2  # seq 1 at seq 2's join, seq 2 at seq 3's


def test_every_graph_call_has_the_compiled_shape_and_slot_order(hf_model: Any) -> None:
    model, _, steps = run_backend(hf_model, OptimumNeuronModel)
    steps.step({1: (3, prompt(12, 5)), 2: (1, prompt(13, 1))})
    steps.step()
    for call in model.graph_calls:
        if call.tag == "token_generation_model":
            assert call.input_ids.shape == (SLOTS, 1)
            assert call.seq_ids.tolist() == list(range(SLOTS))  # never a partial batch
        else:
            assert call.input_ids.shape == (1, LENGTH)  # one row, right padded


# -- on-device sampling -------------------------------------------------------------------


def test_on_device_sampling_returns_token_ids_and_takes_each_rows_parameters(
    hf_model: Any,
) -> None:
    model, backend, steps = run_backend(hf_model, OptimumNeuronModel, on_device_sampling=True)
    assert backend.capabilities.samples_on_device
    assert backend.capabilities.max_top_k == VOCAB  # the stand-in's max_topk
    assert "seed" not in backend.capabilities.sampling_parameters
    steps.step({1: (0, prompt(14, 6))})
    for _ in range(3):
        steps.step()
    assert problems(model, backend, steps) == []  # greedy rows: top_k=1 on the device
    sampled = NewSequence(
        5, prompt(15, 4), slot=2, sampling=SamplingParams(True, 0.7, 5, 0.9, seed=1)
    )
    out = backend.step(StepPlan(new=(sampled,)))
    assert out.logits is None and out.token_ids is not None
    assert out.token_ids.shape == (1,) and 0 <= int(out.token_ids[0]) < VOCAB
    params = model.graph_calls[-1].sampling_params
    assert params[0].tolist() == pytest.approx([5.0, 0.9, 0.7])


# -- failures and health ------------------------------------------------------------------


def test_a_failed_device_call_drops_every_live_sequence(
    hf_model: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every call carries all B rows, so with continuous batching too a failed decode
    leaves every slot's KV undefined: none may keep running on it."""
    model, backend, steps = run_backend(hf_model, OptimumNeuronModel)
    steps.step({1: (0, prompt(16, 5)), 2: (1, prompt(17, 3))})

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("NRT_EXEC_HW_ERR")

    monkeypatch.setattr(model, "forward", broken)
    with pytest.raises(BackendError, match="neuron prefill failed: NRT_EXEC_HW_ERR"):
        steps.step({3: (2, prompt(18, 1))})  # a one-token prompt: a full-B decode call
    assert backend.kv_usage().seq_ids == frozenset()


def test_health_checks_every_row_the_device_returned(hf_model: Any) -> None:
    model, backend, steps = run_backend(hf_model, OptimumNeuronModel)
    steps.step({1: (0, prompt(19, 5))})
    backend.health()
    real_forward = model.forward

    def garbage(*args: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full_like(real_forward(*args, **kwargs), float("nan"))

    model.forward = garbage  # type: ignore[method-assign]
    with pytest.raises(BackendError, match="non-finite logits"):
        backend.health()
