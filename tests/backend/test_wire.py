"""`tgi.backend.wire`: every message round-trips exactly, and anything else fails loudly."""

from __future__ import annotations

import math
from typing import Any

import msgspec
import pytest
import torch

from tgi.backend.contract import (
    CONTRACT_VERSION,
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    NewSequence,
    RunningSequence,
    StepConstraints,
    StepPlan,
    WarmupReport,
)
from tgi.backend.wire import WireError, decode, decode_any, encode
from tgi.engine.protocol import EngineStats
from tgi.engine.results import StepResult
from tgi.engine.worker.messages import (
    Done,
    Query,
    Release,
    StartWorker,
    WorkerFailure,
    WorkerReady,
)
from tgi.errors import BackendError
from tgi.models.source import ModelKind
from tgi.sampling.params import GrammarSpec, SamplingParams

GRAMMAR = GrammarSpec("json", '{"type": "object", "properties": {"a": {"type": "integer"}}}')
SAMPLED = SamplingParams(
    do_sample=True,
    temperature=0.7,
    top_k=40,
    top_p=0.95,
    seed=2**64 - 1,  # the whole u64 seed range crosses
    typical_p=0.9,
    repetition_penalty=1.2,
    frequency_penalty=0.5,
    watermark=True,
    watermark_gamma=0.25,
    watermark_delta=1.5,
    top_n_tokens=5,
    grammar=GRAMMAR,
)


def rich_plan() -> StepPlan:
    return StepPlan(
        new=(
            NewSequence(
                7,
                (1, 2, 3),
                start_position=16,
                block_ids=(4, 9, 2, 11),
                want_prompt_logits=True,
                adapter_id="sql-lora",
                sampling=SAMPLED,
            ),
            NewSequence(8, (5,) * 40, slot=3, want_logits=False),  # a resumed sequence
        ),
        running=(
            RunningSequence(3, 41, (7, 8, 9), decode=True, last_token=6, new_block_ids=(12,)),
            RunningSequence(4, 16, (1,) * 16, want_logits=False),  # a chunk row
            RunningSequence(5, 10, decode=True),  # planned ahead: the token is not known yet
        ),
        finished=(1, 2),
        preempted=(6,),
        forgotten=(0,),
        step_index=123_456,
    )


def rich_result() -> StepResult:
    return StepResult(
        tokens=[(3, 17, -0.25), (3, 18, -math.inf), (7, 0, 0.0)],
        prompt_logprobs={7: [-1.5, -0.125]},
        errors={9: "injected failure for prompt (6, 6)"},
        durations={"forward": 0.012, "sample": 0.0005},
        top_tokens={7: [(0, -0.1), (5, -2.5)]},
        kv=KVUsage(frozenset({3, 4, 5, 7, 8}), used_tokens=300, capacity_tokens=4096),
        drafts_proposed=3,
        drafts_accepted=2,
        step_index=123_456,
    )


MESSAGES = [
    rich_plan(),
    StepPlan(),  # a plan with nothing in it
    rich_result(),
    StepResult(),
    KVUsage(frozenset({1, 2}), 10, 20),
    WarmupReport(
        KVCapacity(
            total_tokens=4096, bytes_per_token=2048, max_sequences=4, block_size=16, num_blocks=256
        ),
        StepConstraints(
            batch_buckets=(1, 2, 4, 8), length_buckets=(128, 512), max_adapters_per_step=2
        ),
        seconds=12.5,
    ),
    Limits(
        max_input_tokens=1024,
        max_total_tokens=2048,
        max_batch_prefill_tokens=4096,
        max_batch_total_tokens=None,
        max_batch_size=32,
        rank=1,
        world_size=2,
    ),
    Capabilities(
        Batching.STATIC,
        KvLayout.SLOTS,
        static_batch_size=4,
        static_max_length=2048,
        prefill_rebuilds_cache=True,
        samples_on_device=True,
        sampling_parameters=frozenset({"temperature", "top_k", "do_sample"}),
    ),
    # the engine worker's channel (tgi/engine/worker/messages.py)
    StartWorker(
        config_json='{"model_id": "x"}',
        backend="cpu",
        model_id="org/model",
        model_kind=ModelKind.GGUF,
        model_path="/models/x",
        architecture="LlamaForCausalLM",
        max_position_embeddings=8192,
        sha=None,
        eos_token_ids=(2, 7),
        rank=1,
        world_size=2,
    ),
    WorkerReady(
        Capabilities(Batching.CONTINUOUS, KvLayout.PAGED, block_size=16), "bfloat16", "cpu", 42
    ),
    Release((3, 1, 2)),
    Query("health"),
    Done(),
    EngineStats(num_tracked=3, num_histories=1, num_matchers=2),
    WorkerFailure("warmup", "backend", "out of memory"),
]


