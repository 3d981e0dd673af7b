"""The backend conformance suite: every backend, in-tree or third-party, runs it.

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
(`ReferenceModel`). `Driver` plays a minimal router for any KV layout: it assigns
static slots, keeps paged block tables, re-prefills active slots where the backend says
`prefill_rebuilds_cache`, and samples greedily, so the tests below read like the
scheduler's own sequence of calls.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tgi.backend.contract import (
    Backend,
    Batching,
    DecodeBatch,
    DecodeRow,
    KVCapacity,
    KvLayout,
    Limits,
    PrefillBatch,
    PrefillRow,
    StepOutput,
)
from tgi.testing.tiny_models import TINY_PRESETS, build_tiny_model

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


def make_prompt(seed: int, num_tokens: int, vocab_size: int) -> list[int]:
    """Deterministic token ids in [0, vocab_size), different for each seed."""
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(num_tokens)]


class ReferenceModel:
    """transformers `generate` on the same weights: what greedy decoding must equal."""

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self.model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        self.vocab_size = int(self.model.config.get_text_config().vocab_size)

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        """The new tokens of `generate(do_sample=False)`; fewer when it stops at EOS."""
        input_ids = torch.tensor([list(prompt)], dtype=torch.long)  # [1, n]
        config = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad if pad is not None else 0,
            )
        return [int(token) for token in out[0, len(prompt) :]]

    def prompt_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits of every prompt position, [n, V] float32, from one full forward."""
        with torch.inference_mode():
            out = self.model(torch.tensor([list(prompt)], dtype=torch.long))
        return out.logits[0].float()


@dataclass(slots=True)
class _Seq:
    prompt: list[int]
    generated: list[int] = field(default_factory=list)  # the last one is not in KV yet
    slot: int | None = None
    block_ids: list[int] = field(default_factory=list)

    @property
    def in_kv(self) -> int:
        return len(self.prompt) + max(len(self.generated) - 1, 0)


