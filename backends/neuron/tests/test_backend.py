"""NeuronBackend over the CPU emulator: static KV tensors, the step split, the rebuild.

Each guarantee is checked in both modes: insert (compiled with continuous batching:
only new rows are written) and rebuild (without: the backend re-prefills every live
slot itself when new sequences arrive).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_neuron._emulator import EmulatedNeuronModel
from tgi_backend_neuron.backend import NeuronBackend

from tgi.backend.contract import (
    Batching,
    KVCapacity,
    KvLayout,
    Limits,
    NewSequence,
    RunningSequence,
    StepPlan,
)
from tgi.errors import BackendError

from .conftest import Reference, Steps, greedy, make_prompt

SLOTS, LENGTH = 3, 48
VOCAB = 259  # the tiny model's
LIMITS = Limits(
    max_input_tokens=24,
    max_total_tokens=LENGTH,
    max_batch_prefill_tokens=72,
    max_batch_total_tokens=None,
    max_batch_size=SLOTS,
)
MODES = ["insert", "rebuild"]


def build(
    model_dir: Path, *, rebuild: bool, max_context_length: int | None = None
) -> NeuronBackend:
    executor = EmulatedNeuronModel(
        model_dir,
        batch_size=SLOTS,
        sequence_length=LENGTH,
        continuous_batching=not rebuild,
        max_context_length=max_context_length,
    )
    return NeuronBackend(executor, device_type="neuron (emulated)")


@pytest.fixture(params=MODES)
def backend(request: pytest.FixtureRequest, tiny_model: Path) -> Iterator[NeuronBackend]:
    built = build(tiny_model, rebuild=request.param == "rebuild")
    built.warmup(LIMITS)
    yield built
    built.close()


@pytest.fixture
def insert(tiny_model: Path) -> Iterator[NeuronBackend]:
    built = build(tiny_model, rebuild=False)
    built.warmup(LIMITS)
    yield built
    built.close()


@pytest.fixture
def rebuild(tiny_model: Path) -> Iterator[NeuronBackend]:
    built = build(tiny_model, rebuild=True)
    built.warmup(LIMITS)
    yield built
    built.close()


def keys_of(backend: NeuronBackend) -> list[torch.Tensor]:
    executor = backend.executor
    assert isinstance(executor, EmulatedNeuronModel)
    return executor._keys


def new(seq_id: int, slot: int | None, tokens: tuple[int, ...], **kwargs: Any) -> StepPlan:
    return StepPlan(new=(NewSequence(seq_id, tokens, slot=slot, **kwargs),))


def decode(seq_id: int, token: int, position: int) -> RunningSequence:
    return RunningSequence(seq_id, position, decode=True, last_token=token)


# -- capabilities and warmup ---------------------------------------------------------------


def test_capabilities_say_static_slots(tiny_model: Path) -> None:
    backend = build(tiny_model, rebuild=True)
    try:
        caps = backend.capabilities
        assert (caps.batching, caps.kv_layout) == (Batching.STATIC, KvLayout.SLOTS)
        assert (caps.static_batch_size, caps.static_max_length) == (SLOTS, LENGTH)
        assert caps.prefill_rebuilds_cache and not caps.chunked_prefill
        assert not caps.speculation and not caps.prefix_caching and not caps.prompt_logits
        assert backend.device_type == "neuron (emulated)"
        assert not build(tiny_model, rebuild=False).capabilities.prefill_rebuilds_cache
    finally:
        backend.close()


@pytest.mark.parametrize("mode", MODES)
def test_warmup_reports_b_by_l_tokens_and_the_compiled_step_shapes(
    tiny_model: Path, mode: str
) -> None:
    backend = build(tiny_model, rebuild=mode == "rebuild")
    try:
        report = backend.warmup(LIMITS)
        # 2 layers x (keys + values) x 2 kv heads x 16 dims x 4 bytes
        assert report.kv == KVCapacity(total_tokens=144, bytes_per_token=512, max_sequences=3)
        assert report.constraints.max_rows_per_step == SLOTS
        assert report.constraints.max_rows == SLOTS
        # Without continuous batching every forward computes all B rows.
        assert report.constraints.batch_buckets == ((SLOTS,) if mode == "rebuild" else ())
        assert report.constraints.length_buckets == ()  # prefill pads to its longest row
        assert report.seconds > 0
        assert backend.kv_usage().capacity_tokens == SLOTS * LENGTH
    finally:
        backend.close()


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


def test_warmup_in_rebuild_mode_needs_every_history_to_fit_the_context_graph(
    tiny_model: Path,
) -> None:
    # A rebuild re-prefills up to max_total_tokens - 1 = 47 tokens in one row.
    rebuild = build(tiny_model, rebuild=True, max_context_length=24)
    insert = build(tiny_model, rebuild=False, max_context_length=24)
    try:
        with pytest.raises(BackendError, match=r"--max-total-tokens 48 is more than the compiled "):
            rebuild.warmup(LIMITS)
        rebuild.warmup(Limits(24, 25, 72, None, SLOTS))
        insert.warmup(LIMITS)  # only prompts go through the context graph
    finally:
        rebuild.close()
        insert.close()


# -- the emulated device ----------------------------------------------------------------------


def test_kv_lives_in_preallocated_b_by_l_tensors_in_the_slot_named(insert: NeuronBackend) -> None:
    keys = keys_of(insert)
    assert len(keys) == 2  # the tiny model's layers
    assert tuple(keys[0].shape) == (SLOTS, 2, LENGTH, 16)  # [B, kv_heads, L, head_dim]
    pointers = [tensor.data_ptr() for tensor in keys]
    insert.step(new(1, 2, make_prompt(1, 9)))
    assert insert.slot_of(1) == 2  # the policy's choice, never the backend's
    assert [tensor.data_ptr() for tensor in keys] == pointers  # written in place
    assert keys[0][2, :, :9].abs().sum() > 0 and keys[0][2, :, 9:].abs().sum() == 0
    assert keys[0][1].abs().sum() == 0  # (warmup wrote slot 0, then cleared it)


def test_the_emulator_refuses_what_the_device_cannot_run(tiny_model: Path) -> None:
    executor = EmulatedNeuronModel(
        tiny_model, batch_size=1, sequence_length=8, continuous_batching=True, max_context_length=6
    )
    executor.warmup(4)
    with pytest.raises(ValueError, match="7 tokens for slot 0 is longer than the compiled context"):
        executor.prefill([0], [[1, 2, 3, 4, 5, 6, 7]])
    executor.prefill([0], [[1, 2, 3, 4, 5, 6]])
    executor.decode([0], [7], [6])
    executor.decode([0], [8], [7])
    with pytest.raises(ValueError, match="slot 0 would hold 9 tokens, past 8"):
        executor.decode([0], [9], [8])


def test_without_continuous_batching_a_prefill_wipes_the_slots_it_does_not_name(
    tiny_model: Path,
) -> None:
    executor = EmulatedNeuronModel(
        tiny_model, batch_size=2, sequence_length=16, continuous_batching=False
    )
    executor.warmup(4)
    executor.prefill([0], [[1, 2, 3]])
    executor.prefill([1], [[4, 5]])  # the compiled graph rewrites slot 0 too
    with pytest.raises(ValueError, match="slot 0 holds 0 tokens; cannot write 3"):
        executor.decode([0], [6], [3])


# -- greedy tokens ----------------------------------------------------------------------------


def test_greedy_tokens_match_transformers(backend: NeuronBackend, reference: Reference) -> None:
    prompt = make_prompt(5, 9)
    expected = reference.greedy(prompt, 10)
    assert len(expected) == 10
    assert Steps(backend).run({7: (1, prompt)}, 10) == {7: expected}


def test_rows_joining_and_leaving_mid_stream_decode_as_alone(
    backend: NeuronBackend, reference: Reference
) -> None:
    prompts = {1: make_prompt(21, 9), 2: make_prompt(22, 5), 3: make_prompt(23, 14)}
    lengths = {1: 12, 2: 8, 3: 6}
    expected = {seq: reference.greedy(prompts[seq], lengths[seq]) for seq in prompts}
    assert {seq: len(tokens) for seq, tokens in expected.items()} == lengths
    steps = Steps(backend)
    steps.step({1: (1, prompts[1])})
    steps.step()
    steps.step({2: (0, prompts[2])})  # joins seq 1 mid-stream, in slot 0
    steps.step()
    steps.step({3: (2, prompts[3])})  # and another, while both decode
    done: set[int] = set()
    while len(done) < 3:
        finished = [seq for seq in steps.in_kv if len(steps.generated[seq]) == lengths[seq]]
        done.update(finished)
        steps.step(finished=finished)
    assert steps.generated == expected
    assert backend.kv_usage().seq_ids == frozenset()
    # Rebuild mode: seq 2's arrival re-wrote seq 1's slot; seq 3's, those of 1 and 2.
    assert backend.rebuilt_rows == (3 if backend.capabilities.prefill_rebuilds_cache else 0)


def test_a_rebuilt_slot_continues_exactly_as_before(
    rebuild: NeuronBackend, reference: Reference
) -> None:
    prompt = make_prompt(11, 9)
    steps = Steps(rebuild)
    steps.run({1: (0, prompt)}, 6)
    held = steps.in_kv[1]  # prompt + 5 generated; the 6th is pending
    keys = keys_of(rebuild)
    keys_before = keys[1][0, :, :held].clone()
    out = steps.step({2: (1, make_prompt(12, 9))})
    assert out.seq_ids == (2, 1) and rebuild.rebuilt_rows == 1
    # The rebuilt KV equals the one written token by token (float32, other sum order).
    torch.testing.assert_close(keys[1][0, :, :held], keys_before, atol=1e-5, rtol=1e-5)
    assert rebuild.kv_usage().used_tokens == (held + 1) + 9
    steps.step()
    assert steps.generated[1] == reference.greedy(prompt, 8)


# -- the step plan ---------------------------------------------------------------------------


def test_logits_come_in_the_order_of_the_plans_logits_rows(insert: NeuronBackend) -> None:
    steps = Steps(insert)
    steps.step({1: (0, make_prompt(1, 9))})
    plan = StepPlan(
        new=(
            NewSequence(3, make_prompt(3, 4), slot=2),
            NewSequence(4, make_prompt(4, 6), slot=1, want_logits=False),
        ),
        running=(decode(1, steps.generated[1][-1], 9),),
    )
    out = insert.step(plan)
    assert out.seq_ids == (3, 1) == tuple(row.seq_id for row in plan.logits_rows)
    assert out.logits is not None and tuple(out.logits.shape) == (2, 1, VOCAB)
    assert out.logits.dtype == torch.float32
    assert insert.kv_usage().seq_ids == frozenset({1, 3, 4})


def test_finished_and_preempted_leave_before_new_rows_take_their_slots(
    backend: NeuronBackend,
) -> None:
    steps = Steps(backend)
    steps.step({1: (0, make_prompt(1, 9)), 2: (1, make_prompt(2, 7))})
    out = backend.step(
        StepPlan(
            new=(NewSequence(3, make_prompt(3, 5), slot=0), NewSequence(4, (5, 6), slot=1)),
            finished=(1,),
            preempted=(2,),
        )
    )
    assert out.seq_ids == (3, 4)
    assert backend.kv_usage().seq_ids == frozenset({3, 4})
    assert (backend.slot_of(3), backend.slot_of(4)) == (0, 1)
    assert backend.rebuilt_rows == 0  # nobody was live any more to rebuild


def test_a_preempted_sequence_resumes_exactly(backend: NeuronBackend, reference: Reference) -> None:
    prompt = make_prompt(31, 8)
    steps = Steps(backend)
    steps.run({1: (0, prompt)}, 4)
    steps.step({2: (2, make_prompt(32, 6))})
    generated = steps.generated[1]
    out = backend.step(StepPlan(preempted=(1,), running=(decode(2, steps.generated[2][-1], 6),)))
    assert out.seq_ids == (2,) and backend.kv_usage().seq_ids == frozenset({2})
    # It comes back under its id, in another slot: prompt + generated[:-1], no logits.
    resumed = NewSequence(1, (*prompt, *generated[:-1]), slot=1, want_logits=False)
    out = backend.step(StepPlan(new=(resumed,), running=(decode(2, greedy(out)[0], 7),)))
    assert out.seq_ids == (2,)
    out = backend.step(StepPlan(running=(decode(1, generated[-1], len(prompt) + 4),)))
    assert generated + greedy(out) == reference.greedy(prompt, 6)


def test_a_plan_with_no_rows_only_releases(backend: NeuronBackend) -> None:
    Steps(backend).step({1: (0, make_prompt(1, 9))})
    out = backend.step(StepPlan(finished=(1,)))
    assert out.seq_ids == () and out.logits is not None
    assert tuple(out.logits.shape) == (0, 1, VOCAB)
    assert backend.kv_usage().seq_ids == frozenset()


def test_kv_usage_counts_every_token_each_slot_holds(backend: NeuronBackend) -> None:
    steps = Steps(backend)
    steps.step({1: (0, make_prompt(1, 9)), 2: (2, make_prompt(2, 4))})
    steps.step()
    steps.step()
    usage = backend.kv_usage()
    assert usage.seq_ids == frozenset({1, 2})
    assert usage.used_tokens == (9 + 2) + (4 + 2)
    backend.release([2, 99])  # unknown ids are ignored
    assert backend.kv_usage().used_tokens == 11


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (new(2, None, (1, 2)), "new seq 2 names slot None: static slots need one in"),
        (new(2, 3, (1, 2)), r"new seq 2 names slot 3: static slots need one in \[0, 3\)"),
        (new(2, 1, (1, 2), start_position=4), "starts at position 4 with 2 tokens; static"),
        (new(2, 1, ()), "starts at position 0 with 0 tokens"),
        (StepPlan(running=(decode(8, 3, 0),)), "running seq 8 holds no slot here"),
        (
            StepPlan(running=(RunningSequence(1, 9, token_ids=(4,), decode=True, last_token=3),)),
            "not a one-token decode row",
        ),
        (StepPlan(running=(RunningSequence(1, 9, token_ids=(4, 5)),)), "no chunked prefill"),
        (StepPlan(running=(decode(1, 3, 5),)), "at position 5 but its slot holds 9 tokens"),
    ],
)
def test_a_plan_these_graphs_cannot_run_is_refused_untouched(
    insert: NeuronBackend, plan: StepPlan, message: str
) -> None:
    insert.step(new(1, 0, make_prompt(1, 9)))
    before = insert.kv_usage()
    keys = keys_of(insert)[0].clone()
    with pytest.raises(BackendError, match=message):
        insert.step(plan)
    assert insert.kv_usage() == before
    assert torch.equal(keys_of(insert)[0], keys)


# -- failures --------------------------------------------------------------------------------


def broken(*args: object) -> torch.Tensor:
    raise RuntimeError("device error")


def two_live(backend: NeuronBackend) -> Steps:
    steps = Steps(backend)
    steps.step({1: (0, make_prompt(1, 9)), 2: (1, make_prompt(2, 5))})
    return steps


def test_a_failing_executor_drops_the_rows_it_touched(
    insert: NeuronBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = two_live(insert)
    with monkeypatch.context() as patch:
        patch.setattr(insert.executor, "prefill", broken)
        with pytest.raises(BackendError, match="neuron prefill failed: device error"):
            steps.step({3: (2, make_prompt(3, 4))})
    assert insert.kv_usage().seq_ids == frozenset({1, 2})  # the decode never ran
    monkeypatch.setattr(insert.executor, "decode", broken)
    with pytest.raises(BackendError, match="neuron decode failed: device error"):
        steps.step({3: (2, make_prompt(3, 4))})
    assert insert.kv_usage().seq_ids == frozenset({3})  # written by the prefill, untouched


def test_in_rebuild_mode_a_failing_executor_drops_every_slot(
    rebuild: NeuronBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    steps = two_live(rebuild)
    with monkeypatch.context() as patch:
        patch.setattr(rebuild.executor, "prefill", broken)
        with pytest.raises(BackendError, match="neuron prefill failed: device error"):
            steps.step({3: (2, make_prompt(3, 4))})
    assert rebuild.kv_usage().seq_ids == frozenset()  # every live slot was being re-written
    steps = two_live(rebuild)
    monkeypatch.setattr(rebuild.executor, "decode", broken)
    with pytest.raises(BackendError, match="neuron decode failed: device error"):
        steps.step({3: (2, make_prompt(3, 4))})
    assert rebuild.kv_usage().seq_ids == frozenset()  # the compiled decode runs every slot


# -- lifecycle --------------------------------------------------------------------------------


def test_health_leaves_every_slot_as_it_was(backend: NeuronBackend) -> None:
    backend.step(new(1, 0, make_prompt(1, 9)))
    keys = keys_of(backend)[0].clone()
    backend.health()
    assert torch.equal(keys_of(backend)[0], keys)
    assert backend.kv_usage().used_tokens == 9


def test_closed_backend_refuses_calls(tiny_model: Path) -> None:
    backend = build(tiny_model, rebuild=False)
    with pytest.raises(BackendError, match=r"warmup\(\) must run before step\(\)"):
        backend.step(new(1, 0, make_prompt(1, 9)))
    backend.warmup(LIMITS)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.step(new(1, 0, make_prompt(1, 9)))
