"""`FakeBackend` and `FakeDeviceSamplingBackend`: they pass the conformance suite, and
refuse the plans a real backend could not run (hard step constraints first)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from tgi.backend.contract import (
    Backend,
    NewSequence,
    RunningSequence,
    StepConstraints,
    StepPlan,
)
from tgi.errors import BackendError
from tgi.sampling.params import SamplingParams
from tgi.testing.conformance import SUITE_LIMITS, BackendConformance, Driver
from tgi.testing.fake_backend import (
    DEVICE_SAMPLED_LOGPROB,
    FakeBackend,
    FakeDeviceSamplingBackend,
    device_expected_tokens,
    expected_tokens,
)

VOCAB = 64


class FakeReference:
    """The oracle for `FakeBackend`, in `ReferenceModel`'s shape."""

    vocab_size = VOCAB

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        return expected_tokens(prompt, max_new_tokens, VOCAB)

    def prompt_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        out = torch.zeros(len(prompt), VOCAB)
        for i in range(len(prompt)):
            out[i, expected_tokens(prompt[: i + 1], 1, VOCAB)[0]] = 10.0
        return out


class _FakeConformance(BackendConformance):
    @pytest.fixture(scope="class", params=["fake"])
    @classmethod
    def architecture(cls, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tmp_path_factory.mktemp("no-model")

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls) -> FakeReference:  # type: ignore[override]
        return FakeReference()


