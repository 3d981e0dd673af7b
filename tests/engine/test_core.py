"""EngineCore: one backend step per plan, sampling, drafts, device-sampled ids, failures."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    KvLayout,
    KVUsage,
    Limits,
    NewSequence,
    RunningSequence,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.engine.core import EngineCore
from tgi.errors import BackendError
from tgi.sampling import SamplingParams

VOCAB = 50


def successor(token: int) -> int:
    return (token * 7 + 3) % VOCAB


class SuccessorBackend:
    """Logits whose argmax at every position is `successor(input token)`; records plans."""

    def __init__(
        self,
        *,
        on_device: bool = False,
        fail_on_step: int | None = None,
        runner_up: int | None = None,
    ) -> None:
        self.runner_up = runner_up  # a token one logit below the successor, everywhere
        self.plans: list[StepPlan] = []
        self.live: dict[int, int] = {}
        self.on_device = on_device
        self.fail_on_step = fail_on_step
        self.released: list[int] = []

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(
            batching=Batching.CONTINUOUS,
            kv_layout=KvLayout.PER_ROW,
            speculation=True,
            samples_on_device=self.on_device,
            sampling_parameters=frozenset({"do_sample"}),
        )

    def warmup(self, limits: Limits) -> WarmupReport:
        raise NotImplementedError

    def step(self, plan: StepPlan) -> StepOutput:
        self.plans.append(plan)
        for seq_id in (*plan.finished, *plan.preempted):
            self.live.pop(seq_id, None)
        if self.fail_on_step == len(self.plans):
            raise BackendError("injected failure")
        rows = plan.logits_rows
        width = max((row.num_logits for row in rows), default=1)
        logits = torch.zeros(len(rows), width, VOCAB)
        for r, row in enumerate(rows):
            ids = row.input_ids[-row.num_logits :]
            for t, token in enumerate(ids):
                if self.runner_up is not None:
                    logits[r, t, self.runner_up] = 9.0
                logits[r, t, successor(token)] = 10.0
        for row in plan.rows:
            self.live[row.seq_id] = row.start_position + len(row.input_ids)
        ids = tuple(row.seq_id for row in rows)
        if self.on_device:
            return StepOutput(ids, None, token_ids=logits[:, 0].argmax(-1))
        return StepOutput(ids, logits)

    def release(self, seq_ids: Sequence[int]) -> None:
        self.released.extend(seq_ids)
        for seq_id in seq_ids:
            self.live.pop(seq_id, None)

    def kv_usage(self) -> KVUsage:
        return KVUsage(frozenset(self.live), sum(self.live.values()), 1000)

    def health(self) -> None: ...

    def close(self) -> None: ...


def new(seq_id: int, prompt: tuple[int, ...], **values: object) -> NewSequence:
    return NewSequence(seq_id=seq_id, token_ids=prompt, **values)  # type: ignore[arg-type]


def decode(seq_id: int, position: int, drafts: tuple[int, ...] = ()) -> RunningSequence:
    return RunningSequence(seq_id, position, token_ids=drafts, decode=True)


def test_a_mixed_step_is_one_backend_call_and_decode_rows_get_their_token() -> None:
    backend = SuccessorBackend()
    engine = EngineCore(backend)
    first = engine.run(StepPlan(new=(new(1, (4, 5, 6)),), step_index=1))
    assert first.tokens == [(1, successor(6), pytest.approx(0.0, abs=1e-2))]
    # one plan: a new sequence, a decode row whose token the plan leaves to the engine,
    # and a chunk row that asks for no logits
    plan = StepPlan(
        new=(new(2, (9,)), new(3, (1, 2), want_logits=False)),
        running=(decode(1, 3),),
        step_index=2,
    )
    result = engine.run(plan)
    assert len(backend.plans) == 2
    sent = backend.plans[-1].running[0]
    assert sent.last_token == successor(6)  # filled in by the engine
    assert [(s, t) for s, t, _ in result.tokens] == [
        (2, successor(9)),
        (1, successor(successor(6))),
    ]
    assert result.kv.seq_ids == frozenset({1, 2, 3})
    assert "prefill" in result.durations


def test_drafts_are_accepted_while_they_equal_the_samples() -> None:
    backend = SuccessorBackend()
    engine = EngineCore(backend)
    engine.run(StepPlan(new=(new(1, (2,)),)))
    a = successor(2)  # pending token
    b, c = successor(a), successor(successor(a))
    good = engine.run(StepPlan(running=(decode(1, 1, drafts=(b, c)),)))
    assert [t for _, t, _ in good.tokens] == [b, c, successor(c)]
    assert (good.drafts_proposed, good.drafts_accepted) == (2, 2)
    pending = successor(c)
    wrong = engine.run(StepPlan(running=(decode(1, 4, drafts=(0, 1)),)))
    assert [t for _, t, _ in wrong.tokens] == [successor(pending)]
    assert (wrong.drafts_proposed, wrong.drafts_accepted) == (2, 0)


def test_tokens_sampled_on_the_device_are_taken_as_they_are() -> None:
    engine = EngineCore(SuccessorBackend(on_device=True))
    result = engine.run(StepPlan(new=(new(1, (3,)), new(2, (8,)))))
    assert [(s, t) for s, t, _ in result.tokens] == [(1, successor(3)), (2, successor(8))]


def test_a_failed_step_retries_its_rows_once_as_suspects() -> None:
    backend = SuccessorBackend(fail_on_step=2)
    engine = EngineCore(backend)
    engine.run(StepPlan(new=(new(1, (2,)),)))
    failed = engine.run(StepPlan(new=(new(2, (5,)),), running=(decode(1, 1),)))
    # nothing says which row raised: both are recomputed (tests/engine/test_step_retry.py)
    assert not failed.errors and failed.recompute == [2, 1]
    assert set(backend.released) >= {1, 2} and engine.num_tracked == 1  # 2 sampled nothing
    # a plan made before the failure was known still decodes sequence 1: dropped
    after = engine.run(StepPlan(new=(new(3, (7,)),), running=(decode(1, 2),)))
    assert [s for s, _, _ in after.tokens] == [3]
    assert [row.seq_id for row in backend.plans[-1].rows] == [3]
    # recomputed from its tokens, it decodes on as if nothing had happened
    pending = successor(2)
    engine.run(StepPlan(new=(new(1, (2,), want_logits=False),)))
    resumed = engine.run(StepPlan(running=(decode(1, 1),)))
    assert [t for _, t, _ in resumed.tokens] == [successor(pending)]


def test_a_failed_one_row_step_fails_its_row() -> None:
    backend = SuccessorBackend(fail_on_step=3)
    engine = EngineCore(backend)
    engine.run(StepPlan(new=(new(1, (2,)),)))
    engine.run(StepPlan(running=(decode(1, 1),)))
    failed = engine.run(StepPlan(running=(decode(1, 2),)))
    assert set(failed.errors) == {1} and not failed.recompute
    assert engine.num_tracked == 0


def test_a_preempted_sequence_keeps_its_sampling_state() -> None:
    seeded = SamplingParams(do_sample=True, seed=11, temperature=0.9)
    alone = EngineCore(SuccessorBackend())
    alone.run(StepPlan(new=(new(1, (2, 3), sampling=seeded),)))
    straight = [alone.run(StepPlan(running=(decode(1, 2 + i),))).tokens for i in range(3)]

    engine = EngineCore(SuccessorBackend())
    first = engine.run(StepPlan(new=(new(1, (2, 3), sampling=seeded),)))
    out = [engine.run(StepPlan(running=(decode(1, 2),))).tokens]
    engine.run(StepPlan(preempted=(1,)))
    history = (2, 3, first.tokens[0][1])
    engine.run(StepPlan(new=(new(1, history, sampling=seeded, want_logits=False),)))
    out += [engine.run(StepPlan(running=(decode(1, 3 + i),))).tokens for i in range(2)]
    assert [t for ((_, t, _),) in out] == [t for ((_, t, _),) in straight]


def test_a_sequence_preempted_before_its_first_token_starts_its_history_afresh() -> None:
    """Its first admission fed only a chunk; the recompute sends the whole prompt, and
    the penalty must see exactly that prompt (31 = successor(4) is in it, 0 is not)."""
    penalised = SamplingParams(repetition_penalty=2.0)
    prompt = (1, 2, 31, 4)
    assert successor(4) == 31
    alone = EngineCore(SuccessorBackend(runner_up=0))
    straight = alone.run(StepPlan(new=(new(1, prompt, sampling=penalised),)))
    assert [t for _, t, _ in straight.tokens] == [0]  # 31 was seen: 10 / 2 < 9

    engine = EngineCore(SuccessorBackend(runner_up=0))
    engine.run(StepPlan(new=(new(1, prompt[:2], sampling=penalised, want_logits=False),)))
    engine.run(StepPlan(preempted=(1,)))
    again = engine.run(StepPlan(new=(new(1, prompt, sampling=penalised),)))
    assert [t for _, t, _ in again.tokens] == [0]


def test_a_plan_made_before_a_failure_does_not_release_its_rows_twice() -> None:
    backend = SuccessorBackend(fail_on_step=2)
    engine = EngineCore(backend)
    engine.run(StepPlan(new=(new(1, (2,)),)))
    engine.run(StepPlan(new=(new(2, (5,)),), running=(decode(1, 1),)))  # fails
    assert backend.released.count(2) == 1
    # planned ahead before the failure was known: it names 2 as finished
    engine.run(StepPlan(new=(new(3, (6,)),), finished=(2,)))
    assert all(2 not in plan.finished for plan in backend.plans[2:])
    assert backend.released.count(2) == 1
