"""EngineCore's overlapped steps: step N+1's forward runs before step N's tokens land.

The order of events is read off a log both sides write: the backend logs each forward,
and `PendingTokens.wait` (a step's tokens reaching the host) logs a landing.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from tgi.backend.contract import Capabilities, FedTokens, StepOutput, StepPlan
from tgi.engine.core import EngineCore
from tgi.engine.results import StepResult
from tgi.sampling import PendingTokens, SamplingParams

from .test_core import SuccessorBackend, decode, new, successor


class FedBackend(SuccessorBackend):
    """`SuccessorBackend` that takes `FedTokens` (read back here as a device would)."""

    def __init__(self, log: list[str], **options: object) -> None:
        super().__init__(**options)  # type: ignore[arg-type]
        self.log = log
        self.feds: list[dict[int, int]] = []  # per forward: seq_id -> fed token

    @property
    def capabilities(self) -> Capabilities:
        return dataclasses.replace(super().capabilities, fed_tokens=True)

    def step(self, plan: StepPlan, fed: FedTokens | None = None) -> StepOutput:
        self.log.append(f"forward {plan.step_index}")
        fed_tokens = {}
        if fed is not None:
            fed_tokens = {seq_id: int(fed.ids[i]) for seq_id, i in fed.rows.items()}
            running = tuple(
                dataclasses.replace(row, last_token=fed_tokens[row.seq_id])
                if row.seq_id in fed_tokens
                else row
                for row in plan.running
            )
            plan = dataclasses.replace(plan, running=running)
        self.feds.append(fed_tokens)
        return super().step(plan)


class HostBackend(SuccessorBackend):
    """`SuccessorBackend` that logs its forwards and takes no `FedTokens`."""

    def __init__(self, log: list[str]) -> None:
        super().__init__()
        self.log = log

    def step(self, plan: StepPlan) -> StepOutput:
        self.log.append(f"forward {plan.step_index}")
        return super().step(plan)


@pytest.fixture
def log(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    events: list[str] = []
    wait = PendingTokens.wait

    def logged_wait(self: PendingTokens) -> object:
        if not self.done:
            events.append("land")
        return wait(self)

    monkeypatch.setattr(PendingTokens, "wait", logged_wait)
    yield events


def tokens(result: StepResult) -> list[tuple[int, int]]:
    return [(seq_id, token) for seq_id, token, _ in result.tokens]


def test_the_next_forward_runs_before_the_step_before_lands(log: list[str]) -> None:
    backend = FedBackend(log)
    engine = EngineCore(backend, keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4, 5, 6)), new(2, (9,))), step_index=1))
    engine.submit(StepPlan(running=(decode(1, 3), decode(2, 1)), step_index=2))
    assert log == ["forward 1", "forward 2", "land"]
    # step 2 fed on step 1's ids, on the device: the plan left both tokens to the engine
    assert backend.feds[1] == {1: successor(6), 2: successor(9)}
    first = engine.collect()
    assert first.step_index == 1
    assert tokens(first) == [(1, successor(6)), (2, successor(9))]
    engine.submit(StepPlan(new=(new(3, (8,)),), running=(decode(1, 4),), step_index=3))
    second, third = engine.collect(), engine.collect()
    assert log == ["forward 1", "forward 2", "land", "forward 3", "land", "land"]
    assert tokens(second) == [(1, successor(successor(6))), (2, successor(successor(9)))]
    assert tokens(third) == [(3, successor(8)), (1, successor(successor(successor(6))))]
    assert "decode" in second.durations and "prefill" in third.durations
    # each as of its own step: step 2's landed after step 3 admitted seq 3
    assert second.kv.seq_ids == frozenset({1, 2}) and third.kv.seq_ids == frozenset({1, 2, 3})


def test_sampled_rows_draw_the_same_tokens_overlapped_or_in_turn(log: list[str]) -> None:
    """The noise step, the penalties' history and the first sample's prompt all follow
    the step order, whatever lands when."""
    sampling = SamplingParams(
        do_sample=True, seed=5, temperature=1.5, repetition_penalty=1.3, frequency_penalty=0.4
    )
    plans = [StepPlan(new=(new(1, (4, 5), sampling=sampling), new(2, (7,))), step_index=1)]
    plans += [
        StepPlan(running=(decode(1, 1 + i), decode(2, i)), step_index=1 + i) for i in range(1, 6)
    ]
    in_turn = EngineCore(FedBackend([], runner_up=11))
    want = [tokens(in_turn.run(plan)) for plan in plans]
    backend = FedBackend(log, runner_up=11)
    overlapped = EngineCore(backend, keep_in_flight=True)
    overlapped.submit(plans[0])
    got = []
    for plan in plans[1:]:
        overlapped.submit(plan)
        got.append(tokens(overlapped.collect()))
    got.append(tokens(overlapped.collect()))
    assert got == want
    assert sum(map(len, backend.feds)) == 10  # every decode row fed from the device
    assert len({token for step in want for seq_id, token in step if seq_id == 1}) > 1


def test_a_backend_without_fed_tokens_lands_the_step_before_first(log: list[str]) -> None:
    engine = EngineCore(HostBackend(log), keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4, 5, 6)),), step_index=1))
    engine.submit(StepPlan(running=(decode(1, 3),), step_index=2))
    # nothing the next forward could feed on: every step lands before submit returns
    assert log == ["forward 1", "land", "forward 2", "land"]
    first = engine.collect()
    assert tokens(first) == [(1, successor(6))] and not first.kept_in_flight
    second = engine.collect()
    assert not second.errors and tokens(second) == [(1, successor(successor(6)))]


def test_a_plan_that_ends_a_flying_row_lands_it_first(log: list[str]) -> None:
    engine = EngineCore(FedBackend(log), keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4,)), new(2, (9,))), step_index=1))
    engine.submit(StepPlan(running=(decode(2, 1),), finished=(1,), step_index=2))
    assert log == ["forward 1", "land", "forward 2"]
    assert tokens(engine.collect()) == [(1, successor(4)), (2, successor(9))]
    assert tokens(engine.collect()) == [(2, successor(successor(9)))]
    assert engine.num_tracked == 1


def test_rows_with_drafts_land_at_once(log: list[str]) -> None:
    """Acceptance is decided on the host, from this forward's logits."""
    backend = FedBackend(log)
    engine = EngineCore(backend, keep_in_flight=True)
    engine.run(StepPlan(new=(new(1, (2,)),), step_index=1))
    log.clear()
    b = successor(2)
    engine.submit(StepPlan(running=(decode(1, 1, drafts=(successor(b),)),), step_index=2))
    assert log == ["forward 2", "land", "land"]  # its first sample, then its draft's
    engine.submit(StepPlan(running=(decode(1, 3),), step_index=3))
    assert log[-1] == "forward 3" and backend.feds[-1] == {}  # its token came from the host
    assert len(engine.collect().tokens) == 2


