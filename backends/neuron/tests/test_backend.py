"""NeuronBackend over the CPU emulator: static KV tensors and the slot rules it enforces."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from tgi_backend_neuron._emulator import EmulatedNeuronModel
from tgi_backend_neuron.backend import NeuronBackend

from tgi.backend.contract import (
    Batching,
    DecodeBatch,
    DecodeRow,
    KvLayout,
    Limits,
    PrefillBatch,
    PrefillRow,
)
from tgi.errors import BackendError
from tgi.testing import ReferenceModel, make_prompt

SLOTS, LENGTH = 3, 48
LIMITS = Limits(
    max_input_tokens=24,
    max_total_tokens=LENGTH,
    max_batch_prefill_tokens=72,
    max_batch_total_tokens=None,
    max_batch_size=SLOTS,
)


def build(model_dir: Path, *, rebuild: bool) -> NeuronBackend:
    executor = EmulatedNeuronModel(
        model_dir, batch_size=SLOTS, sequence_length=LENGTH, continuous_batching=not rebuild
    )
    return NeuronBackend(executor, device_type="neuron (emulated)")


@pytest.fixture
def insert(tiny_model: Path) -> Iterator[NeuronBackend]:
    backend = build(tiny_model, rebuild=False)
    backend.warmup(LIMITS)
    yield backend
    backend.close()


@pytest.fixture
def rebuild(tiny_model: Path) -> Iterator[NeuronBackend]:
    backend = build(tiny_model, rebuild=True)
    backend.warmup(LIMITS)
    yield backend
    backend.close()


def prompt(seed: int, n: int = 9) -> tuple[int, ...]:
    return tuple(make_prompt(seed, n, 200))


def greedy(logits: torch.Tensor) -> list[int]:
    return [int(token) for token in logits[:, -1].argmax(dim=-1)]


def test_capabilities_say_static_slots(tiny_model: Path) -> None:
    backend = build(tiny_model, rebuild=True)
    try:
        caps = backend.capabilities
        assert (caps.batching, caps.kv_layout) == (Batching.STATIC, KvLayout.SLOTS)
        assert (caps.static_batch_size, caps.static_max_length) == (SLOTS, LENGTH)
        assert caps.prefill_rebuilds_cache and not caps.chunked_prefill
        assert backend.device_type == "neuron (emulated)"
        assert not build(tiny_model, rebuild=False).capabilities.prefill_rebuilds_cache
    finally:
        backend.close()


def test_kv_lives_in_preallocated_b_by_l_tensors(insert: NeuronBackend) -> None:
    executor = insert.executor
    assert isinstance(executor, EmulatedNeuronModel)
    keys = executor._keys
    assert len(keys) == 2  # the tiny model's layers
    assert tuple(keys[0].shape) == (SLOTS, 2, LENGTH, 16)  # [B, kv_heads, L, head_dim]
    pointers = [tensor.data_ptr() for tensor in keys]
    insert.prefill(PrefillBatch((PrefillRow(1, prompt(1), slot=2),)))
    assert [tensor.data_ptr() for tensor in keys] == pointers  # written in place
    assert keys[0][2, :, :9].abs().sum() > 0 and keys[0][2, :, 9:].abs().sum() == 0
    assert insert.kv_usage().capacity_tokens == SLOTS * LENGTH


def test_warmup_refuses_limits_past_the_compiled_shape(tiny_model: Path) -> None:
    backend = build(tiny_model, rebuild=False)
    try:
        too_many = Limits(24, LENGTH, 72, None, SLOTS + 1)
        with pytest.raises(BackendError, match="--max-batch-size 4 is more than the compiled"):
            backend.warmup(too_many)
        too_long = Limits(24, LENGTH + 1, 72, None, SLOTS)
        with pytest.raises(BackendError, match="--max-total-tokens 49 is more than"):
            backend.warmup(too_long)
    finally:
        backend.close()


def test_greedy_tokens_match_transformers(insert: NeuronBackend, tiny_model: Path) -> None:
    reference = ReferenceModel(tiny_model)
    tokens = prompt(5)
    expected = reference.greedy(tokens, 10)
    out = insert.prefill(PrefillBatch((PrefillRow(7, tokens),)))
    got = greedy(out.logits)
    while len(got) < len(expected):
        position = len(tokens) + len(got) - 1
        out = insert.decode(DecodeBatch((DecodeRow(7, (got[-1],), position),)))
        got += greedy(out.logits)
    assert got == expected


def test_rows_without_a_slot_take_the_lowest_free_ones(insert: NeuronBackend) -> None:
    insert.prefill(PrefillBatch((PrefillRow(1, prompt(1), slot=0),)))
    insert.prefill(PrefillBatch((PrefillRow(2, prompt(2)), PrefillRow(3, prompt(3)))))
    assert [insert.slot_of(seq) for seq in (1, 2, 3)] == [0, 1, 2]
    with pytest.raises(BackendError, match="no free slot for seq 4: all 3 are live"):
        insert.prefill(PrefillBatch((PrefillRow(4, prompt(4)),)))
    insert.release([2])
    insert.prefill(PrefillBatch((PrefillRow(4, prompt(4)),)))
    assert insert.slot_of(4) == 1
    assert insert.kv_usage().seq_ids == frozenset({1, 3, 4})


@pytest.mark.parametrize(
    ("row", "message"),
    [
        (PrefillRow(2, (1, 2), slot=0), "seq 2 names slot 0, held by seq 1"),
        (PrefillRow(2, (1, 2), slot=3), r"seq 2 names slot 3, outside \[0, 3\)"),
        (PrefillRow(2, (1, 2), start_position=4), "starts at position 4; static slots"),
        (PrefillRow(2, tuple(range(49))), "has 49 tokens, past the compiled context length 48"),
        (PrefillRow(2, (1, 999)), r"outside the vocabulary \[0, 259\)"),
        (PrefillRow(1, (1, 2), slot=1), "seq 1 owns slot 0, not 1"),
    ],
)
def test_a_prefill_that_breaks_static_shapes_is_refused_untouched(
    insert: NeuronBackend, row: PrefillRow, message: str
) -> None:
    insert.prefill(PrefillBatch((PrefillRow(1, prompt(1), slot=0),)))
    before = insert.kv_usage()
    with pytest.raises(BackendError, match=message):
        insert.prefill(PrefillBatch((row,)))
    assert insert.kv_usage() == before


def test_the_executor_caps_context_at_the_compiled_length(tiny_model: Path) -> None:
    executor = EmulatedNeuronModel(
        tiny_model, batch_size=1, sequence_length=8, continuous_batching=True
    )
    executor.warmup(4)
    executor.prefill([0], [[1, 2, 3, 4, 5, 6, 7, 8]])
    with pytest.raises(ValueError, match="slot 0 would hold 9 tokens, past 8"):
        executor.decode([0], [9], [8])


def test_decode_rows_must_match_their_slot_and_position(insert: NeuronBackend) -> None:
    insert.prefill(PrefillBatch((PrefillRow(1, prompt(1), slot=0),)))
    with pytest.raises(BackendError, match="at position 5 but its slot holds 9 tokens"):
        insert.decode(DecodeBatch((DecodeRow(1, (3,), 5),)))
    with pytest.raises(BackendError, match="names slot 2; it owns 0"):
        insert.decode(DecodeBatch((DecodeRow(1, (3,), 9, slot=2),)))
    with pytest.raises(BackendError, match="seq 8, which is not live"):
        insert.decode(DecodeBatch((DecodeRow(8, (3,), 0),)))
    with pytest.raises(BackendError, match="one token per row"):
        insert.decode(DecodeBatch((DecodeRow(1, (3, 4), 9),)))


def test_rebuild_mode_refuses_a_prefill_that_leaves_out_a_live_slot(
    rebuild: NeuronBackend,
) -> None:
    rebuild.prefill(PrefillBatch((PrefillRow(1, prompt(1)),)))
    with pytest.raises(BackendError, match=r"re-send the live sequences \[1\] too"):
        rebuild.prefill(PrefillBatch((PrefillRow(2, prompt(2)),)))


def test_a_rebuilt_slot_continues_exactly_as_before(rebuild: NeuronBackend) -> None:
    tokens = prompt(11)
    out = rebuild.prefill(PrefillBatch((PrefillRow(1, tokens),)))
    generated = greedy(out.logits)
    for _ in range(5):
        position = len(tokens) + len(generated) - 1
        out = rebuild.decode(DecodeBatch((DecodeRow(1, (generated[-1],), position, slot=0),)))
        generated += greedy(out.logits)
    executor = rebuild.executor
    assert isinstance(executor, EmulatedNeuronModel)
    held = len(tokens) + len(generated) - 1
    keys_before = executor._keys[1][0, :, :held].clone()
    # A newcomer joins: slot 0 is re-prefilled from prompt + generated minus the pending one.
    history = tokens + tuple(generated[:-1])
    out = rebuild.prefill(
        PrefillBatch((PrefillRow(1, history, slot=0, want_logits=False), PrefillRow(2, prompt(12))))
    )
    assert out.seq_ids == (2,) and rebuild.rebuilt_rows == 1
    torch.testing.assert_close(executor._keys[1][0, :, :held], keys_before, atol=1e-5, rtol=1e-5)
    assert rebuild.kv_usage().used_tokens == held + 9
    # The pending token is fed by the next decode, as if nothing had happened.
    out = rebuild.decode(
        DecodeBatch(
            (
                DecodeRow(1, (generated[-1],), held, slot=0),
                DecodeRow(2, (greedy(out.logits)[0],), 9, slot=1),
            )
        )
    )
    assert out.seq_ids == (1, 2)


def test_a_failing_executor_drops_the_rows_it_touched(
    insert: NeuronBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    insert.prefill(PrefillBatch((PrefillRow(1, prompt(1)),)))

    def broken(*args: object) -> torch.Tensor:
        raise RuntimeError("device error")

    monkeypatch.setattr(insert.executor, "decode", broken)
    with pytest.raises(BackendError, match="neuron decode failed: device error"):
        insert.decode(DecodeBatch((DecodeRow(1, (3,), 9),)))
    assert insert.kv_usage().seq_ids == frozenset()
    monkeypatch.setattr(insert.executor, "prefill", broken)
    with pytest.raises(BackendError, match="neuron prefill failed"):
        insert.prefill(PrefillBatch((PrefillRow(2, prompt(2)),)))
    assert insert.kv_usage().seq_ids == frozenset()


def test_health_leaves_every_slot_as_it_was(insert: NeuronBackend) -> None:
    insert.prefill(PrefillBatch((PrefillRow(1, prompt(1)),)))
    executor = insert.executor
    assert isinstance(executor, EmulatedNeuronModel)
    keys = executor._keys[0].clone()
    insert.health()
    assert torch.equal(executor._keys[0], keys)
    assert insert.kv_usage().used_tokens == 9


def test_closed_backend_refuses_calls(tiny_model: Path) -> None:
    backend = build(tiny_model, rebuild=False)
    backend.warmup(LIMITS)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.prefill(PrefillBatch((PrefillRow(1, prompt(1)),)))