@pytest.mark.parametrize("message", MESSAGES, ids=lambda m: type(m).__name__)
def test_every_message_round_trips_exactly(message: Any) -> None:
    back = decode(encode(message), type(message))
    assert back == message
    assert type(back) is type(message)


def test_decoded_plans_keep_their_types_not_lookalikes() -> None:
    plan = decode(encode(rich_plan()), StepPlan)
    new, running = plan.new[0], plan.running[0]
    assert type(new) is NewSequence and type(running) is RunningSequence
    assert isinstance(plan.finished, tuple) and isinstance(new.block_ids, tuple)
    assert type(new.sampling) is SamplingParams and type(new.sampling.grammar) is GrammarSpec
    assert new.sampling.seed == 2**64 - 1
    assert plan.logits_rows == rich_plan().logits_rows  # the properties work on it
    assert plan.running[2].last_token is None
    with pytest.raises(AttributeError):  # still frozen and slotted
        new.seq_id = 1  # type: ignore[misc]
    result = decode(encode(rich_result()), StepResult)
    assert isinstance(result.kv.seq_ids, frozenset)
    assert list(result.top_tokens) == [7] and isinstance(result.tokens[0], tuple)
    static = next(m for m in MESSAGES if isinstance(m, Capabilities))
    caps = decode(encode(static), Capabilities)
    assert caps.batching is Batching.STATIC and caps.kv_layout is KvLayout.SLOTS


def test_a_receiver_of_several_kinds_gets_the_one_sent_and_refuses_others() -> None:
    sent = Query("stats")
    assert decode_any(encode(sent), (StepPlan, Query)) == sent
    with pytest.raises(WireError, match="expected a StepPlan or Query message, got a 'Done'"):
        decode_any(encode(Done()), (StepPlan, Query))


def test_a_field_of_the_wrong_type_fails_loudly() -> None:
    frame = msgspec.msgpack.encode(
        ("StepPlan", CONTRACT_VERSION, {"new": [{"seq_id": "7", "token_ids": [1]}]})
    )
    with pytest.raises(WireError, match=r"Expected `int`, got `str` - at `\$.new\[0\].seq_id`"):
        decode(frame, StepPlan)
    missing = msgspec.msgpack.encode(("StepPlan", CONTRACT_VERSION, {"new": [{"seq_id": 7}]}))
    with pytest.raises(WireError, match="missing required field `token_ids`"):
        decode(missing, StepPlan)
    bad_enum = msgspec.msgpack.encode(
        ("Capabilities", CONTRACT_VERSION, {"batching": "dynamic", "kv_layout": "paged"})
    )
    with pytest.raises(WireError, match="Invalid enum value 'dynamic'"):
        decode(bad_enum, Capabilities)


def test_another_message_or_version_or_garbage_is_refused() -> None:
    with pytest.raises(WireError, match="expected a StepPlan message, got a 'StepResult' one"):
        decode(encode(rich_result()), StepPlan)
    old = msgspec.msgpack.encode(("StepPlan", 1, {}))
    with pytest.raises(WireError, match="contract version 1; this process speaks version 2"):
        decode(old, StepPlan)
    with pytest.raises(WireError, match="expected a KVUsage message"):
        decode(b"\xc1 not msgpack", KVUsage)
    with pytest.raises(WireError):
        decode(msgspec.msgpack.encode({"new": []}), StepPlan)  # no envelope
    assert issubclass(WireError, BackendError)


def test_only_plain_data_is_encoded() -> None:
    tensor_row = NewSequence(1, torch.tensor([1, 2]))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="Tensor"):
        encode(StepPlan(new=(tensor_row,)))
    with pytest.raises(TypeError, match="GrammarSpec does not cross the wire"):
        encode(GRAMMAR)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="NewSequence does not cross the wire"):
        decode(b"", NewSequence)  # type: ignore[type-var]


def test_no_pickle_anywhere_on_the_wire() -> None:
    payload = encode(rich_plan())
    # the frame is plain msgpack: any msgpack reader sees [name, version, fields]
    name, version, fields = msgspec.msgpack.decode(payload)
    assert (name, version) == ("StepPlan", CONTRACT_VERSION)
    assert fields["new"][0]["sampling"]["grammar"] == {"kind": "json", "source": GRAMMAR.source}
