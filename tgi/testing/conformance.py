"""The backend conformance suite (contract v2): every backend, in-tree or third-party, runs it.

Use it by subclassing in the backend's tests and providing one fixture:

    from tgi.testing import BackendConformance

    class TestMyBackendConformance(BackendConformance):
        @pytest.fixture
        def backend_factory(self):
            return lambda model_dir: MyBackend(model_dir, dtype=torch.float32)

The factory gets a tiny random model directory (config.json, safetensors, tokenizer;
see `tgi.testing.tiny_models`) and returns a backend *before* warmup: the suite warms
it with `limits` itself, because what warmup reports is part of what it checks. Override
the `architecture` fixture to narrow the presets, `limits` for static shapes, and
`reference_dtype` when the backend does not compute in float32.

NOTE: the oracle is transformers' own `generate(do_sample=False)` on the same weights
(`ReferenceModel`). `Driver` (`tgi.testing.driver`) plays a minimal router that sends
exactly what the real one sends: changes-only step plans (full block tables for new
sequences, appended blocks for running ones, ended ids in the next plan), so the tests
below read like the scheduler's own sequence of steps.

Every test that steps the backend runs in up to three variants:

    direct   the suite calls the backend object the factory built
    wire     the same, but each plan, each step's result and KV usage, the limits and
             the warmup report cross `tgi.backend.wire` (msgpack) as they would
             between a router and an engine process
    worker   the backend runs in an engine worker process (`tgi.engine.worker`), built
             there by the plugin as `tgi serve` builds it; the suite sends each plan to
             the `WorkerEngine` and takes the tokens its sampler picked (greedy)

`wire` and `worker` run on the first tiny preset only (`runs_wire`, `runs_worker`):
the encoding does not depend on the model, and the template backend's O(n^2) steps
make a second pass over every preset cost minutes. `worker` runs only for a subclass
that provides the `worker_start` fixture (the `StartWorker` message `tgi serve` would
send; `tgi.testing.worker.start_worker` builds it), and checks that the worker built a
backend with the capabilities of the factory's. One worker serves a whole class
(spawning one costs seconds); each test releases what it left, and the worker must
then hold nothing. There are no logits in that variant: the tests that read logits or
prompt logits skip it, the rest check tokens, KV usage and releases as in `direct`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import cast

import pytest
import torch

from tgi.backend.contract import (
    Backend,
    Batching,
    FedStepBackend,
    FedTokens,
    KVCapacity,
    KvLayout,
    Limits,
    NewSequence,
    RunningSequence,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.engine.worker.messages import StartWorker
from tgi.sampling.params import SamplingParams
from tgi.testing.driver import Driver, round_trip
from tgi.testing.reference import ReferenceModel, make_prompt
from tgi.testing.tiny_models import TINY_PRESETS, build_tiny_model
from tgi.testing.worker import EngineBackend, SuiteWorker

__all__ = ["SUITE_LIMITS", "BackendConformance", "Driver", "ReferenceModel", "make_prompt"]

SUITE_LIMITS = Limits(
    max_input_tokens=40,
    max_total_tokens=80,
    max_batch_prefill_tokens=160,
    max_batch_total_tokens=320,  # small, so the capacity test can fill it completely
    max_batch_size=8,
)
# The capacity test fills at most this many tokens; a backend reporting more under
# SUITE_LIMITS (whose max_batch_total_tokens asks for 320) gets a failure, not a skip.
MAX_FILL_TOKENS = 4096
_SAMPLING_FIELDS = frozenset(SamplingParams.__dataclass_fields__)
VARIANTS = ("direct", "wire", "worker")
_NO_LOGITS = "the worker variant returns sampled tokens, not logits"


class BackendConformance:
    """Contract tests; subclass as `Test...` and provide the `backend_factory` fixture."""

    limits: Limits = SUITE_LIMITS
    reference_dtype: torch.dtype = torch.float32
    max_new_tokens: int = 12

    # -- fixtures ----------------------------------------------------------------------------

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        """Override: return a callable that builds an un-warmed backend for a model dir."""
        pytest.fail(f"{type(self).__name__} must provide a `backend_factory` fixture")

    @pytest.fixture(scope="class", params=sorted(TINY_PRESETS))
    @classmethod
    def architecture(cls, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, architecture: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return build_tiny_model(tmp_path_factory.mktemp(f"tiny-{architecture}"), architecture)

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls, model_dir: Path) -> ReferenceModel:
        return ReferenceModel(model_dir, cls.reference_dtype)

    @pytest.fixture
    def backend(
        self, backend_factory: Callable[[Path], Backend], model_dir: Path
    ) -> Iterator[Backend]:
        built = backend_factory(model_dir)
        try:
            yield built
        finally:
            built.close()

    @pytest.fixture(scope="class")
    @classmethod
    def worker_start(cls, model_dir: Path) -> StartWorker | None:
        """Override to run the `worker` variant: the `StartWorker` that `tgi serve` would
        send for `model_dir`, selecting the backend the factory builds
        (`tgi.testing.worker.start_worker`). None skips the variant."""
        return None

    @pytest.fixture(scope="class")
    @classmethod
    def worker(cls, worker_start: StartWorker | None) -> Iterator[SuiteWorker]:
        """One worker for the class (per architecture), warmed once with `limits`."""
        if worker_start is None:
            pytest.skip(f"{cls.__name__} provides no worker_start fixture")
        spawned = SuiteWorker.spawn(worker_start, cls.limits)
        try:
            yield spawned
        finally:
            spawned.engine.close()

    def runs_wire(self, architecture: str) -> bool:
        """Whether the `wire` variant runs on `architecture`: the first tiny preset, and
        any architecture of a subclass's own (override to widen)."""
        return architecture not in TINY_PRESETS or architecture == min(TINY_PRESETS)

    def runs_worker(self, architecture: str) -> bool:
        """Whether the `worker` variant runs on `architecture`; as `runs_wire`."""
        return architecture not in TINY_PRESETS or architecture == min(TINY_PRESETS)

    @pytest.fixture(params=VARIANTS)
    def variant(self, request: pytest.FixtureRequest, architecture: str) -> str:
        """How the suite reaches the backend: "direct", "wire" or "worker"."""
        if request.param == "wire" and not self.runs_wire(architecture):
            pytest.skip(f"the wire round trip runs on {min(TINY_PRESETS)} only (runs_wire)")
        if request.param == "worker" and not self.runs_worker(architecture):
            pytest.skip(f"the worker variant runs on {min(TINY_PRESETS)} only (runs_worker)")
        return str(request.param)

    @pytest.fixture
    def wire(self, variant: str) -> bool:
        """Whether plans cross `tgi.backend.wire` in this process (for subclasses' own
        tests written against the two-variant suite)."""
        return variant == "wire"

    @pytest.fixture
    def served(self, request: pytest.FixtureRequest, variant: str) -> Backend:
        """What a test calls as the backend: the factory's backend, or in the worker
        variant the class's worker engine (`EngineBackend`), once it is known to run
        the factory's kind of backend."""
        if variant != "worker":
            return request.getfixturevalue("backend")  # type: ignore[no-any-return]
        worker: SuiteWorker = request.getfixturevalue("worker")
        if worker.factory_capabilities is None:  # build the factory's backend once a class
            worker.factory_capabilities = request.getfixturevalue("backend").capabilities
        worker.check_built_like(worker.factory_capabilities)
        return EngineBackend(worker.engine)

    @pytest.fixture
    def report(self, request: pytest.FixtureRequest, served: Backend, variant: str) -> WarmupReport:
        if variant == "worker":  # warmed once, when the class's worker started
            return request.getfixturevalue("worker").report  # type: ignore[no-any-return]
        if variant == "direct":
            return served.warmup(self.limits)
        return round_trip(served.warmup(round_trip(self.limits)))

    @pytest.fixture
    def capacity(self, report: WarmupReport) -> KVCapacity:
        return report.kv

    @pytest.fixture
    def driver(
        self, request: pytest.FixtureRequest, served: Backend, report: WarmupReport, variant: str
    ) -> Iterator[Driver]:
        if variant != "worker":
            yield Driver(served, report, wire=variant == "wire")
            return
        worker: SuiteWorker = request.getfixturevalue("worker")
        driver = Driver(served, report, engine=worker.engine)
        yield driver
        driver.release_all()  # the next test shares the worker: it starts from nothing
        worker.check_idle()

    def _prompts(self, vocab_size: int, lengths: Sequence[int]) -> dict[int, list[int]]:
        return {100 + i: make_prompt(i, n, vocab_size) for i, n in enumerate(lengths)}

    def _solo(self, driver: Driver, seq_id: int, prompt: list[int], num_tokens: int) -> list[int]:
        driver.prefill({seq_id: prompt})
        driver.generate({seq_id: num_tokens})
        tokens = driver.tokens(seq_id)
        driver.finish([seq_id])
        driver.flush()
        return tokens

    @staticmethod
    def _num_rows(out: StepOutput) -> int:
        return len(out.seq_ids)

    # -- capabilities and warmup ---------------------------------------------------------------

    def test_capabilities_are_self_consistent(self, backend: Backend) -> None:
        caps = backend.capabilities
        assert isinstance(backend, Backend)
        assert isinstance(caps.batching, Batching) and isinstance(caps.kv_layout, KvLayout)
        if caps.kv_layout is KvLayout.PAGED:
            assert caps.block_size is not None and caps.block_size > 0
        if caps.batching is Batching.STATIC or caps.kv_layout is KvLayout.SLOTS:
            assert caps.static_batch_size is not None and caps.static_batch_size > 0
            assert caps.static_max_length is not None and caps.static_max_length > 0
        if caps.prefill_rebuilds_cache:
            assert caps.batching is Batching.STATIC
        if caps.samples_on_device:
            assert caps.sampling_parameters, "a device sampler names the fields it honours"
            assert caps.sampling_parameters <= _SAMPLING_FIELDS, caps.sampling_parameters
            # StepOutput.token_ids is [R]: one token per row, so no drafts to verify
            assert not caps.speculation, "samples_on_device returns one token per row"
        assert backend.capabilities == caps  # fixed for the life of the backend

    def test_warmup_reports_capacity_that_fits_one_full_sequence(
        self, served: Backend, report: WarmupReport
    ) -> None:
        backend = served
        capacity, constraints = report.kv, report.constraints
        assert capacity.total_tokens >= self.limits.max_total_tokens
        assert capacity.bytes_per_token > 0
        if backend.capabilities.kv_layout is KvLayout.PAGED:
            assert capacity.block_size == backend.capabilities.block_size
            assert capacity.num_blocks is not None and capacity.block_size is not None
            assert capacity.num_blocks * capacity.block_size >= capacity.total_tokens
        if backend.capabilities.static_batch_size is not None:
            assert capacity.max_sequences is not None
            assert capacity.max_sequences <= backend.capabilities.static_batch_size
        for sizes in (
            constraints.batch_buckets,
            constraints.length_buckets,
            constraints.graph_batch_sizes,
        ):
            assert list(sizes) == sorted(set(sizes)) and all(s > 0 for s in sizes), sizes
        assert constraints.max_rows is None or constraints.max_rows >= 1
        if not backend.capabilities.chunked_prefill and constraints.max_chunk is not None:
            # without chunks the longest prompt must fit one length bucket
            assert constraints.max_chunk >= self.limits.max_input_tokens
        assert report.seconds >= 0
        usage = backend.kv_usage()
        assert usage.seq_ids == frozenset() and usage.used_tokens == 0
        assert usage.capacity_tokens == capacity.total_tokens

    def test_health_is_callable_between_steps_without_side_effects(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        prompt = make_prompt(7, 11, reference.vocab_size)
        expected = reference.greedy(prompt, self.max_new_tokens)
        driver.backend.health()
        driver.prefill({1: prompt})
        driver.backend.health()
        driver.generate({1: len(expected)})
        assert driver.tokens(1) == expected
        assert driver.kv_usage().used_tokens == len(prompt) + len(expected) - 1

    # -- correctness against transformers ------------------------------------------------------

    def test_prefill_then_decode_matches_transformers_generate(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        prompt = make_prompt(1, 17, reference.vocab_size)
        expected = reference.greedy(prompt, self.max_new_tokens)
        assert len(expected) >= 2, "the reference stopped at once; pick another prompt seed"
        out = driver.prefill({1: prompt})
        assert out.seq_ids == (1,)
        if out.logits is not None:
            assert tuple(out.logits.shape) == (1, 1, reference.vocab_size)
            assert out.logits.is_floating_point()
        driver.generate({1: len(expected)})
        assert driver.tokens(1) == expected

    def test_rows_of_different_lengths_decode_together_as_alone(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        prompts = self._prompts(reference.vocab_size, (3, 19, 9))
        expected = {s: reference.greedy(p, self.max_new_tokens) for s, p in prompts.items()}
        # Seq ids are never reused after they end, so the solo runs take their own.
        alone = {s: self._solo(driver, s + 1000, p, len(expected[s])) for s, p in prompts.items()}
        assert alone == expected
        out = driver.prefill(prompts)
        assert set(out.seq_ids) == set(prompts) and self._num_rows(out) == len(prompts)
        driver.generate({s: len(tokens) for s, tokens in expected.items()})
        assert {s: driver.tokens(s) for s in prompts} == expected

    def test_row_joining_mid_stream_matches_running_alone(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        first, second = (
            make_prompt(3, 13, reference.vocab_size),
            make_prompt(4, 6, reference.vocab_size),
        )
        expected_first = reference.greedy(first, self.max_new_tokens)
        expected_second = reference.greedy(second, self.max_new_tokens)
        assert len(expected_first) > 4, "the reference stopped early; pick another prompt seed"
        assert self._solo(driver, 1, first, len(expected_first)) == expected_first
        assert self._solo(driver, 2, second, len(expected_second)) == expected_second
        driver.prefill({11: first})
        driver.generate({11: 4})
        driver.prefill({12: second})  # joins while 11 is mid-stream
        driver.generate({11: len(expected_first), 12: len(expected_second)})
        assert driver.tokens(11) == expected_first
        assert driver.tokens(12) == expected_second

    def test_chunked_prefill_matches_one_shot_prefill(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """A NewSequence's first chunk, a chunk row, then the last chunk row's logits."""
        if not driver.caps.chunked_prefill:
            pytest.skip("backend does not declare chunked_prefill")
        prompt = make_prompt(5, 23, reference.vocab_size)
        expected = reference.greedy(prompt, self.max_new_tokens)
        first = driver.prefill_chunk(1, prompt[:7], last=False)
        assert first.seq_ids == () and (first.logits is None or first.logits.shape[0] == 0)
        middle = driver.prefill_chunk(1, prompt[7:15], last=False)
        assert middle.seq_ids == ()
        assert driver.kv_usage().used_tokens == 15
        driver.prefill_chunk(1, prompt[15:], last=True)
        driver.generate({1: len(expected)})
        assert driver.tokens(1) == expected

    def test_prompt_logits_cover_every_prompt_position(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        if not driver.caps.prompt_logits:
            pytest.skip("backend does not declare prompt_logits")
        if driver.engine is not None:
            pytest.skip(_NO_LOGITS)
        prompts = self._prompts(reference.vocab_size, (9, 4))
        out = driver.send(
            [
                driver.new_row(100, prompts[100], want_prompt_logits=True),
                driver.new_row(101, prompts[101]),
            ],
            [],
        )
        assert set(out.prompt_logits) == {100}
        got = out.prompt_logits[100].float()
        assert tuple(got.shape) == (9, reference.vocab_size)
        want = reference.prompt_logits(prompts[100])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        if out.logits is not None:
            torch.testing.assert_close(got[-1], out.logits[0, 0].float(), atol=2e-3, rtol=2e-3)

    def test_rows_without_want_logits_get_no_logits_row(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        prompts = self._prompts(reference.vocab_size, (5, 8))
        out = driver.send(
            [
                driver.new_row(100, prompts[100], want_logits=False),
                driver.new_row(101, prompts[101]),
            ],
            [],
        )
        assert out.seq_ids == (101,)
        if out.logits is not None:
            assert out.logits.shape[0] == 1
        assert driver.kv_usage().seq_ids == frozenset({100, 101})

    def test_mixed_step_matches_separate_steps(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """One plan holding a new sequence, a chunk row (when chunked prefill is
        declared) and decode rows gives the tokens of the same work in separate steps."""
        chunked = driver.caps.chunked_prefill
        prompts = self._prompts(reference.vocab_size, (6, 11, 14, 5))
        want = {s: reference.greedy(p, 8) for s, p in prompts.items()}
        runs = {}
        for offset, mixed in ((0, False), (10, True)):
            a, b, c, d = (s + offset for s in prompts)
            pa, pb, pc, pd = prompts.values()
            driver.prefill({a: pa, b: pb})
            driver.generate({a: 3, b: 3})
            if chunked:
                driver.prefill_chunk(c, pc[:5], last=False)
            else:
                driver.prefill({c: pc})
            if mixed:
                out = driver.step(
                    prompts={d: pd},
                    chunks={c: (pc[5:], True)} if chunked else None,
                    decode=[a, b],
                )
                plan = driver.plans[-1]
                assert [r.seq_id for r in plan.new] == [d]
                kinds = [(r.seq_id, r.decode) for r in plan.running]
                assert kinds == [(c, False)] * chunked + [(a, True), (b, True)]
                assert set(out.seq_ids) == ({a, b, c, d} if chunked else {a, b, d})
            else:
                driver.prefill({d: pd})
                if chunked:
                    driver.prefill_chunk(c, pc[5:], last=True)
                driver.decode([a, b])
            ids = (a, b, c, d)
            driver.generate({s: len(w) for s, w in zip(ids, want.values(), strict=True)})
            runs[mixed] = [driver.tokens(s) for s in ids]
            driver.finish(list(ids))
            driver.flush()
        assert runs[True] == runs[False] == list(want.values())

    def test_decode_rows_fed_on_the_device_match_their_tokens_in_the_plan(
        self, driver: Driver, served: Backend, variant: str, reference: ReferenceModel
    ) -> None:
        """`fed_tokens`: a decode row whose `last_token` is None reads it from `FedTokens`
        (ids on the device: what the engine hands over while the step before lands) and
        gives the logits it gives with the token in the plan."""
        if not driver.caps.fed_tokens:
            pytest.skip("backend does not declare fed_tokens")
        if variant != "direct":
            pytest.skip("FedTokens never leave the engine's process")
        prompts = self._prompts(reference.vocab_size, (9, 14, 5))
        driver.prefill(prompts)
        out = driver.decode(list(prompts))
        assert out.logits is not None
        expected = out.logits.clone()
        # the same step again (a decode row may start below what the backend holds: it
        # rewrites those positions), with rows 100 and 102 fed from a tensor
        rows = driver.plans[-1].running
        fed = {100: rows[0].last_token, 102: rows[2].last_token}
        ids = torch.tensor([0, fed[102], 0, fed[100]], device=expected.device)
        replay = StepPlan(
            running=tuple(
                dataclasses.replace(
                    row,
                    new_block_ids=(),
                    last_token=None if row.seq_id in fed else row.last_token,
                )
                for row in rows
            )
        )
        again = cast(FedStepBackend, served).step(replay, FedTokens(ids, {100: 3, 102: 1}))
        assert again.seq_ids == out.seq_ids and again.logits is not None
        torch.testing.assert_close(again.logits, expected, rtol=0, atol=0)

    # -- KV accounting ------------------------------------------------------------------------

    def test_release_frees_kv_and_unknown_ids_are_ignored(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        backend = driver.backend
        prompts = self._prompts(reference.vocab_size, (7, 12))
        driver.prefill(prompts)
        usage = driver.kv_usage()
        assert usage.seq_ids == frozenset(prompts) and usage.used_tokens == 19
        driver.decode(list(prompts))
        assert driver.kv_usage().used_tokens == 21
        driver.release([100])
        usage = driver.kv_usage()
        assert usage.seq_ids == frozenset({101}) and usage.used_tokens == 13
        backend.release([100, 987654])  # already released, never seen: both no-ops
        backend.release([])
        assert driver.kv_usage() == usage
        driver.release([101])
        assert driver.kv_usage().seq_ids == frozenset()
        assert driver.kv_usage().used_tokens == 0

    def test_finished_and_preempted_in_a_plan_drop_their_sequences(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """Ended ids ride the next plan and go before its rows run: a sequence joining in
        that plan may take their blocks or slot."""
        prompts = self._prompts(reference.vocab_size, (7, 12, 9, 5))
        want = reference.greedy(prompts[103], 6)
        driver.prefill({100: prompts[100], 101: prompts[101]})
        driver.decode([100, 101])
        assert driver.kv_usage().used_tokens == 21
        driver.finish([100])
        driver.decode([101])  # the plan carries finished=(100,)
        assert driver.plans[-1].finished == (100,)
        usage = driver.kv_usage()
        assert usage.seq_ids == frozenset({101}) and usage.used_tokens == 14
        driver.finish([101])
        driver.prefill({102: prompts[102]})
        driver.preempt([102])
        driver.flush()  # no rows: only releases
        assert driver.plans[-1].preempted == (102,) and not driver.plans[-1].rows
        assert driver.kv_usage().seq_ids == frozenset()
        assert driver.kv_usage().used_tokens == 0
        driver.prefill({103: prompts[103]})
        driver.generate({103: len(want)})
        assert driver.tokens(103) == want

    def test_capacity_reported_by_warmup_can_be_filled_and_reused(
        self, driver: Driver, capacity: KVCapacity, reference: ReferenceModel
    ) -> None:
        """Round one ends its sequences in a plan's `finished`, round two with
        `release`; the second round only fits if both freed everything."""
        total = capacity.total_tokens
        assert total <= MAX_FILL_TOKENS, (
            f"warmup reported {total} tokens though Limits.max_batch_total_tokens asked for "
            f"{self.limits.max_batch_total_tokens}"
        )
        per_seq = self.limits.max_total_tokens
        num_seqs = math.ceil(total / per_seq)
        if capacity.max_sequences is not None:
            num_seqs = min(num_seqs, capacity.max_sequences)
            total = min(total, num_seqs * per_seq)
        for round_index in range(2):
            targets = self._fill_plan(total, num_seqs, per_seq, 200 + 100 * round_index)
            prompts = {
                s: make_prompt(s, min(n, self.limits.max_input_tokens), reference.vocab_size)
                for s, n in targets.items()
            }
            for seq_id, prompt in prompts.items():
                driver.prefill({seq_id: prompt})
            # n tokens in KV means n - len(prompt) decodes after the prefill's token.
            driver.generate({s: n - len(prompts[s]) + 1 for s, n in targets.items()})
            assert driver.kv_usage().used_tokens == total
            if round_index == 0:
                driver.finish(list(targets))
                driver.flush()
            else:
                driver.release(list(targets))
            assert driver.kv_usage().used_tokens == 0

    @staticmethod
    def _fill_plan(total: int, num_seqs: int, per_seq: int, first_id: int) -> dict[int, int]:
        """seq_id -> tokens to hold in KV, summing to `total`, none above `per_seq`."""
        plan, left = {}, total
        for index in range(num_seqs):
            take = min(per_seq, left - (num_seqs - index - 1))
            plan[first_id + index] = take
            left -= take
        return plan

    # -- changes only: block tables, drafts, preemption ---------------------------------------

    def test_steady_state_decode_plans_carry_no_block_ids(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """A running row names only the blocks appended this step: none, except when
        its tokens cross into a block the backend has not heard of."""
        prompt = make_prompt(26, 5, reference.vocab_size)
        # enough tokens to cross at least one block boundary
        num_tokens = max(self.max_new_tokens, driver.block_size + 4)
        want = reference.greedy(prompt, min(num_tokens, self.limits.max_total_tokens - 5))
        driver.prefill({1: prompt})
        driver.generate({1: len(want)})
        assert driver.tokens(1) == want
        rows = [row for plan in driver.plans for row in plan.rows if row.seq_id == 1]
        assert isinstance(rows[0], NewSequence)
        if driver.pool is None:
            assert rows[0].block_ids == ()
            assert all(not r.new_block_ids for r in rows[1:] if isinstance(r, RunningSequence))
            return
        size, known = driver.block_size, len(rows[0].block_ids)
        assert known == math.ceil(len(prompt) / size)
        appended = 0
        for row in rows[1:]:
            assert isinstance(row, RunningSequence) and row.decode
            needed = math.ceil((row.start_position + len(row.input_ids)) / size)
            assert len(row.new_block_ids) == max(0, needed - known), row
            known = max(known, needed)
            appended += bool(row.new_block_ids)
        assert 0 < appended < len(rows) - 1, "no decode step crossed a block boundary"
        assert known * size >= len(prompt) + len(want) - 1

    def test_paged_prefix_blocks_are_shared_read_only(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """A second sequence reads the first one's full prompt blocks (start_position > 0)
        and neither output changes, also after the owner ended (blocks keep content)."""
        if driver.caps.kv_layout is not KvLayout.PAGED:
            pytest.skip("backend is not paged")
        if not driver.caps.prefix_caching:
            pytest.skip("backend does not declare prefix_caching")
        size = driver.block_size
        system = make_prompt(20, 2 * size, reference.vocab_size)
        first = system + make_prompt(21, 3, reference.vocab_size)
        second = system + make_prompt(22, 5, reference.vocab_size)
        third = system + make_prompt(23, 2, reference.vocab_size)
        want = [reference.greedy(p, self.max_new_tokens) for p in (first, second, third)]
        driver.prefill({1: first})
        assert driver.share_prefix(1) == 2
        driver.generate({1: 3})
        driver.prefill({2: second}, cached=True)
        assert driver.plans[-1].new[0].start_position == 2 * size
        assert driver.block_ids(2)[:2] == driver.block_ids(1)[:2]
        assert driver.kv_usage().seq_ids == frozenset({1, 2})
        driver.generate({1: len(want[0]), 2: len(want[1])})
        assert driver.tokens(1) == want[0]
        assert driver.tokens(2) == want[1]
        shared = driver.block_ids(1)[:2]
        driver.finish([1, 2])
        driver.prefill({3: third}, cached=True)  # the owners end in this plan, blocks stay
        assert driver.block_ids(3)[:2] == shared
        driver.generate({3: len(want[2])})
        assert driver.tokens(3) == want[2]

    def test_decode_with_drafts_matches_one_token_steps(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """T > 1 decode rows: logits [R, T, V] (a shorter row padded), causal among its
        tokens; a rejected draft's KV is junk the next step starts below and overwrites."""
        if not driver.caps.speculation:
            pytest.skip("backend does not declare speculation")
        prompts = self._prompts(reference.vocab_size, (9, 14))
        want = {s: reference.greedy(p, self.max_new_tokens) for s, p in prompts.items()}
        assert all(len(w) >= 8 for w in want.values()), "reference stopped early"
        driver.prefill(prompts)
        driver.decode([100, 101])
        # right drafts for 100 (all accepted), a wrong second draft for 101
        good = want[100][2:5]
        bad = [want[101][2], (want[101][3] + 1) % reference.vocab_size]
        out = driver.decode([100, 101], drafts={100: good, 101: bad})
        if out.logits is not None:
            assert tuple(out.logits.shape) == (2, 4, reference.vocab_size)
        assert driver.tokens(100) == want[100][:6]
        assert driver.tokens(101) == want[101][:4]  # 1 + the matching draft + its sample
        driver.decode([100, 101])
        assert driver.plans[-1].running[1].start_position == len(prompts[101]) + 3
        driver.generate({s: len(w) for s, w in want.items()})
        assert {s: driver.tokens(s) for s in prompts} == want

    def test_preempted_sequence_is_recomputed_under_its_id(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """Preempted, then back as a NewSequence of prompt + generated[:-1] without
        logits under the same seq_id (into other blocks or slot): decoding goes on as if
        nothing happened, its next decode row feeding the pending token."""
        prompt = make_prompt(24, 10, reference.vocab_size)
        want = reference.greedy(prompt, self.max_new_tokens)
        assert len(want) >= 6, "reference stopped early"
        driver.prefill({1: prompt})
        driver.generate({1: 4})
        driver.preempt([1])
        driver.prefill({9: make_prompt(25, 12, reference.vocab_size)})  # may take its KV
        assert driver.kv_usage().seq_ids == frozenset({9})
        out = driver.resume(1)
        assert out.seq_ids == ()
        resumed = driver.plans[-1].new[0]
        assert (resumed.seq_id, resumed.want_logits) == (1, False)
        assert list(resumed.token_ids) == prompt + want[:3]
        assert driver.kv_usage().seq_ids == frozenset({1, 9})
        driver.generate({1: len(want)})
        assert driver.tokens(1) == want