class Driver:
    """A minimal router over one backend: builds rows for its layout, samples greedily.

    Tokens come from `argmax` of each returned row, so two runs agree exactly when the
    backend's logits pick the same tokens.
    """

    def __init__(self, backend: Backend, capacity: KVCapacity) -> None:
        self.backend = backend
        self.capacity = capacity
        self.caps = backend.capabilities
        self.seqs: dict[int, _Seq] = {}
        num_blocks = capacity.num_blocks or 0
        self._free_blocks = list(range(num_blocks))
        self._free_slots = list(range(self.caps.static_batch_size or 0))

    def prefill(
        self, prompts: Mapping[int, Sequence[int]], *, want_prompt_logits: bool = False
    ) -> StepOutput:
        """Prefill new sequences; each row's greedy token becomes its first generated one."""
        rows = []
        if self.caps.prefill_rebuilds_cache:
            rows += [
                self._row(seq_id, self._history(seq), 0, want_logits=False)
                for seq_id, seq in self.seqs.items()
            ]
        for seq_id, prompt in prompts.items():
            self.seqs[seq_id] = _Seq(list(prompt))
            if self.caps.static_batch_size is not None:
                self.seqs[seq_id].slot = self._free_slots.pop(0)
            rows.append(self._row(seq_id, list(prompt), 0, want_prompt_logits=want_prompt_logits))
        out = self.backend.prefill(PrefillBatch(tuple(rows)))
        self._take(out, tuple(row.seq_id for row in rows if row.want_logits))
        return out

    def prefill_chunk(self, seq_id: int, token_ids: Sequence[int], *, last: bool) -> StepOutput:
        """One chunk of a chunked prefill; only the last chunk asks for logits."""
        seq = self.seqs.setdefault(seq_id, _Seq([]))
        start = len(seq.prompt)
        seq.prompt.extend(token_ids)
        out = self.backend.prefill(
            PrefillBatch((self._row(seq_id, list(token_ids), start, want_logits=last),))
        )
        self._take(out, (seq_id,) if last else ())
        return out

    def decode(self, seq_ids: Sequence[int]) -> StepOutput:
        """Advance `seq_ids` by one token each."""
        rows = []
        for seq_id in seq_ids:
            seq = self.seqs[seq_id]
            position = seq.in_kv
            self._grow_blocks(seq, position + 1)
            rows.append(
                DecodeRow(seq_id, (seq.generated[-1],), position, seq.slot, tuple(seq.block_ids))
            )
        out = self.backend.decode(DecodeBatch(tuple(rows)))
        self._take(out, tuple(seq_ids))
        return out

    def generate(self, targets: Mapping[int, int]) -> None:
        """Decode the live sequences together until each has `targets[seq_id]` tokens."""
        while True:
            active = [s for s, n in targets.items() if len(self.seqs[s].generated) < n]
            if not active:
                return
            self.decode(active)

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self._free_blocks.extend(seq.block_ids)
                if seq.slot is not None:
                    self._free_slots.append(seq.slot)
        self.backend.release(seq_ids)

    def tokens(self, seq_id: int) -> list[int]:
        return list(self.seqs[seq_id].generated)

    def _history(self, seq: _Seq) -> list[int]:
        # What a static rebuild re-sends: prompt plus generated, minus the pending token.
        return seq.prompt + seq.generated[:-1]

    def _row(
        self,
        seq_id: int,
        token_ids: list[int],
        start: int,
        *,
        want_logits: bool = True,
        want_prompt_logits: bool = False,
    ) -> PrefillRow:
        seq = self.seqs[seq_id]
        self._grow_blocks(seq, start + len(token_ids))
        return PrefillRow(
            seq_id,
            tuple(token_ids),
            start,
            seq.slot,
            tuple(seq.block_ids),
            want_logits,
            want_prompt_logits,
        )

    def _grow_blocks(self, seq: _Seq, num_tokens: int) -> None:
        if self.caps.kv_layout is not KvLayout.PAGED:
            return
        block_size = self.capacity.block_size or self.caps.block_size or 1
        while len(seq.block_ids) * block_size < num_tokens:
            seq.block_ids.append(self._free_blocks.pop(0))

    def _take(self, out: StepOutput, wanted: tuple[int, ...]) -> None:
        # Checked on every step: a row missing here would make `generate` loop forever.
        assert out.seq_ids == wanted, f"logits rows {out.seq_ids}, asked for {wanted}"
        assert out.logits.shape[0] == len(wanted), f"logits shape {tuple(out.logits.shape)}"
        picked = out.logits[:, -1].argmax(dim=-1).tolist()  # [R]
        for seq_id, token in zip(out.seq_ids, picked, strict=True):
            self.seqs[seq_id].generated.append(int(token))


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

    @pytest.fixture
    def capacity(self, backend: Backend) -> KVCapacity:
        return backend.warmup(self.limits)

    @pytest.fixture
    def driver(self, backend: Backend, capacity: KVCapacity) -> Driver:
        return Driver(backend, capacity)

    def _prompts(self, vocab_size: int, lengths: Sequence[int]) -> dict[int, list[int]]:
        return {100 + i: make_prompt(i, n, vocab_size) for i, n in enumerate(lengths)}

    def _solo(self, driver: Driver, seq_id: int, prompt: list[int], num_tokens: int) -> list[int]:
        driver.prefill({seq_id: prompt})
        driver.generate({seq_id: num_tokens})
        tokens = driver.tokens(seq_id)
        driver.release([seq_id])
        return tokens

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
        for buckets in (caps.batch_buckets, caps.length_buckets):
            assert list(buckets) == sorted(set(buckets)) and all(b > 0 for b in buckets)
        assert backend.capabilities == caps  # fixed for the life of the backend

    def test_warmup_reports_capacity_that_fits_one_full_sequence(
        self, backend: Backend, capacity: KVCapacity
    ) -> None:
        assert capacity.max_total_tokens >= self.limits.max_total_tokens
        assert capacity.bytes_per_token > 0
        if backend.capabilities.kv_layout is KvLayout.PAGED:
            assert capacity.block_size == backend.capabilities.block_size
            assert capacity.num_blocks is not None and capacity.block_size is not None
            assert capacity.num_blocks * capacity.block_size >= capacity.max_total_tokens
        if backend.capabilities.static_batch_size is not None:
            assert capacity.max_sequences is not None
            assert capacity.max_sequences <= backend.capabilities.static_batch_size
        usage = backend.kv_usage()
        assert usage.seq_ids == frozenset() and usage.used_tokens == 0
        assert usage.capacity_tokens == capacity.max_total_tokens

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
        assert driver.backend.kv_usage().used_tokens == len(prompt) + len(expected) - 1

    # -- correctness against transformers ------------------------------------------------------

    def test_prefill_then_decode_matches_transformers_generate(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        prompt = make_prompt(1, 17, reference.vocab_size)
        expected = reference.greedy(prompt, self.max_new_tokens)
        assert len(expected) >= 2, "the reference stopped at once; pick another prompt seed"
        out = driver.prefill({1: prompt})
        assert out.seq_ids == (1,)
        assert tuple(out.logits.shape) == (1, 1, reference.vocab_size)
        assert out.logits.is_floating_point()
        driver.generate({1: len(expected)})
        assert driver.tokens(1) == expected

    def test_rows_of_different_lengths_decode_together_as_alone(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        prompts = self._prompts(reference.vocab_size, (3, 19, 9))
        expected = {s: reference.greedy(p, self.max_new_tokens) for s, p in prompts.items()}
        # Seq ids are never reused after release, so the solo runs take their own.
        alone = {s: self._solo(driver, s + 1000, p, len(expected[s])) for s, p in prompts.items()}
        assert alone == expected
        out = driver.prefill(prompts)
        assert set(out.seq_ids) == set(prompts) and out.logits.shape[0] == len(prompts)
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
        if not driver.caps.chunked_prefill:
            pytest.skip("backend does not declare chunked_prefill")
        prompt = make_prompt(5, 23, reference.vocab_size)
        expected = reference.greedy(prompt, self.max_new_tokens)
        first = driver.prefill_chunk(1, prompt[:10], last=False)
        assert first.seq_ids == () and first.logits.shape[0] == 0
        driver.prefill_chunk(1, prompt[10:], last=True)
        driver.generate({1: len(expected)})
        assert driver.tokens(1) == expected

    def test_prompt_logits_cover_every_prompt_position(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        if not driver.caps.prompt_logits:
            pytest.skip("backend does not declare prompt_logits")
        prompts = self._prompts(reference.vocab_size, (9, 4))
        out = driver.backend.prefill(
            PrefillBatch(
                (
                    PrefillRow(100, tuple(prompts[100]), want_prompt_logits=True),
                    PrefillRow(101, tuple(prompts[101])),
                )
            )
        )
        assert set(out.prompt_logits) == {100}
        got = out.prompt_logits[100].float()
        assert tuple(got.shape) == (9, reference.vocab_size)
        want = reference.prompt_logits(prompts[100])
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(got[-1], out.logits[0, -1].float(), atol=2e-3, rtol=2e-3)

    def test_rows_without_want_logits_get_no_logits_row(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        prompts = self._prompts(reference.vocab_size, (5, 8))
        out = driver.backend.prefill(
            PrefillBatch(
                (
                    PrefillRow(100, tuple(prompts[100]), want_logits=False),
                    PrefillRow(101, tuple(prompts[101])),
                )
            )
        )
        assert out.seq_ids == (101,)
        assert out.logits.shape[0] == 1
        assert driver.backend.kv_usage().seq_ids == frozenset({100, 101})

    # -- KV accounting ------------------------------------------------------------------------

    def test_release_frees_kv_and_unknown_ids_are_ignored(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        backend = driver.backend
        prompts = self._prompts(reference.vocab_size, (7, 12))
        driver.prefill(prompts)
        usage = backend.kv_usage()
        assert usage.seq_ids == frozenset(prompts) and usage.used_tokens == 19
        driver.decode(list(prompts))
        assert backend.kv_usage().used_tokens == 21
        driver.release([100])
        usage = backend.kv_usage()
        assert usage.seq_ids == frozenset({101}) and usage.used_tokens == 13
        backend.release([100, 987654])  # already released, never seen: both no-ops
        backend.release([])
        assert backend.kv_usage() == usage
        driver.release([101])
        assert backend.kv_usage().seq_ids == frozenset()
        assert backend.kv_usage().used_tokens == 0

    def test_capacity_reported_by_warmup_can_be_filled_and_reused(
        self, driver: Driver, capacity: KVCapacity, reference: ReferenceModel
    ) -> None:
        total = capacity.max_total_tokens
        assert total <= MAX_FILL_TOKENS, (
            f"warmup reported {total} tokens though Limits.max_batch_total_tokens asked for "
            f"{self.limits.max_batch_total_tokens}"
        )
        per_seq = self.limits.max_total_tokens
        num_seqs = math.ceil(total / per_seq)
        if capacity.max_sequences is not None:
            num_seqs = min(num_seqs, capacity.max_sequences)
            total = min(total, num_seqs * per_seq)
        for _round in range(2):  # the second round only fits if release freed everything
            targets = self._fill_plan(total, num_seqs, per_seq)
            prompts = {
                s: make_prompt(s, min(n, self.limits.max_input_tokens), reference.vocab_size)
                for s, n in targets.items()
            }
            for seq_id, prompt in prompts.items():
                driver.prefill({seq_id: prompt})
            # n tokens in KV means n - len(prompt) decodes after the prefill's token.
            driver.generate({s: n - len(prompts[s]) + 1 for s, n in targets.items()})
            assert driver.backend.kv_usage().used_tokens == total
            driver.release(list(targets))
            assert driver.backend.kv_usage().used_tokens == 0

    @staticmethod
    def _fill_plan(total: int, num_seqs: int, per_seq: int) -> dict[int, int]:
        """seq_id -> tokens to hold in KV, summing to `total`, none above `per_seq`."""
        plan, left = {}, total
        for index in range(num_seqs):
            take = min(per_seq, left - (num_seqs - index - 1))
            plan[200 + index] = take
            left -= take
        return plan