class TestFakeBackendConformance(_FakeConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return lambda _: FakeBackend(VOCAB, capacity_tokens=320)


class TestFakeDeviceSamplingBackendConformance(_FakeConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return lambda _: FakeDeviceSamplingBackend(VOCAB, capacity_tokens=320)


class TestFakeBackendWithBucketsConformance(_FakeConformance):
    """Buckets wide enough for the suite: the Driver keeps within `max_rows`."""

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        constraints = StepConstraints(batch_buckets=(1, 2, 4), length_buckets=(16, 64))
        return lambda _: FakeBackend(VOCAB, capacity_tokens=320, constraints=constraints)


def _warm(backend: FakeBackend) -> Driver:
    return Driver(backend, backend.warmup(SUITE_LIMITS))


def test_warmup_reports_the_declared_constraints() -> None:
    constraints = StepConstraints(batch_buckets=(1, 2), length_buckets=(8,), max_rows_per_step=2)
    report = FakeBackend(VOCAB, constraints=constraints).warmup(SUITE_LIMITS)
    assert report.constraints == constraints
    assert (report.kv.total_tokens, report.kv.bytes_per_token) == (4096, 4)


def test_more_rows_than_the_largest_batch_bucket_raise() -> None:
    backend = FakeBackend(VOCAB, constraints=StepConstraints(batch_buckets=(1, 2)))
    driver = _warm(backend)
    driver.prefill({1: [1, 2], 2: [3, 4]})  # two rows: the largest bucket
    with pytest.raises(BackendError, match="3 rows in one step; the backend runs 2"):
        driver.step(prompts={3: [5]}, decode=[1, 2])
    assert backend.kv_usage().seq_ids == frozenset({1, 2})  # refused before any change


def test_max_rows_per_step_caps_below_the_buckets() -> None:
    constraints = StepConstraints(batch_buckets=(1, 2, 4), max_rows_per_step=3)
    driver = _warm(FakeBackend(VOCAB, constraints=constraints))
    driver.prefill({1: [1], 2: [2], 3: [3]})
    with pytest.raises(BackendError, match="4 rows in one step; the backend runs 3"):
        driver.step(prompts={4: [4]}, decode=[1, 2, 3])


def test_a_first_chunk_longer_than_the_largest_length_bucket_raises() -> None:
    backend = FakeBackend(VOCAB, constraints=StepConstraints(length_buckets=(4, 8)))
    driver = _warm(backend)
    driver.prefill({1: list(range(8))})
    with pytest.raises(
        BackendError, match="first chunk of 9 tokens; the longest length bucket is 8"
    ):
        driver.prefill({2: list(range(9))})


def test_too_many_tokens_or_adapters_in_one_step_raise() -> None:
    driver = _warm(FakeBackend(VOCAB, constraints=StepConstraints(max_tokens_per_step=6)))
    with pytest.raises(BackendError, match="7 tokens in one step"):
        driver.prefill({1: [1, 2, 3], 2: [4, 5, 6, 7]})
    backend = FakeBackend(VOCAB, constraints=StepConstraints(max_adapters_per_step=1))
    backend.warmup(SUITE_LIMITS)
    backend.step(StepPlan(new=(NewSequence(1, (1,), adapter_id="a"),)))
    joined = NewSequence(2, (2,), adapter_id="b")
    with pytest.raises(BackendError, match=r"adapters \['a', 'b'\] in one step"):
        backend.step(
            StepPlan(new=(joined,), running=(RunningSequence(1, 1, decode=True, last_token=3),))
        )


def test_plans_a_real_backend_could_not_run_raise() -> None:
    backend = FakeBackend(VOCAB)
    driver = _warm(backend)
    driver.prefill({1: [1, 2, 3]})
    bad = {
        "already held": StepPlan(new=(NewSequence(1, (4,)),)),
        "two rows": StepPlan(running=(driver.decode_row(1), driver.decode_row(1))),
        "step at 2, KV holds 3": StepPlan(
            running=(RunningSequence(1, 2, decode=True, last_token=4),)
        ),
        "carries drafts; no speculation": StepPlan(running=(driver.decode_row(1, (5,)),)),
        "chunk row; no chunked_prefill": StepPlan(running=(RunningSequence(1, 3, (9,)),)),
        "no prefix cache": StepPlan(new=(NewSequence(2, (4,), start_position=2),)),
        "without a token": StepPlan(running=(RunningSequence(1, 3, decode=True),)),
        "does not hold": StepPlan(finished=(7,)),
    }
    for message, plan in bad.items():
        with pytest.raises(BackendError, match=message):
            backend.step(plan)
    assert backend.kv == {1: [1, 2, 3]}


def test_calls_log_prefill_then_decode_rows_of_each_step() -> None:
    backend = FakeBackend(VOCAB)
    driver = _warm(backend)
    driver.prefill({1: [1, 2]})
    driver.step(prompts={2: [3]}, decode=[1])
    driver.finish([1, 2])
    driver.flush()
    assert backend.calls == [("prefill", (1,)), ("prefill", (2,)), ("decode", (1,))]
    assert backend.released == [1, 2]
    assert len(backend.plans) == 3


def test_injected_failures_and_health() -> None:
    backend = FakeBackend(VOCAB, fail_prompts=[(6, 6)])
    driver = _warm(backend)
    with pytest.raises(BackendError, match="injected failure"):
        driver.prefill({1: [6, 6]})
    backend.health()
    backend.healthy = False
    with pytest.raises(BackendError, match="unhealthy"):
        backend.health()


def test_the_device_sampler_returns_token_ids_and_no_logits() -> None:
    backend = FakeDeviceSamplingBackend(VOCAB)
    backend.warmup(SUITE_LIMITS)
    sampled = SamplingParams(do_sample=True, temperature=0.5, seed=7)
    out = backend.step(
        StepPlan(new=(NewSequence(1, (1, 2, 3)), NewSequence(2, (1, 2, 3), sampling=sampled)))
    )
    assert out.logits is None and out.seq_ids == (1, 2)
    assert out.token_ids is not None and out.logprobs is not None
    assert out.token_ids.tolist() == [
        expected_tokens([1, 2, 3], 1, VOCAB)[0],
        device_expected_tokens([1, 2, 3], 1, VOCAB, sampled)[0],
    ]
    assert out.logprobs.tolist() == [0.0, DEVICE_SAMPLED_LOGPROB]


def test_the_device_sampler_refuses_parameters_it_does_not_honour() -> None:
    backend = FakeDeviceSamplingBackend(VOCAB, sampling_parameters=frozenset({"do_sample"}))
    backend.warmup(SUITE_LIMITS)
    penalised = SamplingParams(repetition_penalty=1.3)
    with pytest.raises(BackendError, match=r"asks for \['repetition_penalty'\]"):
        backend.step(StepPlan(new=(NewSequence(1, (1,), sampling=penalised),)))


def test_a_seeded_device_sampler_resumes_where_it_was_preempted() -> None:
    backend = FakeDeviceSamplingBackend(VOCAB)
    driver = _warm(backend)
    sampling = SamplingParams(do_sample=True, seed=3)
    driver.prefill({1: [4, 5]}, sampling=sampling)
    driver.generate({1: 4})
    driver.preempt([1])
    driver.flush()
    driver.resume(1)
    assert driver.plans[-1].new[0].sampling == sampling
    driver.generate({1: 8})
    assert driver.tokens(1) == device_expected_tokens([4, 5], 8, VOCAB, sampling)