def test_a_failed_forward_keeps_the_tokens_of_the_step_before(log: list[str]) -> None:
    backend = FedBackend(log, fail_on_step=2)
    engine = EngineCore(backend, keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4,)), new(2, (9,))), step_index=1))
    engine.submit(StepPlan(running=(decode(1, 1), decode(2, 1)), step_index=2))
    first, failed = engine.collect(), engine.collect()
    assert tokens(first) == [(1, successor(4)), (2, successor(9))]
    # two rows failed together: neither is to blame yet, both are recomputed
    assert sorted(failed.recompute) == [1, 2] and not failed.tokens
    assert set(backend.released) >= {1, 2}


def test_run_refuses_while_submitted_steps_are_not_collected() -> None:
    engine = EngineCore(FedBackend([]), keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4,)),), step_index=1))
    with pytest.raises(RuntimeError, match="not collected"):
        engine.run(StepPlan(running=(decode(1, 1),), step_index=2))
    assert tokens(engine.collect()) == [(1, successor(4))]
    with pytest.raises(RuntimeError, match="without a submitted step"):
        engine.collect()


def test_release_lands_the_step_in_flight_and_keeps_its_result(log: list[str]) -> None:
    engine = EngineCore(FedBackend(log), keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4,)), new(2, (9,))), step_index=1))
    usage = engine.release([2])
    assert log == ["forward 1", "land"] and usage.seq_ids == frozenset({1})
    assert tokens(engine.collect()) == [(1, successor(4)), (2, successor(9))]
    assert engine.num_tracked == 1


def test_on_a_cpu_a_step_lands_before_submit_returns(log: list[str]) -> None:
    """By default a step stays in flight only while its tokens travel from an
    accelerator: on a CPU the next forward would only delay its result."""
    engine = EngineCore(FedBackend(log))
    engine.submit(StepPlan(new=(new(1, (4,)),), step_index=1))
    assert log == ["forward 1", "land"]
    assert not engine.collect().kept_in_flight
    kept = EngineCore(FedBackend([]), keep_in_flight=True)
    kept.submit(StepPlan(new=(new(1, (4,)),), step_index=1))
    assert kept.collect().kept_in_flight


@pytest.fixture
def lost_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first landing fails, as a device error surfacing at the copy's end would."""
    wait = PendingTokens.wait
    failures = [RuntimeError("device lost")]

    def failing_wait(self: PendingTokens) -> object:
        if failures and not self.done:
            self._failed = failures.pop()  # type: ignore[attr-defined]
            raise self._failed  # type: ignore[attr-defined,misc]
        return wait(self)

    monkeypatch.setattr(PendingTokens, "wait", failing_wait)


@pytest.mark.usefixtures("lost_copy")
def test_a_step_that_fails_to_land_recomputes_its_rows_and_the_next_steps() -> None:
    engine = EngineCore(FedBackend([]), keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4,)), new(2, (9,))), step_index=1))
    engine.submit(StepPlan(new=(new(3, (8,)),), running=(decode(1, 1), decode(2, 1)), step_index=2))
    lost, after = engine.collect(), engine.collect()
    assert sorted(lost.recompute) == [1, 2] and not lost.tokens and not lost.errors
    # seq 3 shared a forward that fed on the lost tokens: recomputed, not blamed
    assert after.recompute == [3] and not after.tokens and not after.errors
    # nothing is stuck: the sampler and the engine take the next step
    assert tokens(engine.run(StepPlan(new=(new(5, (6,)),), step_index=3))) == [(5, successor(6))]


@pytest.mark.usefixtures("lost_copy")
def test_a_failed_forward_after_a_failed_landing_fails_each_row_once() -> None:
    engine = EngineCore(FedBackend([], fail_on_step=2), keep_in_flight=True)
    engine.submit(StepPlan(new=(new(1, (4,)),), step_index=1))
    engine.submit(StepPlan(new=(new(2, (9,)),), running=(decode(1, 1),), step_index=2))
    lost, failed = engine.collect(), engine.collect()
    assert list(lost.errors) == [1] and not lost.recompute  # alone in its step: to blame
    assert list(failed.errors) == [2] and not failed.recompute
    assert engine.num_tracked == 0
    assert tokens(engine.run(StepPlan(new=(new(5, (6,)),), step_index=3))) == [(5, successor(6))]
