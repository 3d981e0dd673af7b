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
scheduler's own sequence of calls. For a PAGED backend it allocates block tables with
the router's own allocator (`tgi.router.paging`), can share cached prefix blocks
(`prefill(..., cached=True)`), verifies drafts (`decode(..., drafts=...)`) and re-prefills
a released sequence under its id (`resume`), as the paged policy does.
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
from tgi.router.paging import BlockPool, BlockTable, block_hashes
from tgi.router.paging.prefix import ROOT
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
    table: BlockTable = field(default_factory=BlockTable)

    @property
    def block_ids(self) -> tuple[int, ...]:
        return tuple(self.table.blocks)

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
        self.pool: BlockPool | None = None
        if self.caps.kv_layout is KvLayout.PAGED:
            self.block_size = capacity.block_size or self.caps.block_size or 1
            self.pool = BlockPool(capacity.num_blocks or 1, self.block_size)
        self._free_slots = list(range(self.caps.static_batch_size or 0))

    def prefill(
        self,
        prompts: Mapping[int, Sequence[int]],
        *,
        want_prompt_logits: bool = False,
        cached: bool = False,
    ) -> StepOutput:
        """Prefill new sequences; each row's greedy token becomes its first generated one.

        `cached` (paged): each row first takes the longest run of prefix blocks keyed by
        `share_prefix` (always leaving one token to compute) and starts after it."""
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
            start = self._take_cached(self.seqs[seq_id]) if cached else 0
            rows.append(
                self._row(
                    seq_id, list(prompt)[start:], start, want_prompt_logits=want_prompt_logits
                )
            )
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

    def decode(
        self, seq_ids: Sequence[int], *, drafts: Mapping[int, Sequence[int]] | None = None
    ) -> StepOutput:
        """Advance `seq_ids` by one token each; with `drafts` (paged, speculation) each
        row also carries its drafts, padded to one length, and takes the greedy tokens
        while its drafts match them (the router's exact-match rule)."""
        drafts = drafts or {}
        width = 1 + max((len(d) for d in drafts.values()), default=0)
        rows = []
        for seq_id in seq_ids:
            seq = self.seqs[seq_id]
            position = seq.in_kv
            mine = list(drafts.get(seq_id, ()))
            tokens = [seq.generated[-1], *mine] + [seq.generated[-1]] * (width - 1 - len(mine))
            self._grow_blocks(seq, position + width)
            rows.append(DecodeRow(seq_id, tuple(tokens), position, seq.slot, seq.block_ids))
        out = self.backend.decode(DecodeBatch(tuple(rows)))
        if width == 1:
            self._take(out, tuple(seq_ids))
            return out
        assert out.seq_ids == tuple(seq_ids), f"logits rows {out.seq_ids}, asked for {seq_ids}"
        assert tuple(out.logits.shape[:2]) == (len(seq_ids), width), tuple(out.logits.shape)
        picked = out.logits.argmax(dim=-1).tolist()  # [R, T]
        for seq_id, row_tokens, row in zip(seq_ids, picked, rows, strict=True):
            accepted = [int(row_tokens[0])]
            for t in range(1, 1 + len(drafts.get(seq_id, ()))):
                if row.token_ids[t] != accepted[-1]:
                    break
                accepted.append(int(row_tokens[t]))
            self.seqs[seq_id].generated.extend(accepted)
        return out

    def new_row(
        self,
        seq_id: int,
        prompt: Sequence[int],
        *,
        want_logits: bool = True,
        want_prompt_logits: bool = False,
    ) -> PrefillRow:
        """A prefill row for a new sequence, with its slot or block table, for tests
        that call the backend directly."""
        self.seqs[seq_id] = _Seq(list(prompt))
        if self.caps.static_batch_size is not None:
            self.seqs[seq_id].slot = self._free_slots.pop(0)
        return self._row(
            seq_id,
            list(prompt),
            0,
            want_logits=want_logits,
            want_prompt_logits=want_prompt_logits,
        )

    def share_prefix(self, seq_id: int) -> int:
        """Key the full blocks of `seq_id`'s prompt for `prefill(cached=True)` (paged);
        returns how many blocks were keyed."""
        assert self.pool is not None, "prefix blocks need a paged backend"
        seq = self.seqs[seq_id]
        keys = block_hashes(seq.prompt, self.block_size)
        parent = ROOT
        for index, key in enumerate(keys):
            chunk = tuple(seq.prompt[index * self.block_size : (index + 1) * self.block_size])
            self.pool.register(seq.table.blocks[index], key, parent, chunk)
            parent = key
        seq.table.num_shared = len(keys)
        return len(keys)

    def resume(self, seq_id: int) -> StepOutput:
        """Re-prefill a released (preempted) sequence under its id: prompt + generated
        minus the pending token, no logits; the next decode feeds the pending token."""
        seq = self.seqs[seq_id]
        history = self._history(seq)
        out = self.backend.prefill(
            PrefillBatch((self._row(seq_id, history, 0, want_logits=False),))
        )
        self._take(out, ())
        return out

    def preempt(self, seq_ids: Sequence[int]) -> None:
        """Release KV and blocks but keep the tokens, for `resume`."""
        for seq_id in seq_ids:
            if self.pool is not None:
                self.seqs[seq_id].table.free(self.pool)
        self.backend.release(seq_ids)

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
                if self.pool is not None:
                    seq.table.free(self.pool)
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
            seq.block_ids,
            want_logits,
            want_prompt_logits,
        )

    def _grow_blocks(self, seq: _Seq, num_tokens: int) -> None:
        if self.pool is not None:
            seq.table.grow(self.pool, num_tokens)

    def _take_cached(self, seq: _Seq) -> int:
        """Share the longest keyed run of `seq`'s prompt blocks; return its start."""
        assert self.pool is not None, "prefix blocks need a paged backend"
        size, parent = self.block_size, ROOT
        limit = (len(seq.prompt) - 1) // size
        for index, key in enumerate(block_hashes(seq.prompt, size, limit)):
            chunk = tuple(seq.prompt[index * size : (index + 1) * size])
            block = self.pool.lookup(key, parent, chunk)
            if block is None:
                break
            self.pool.share(block)
            seq.table.blocks.append(block)
            parent = key
        seq.table.num_shared = len(seq.table.blocks)
        return len(seq.table.blocks) * size

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
                    driver.new_row(100, prompts[100], want_prompt_logits=True),
                    driver.new_row(101, prompts[101]),
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
                    driver.new_row(100, prompts[100], want_logits=False),
                    driver.new_row(101, prompts[101]),
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

    # -- paged layouts: shared prefix blocks, drafts, preemption ----------------------------

    def _paged(self, driver: Driver) -> None:
        if driver.caps.kv_layout is not KvLayout.PAGED:
            pytest.skip("backend is not paged")

    def test_paged_prefix_blocks_are_shared_read_only(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """A second sequence reads the first one's full prompt blocks (start_position > 0)
        and neither output changes, also after the owner ended (blocks keep content)."""
        self._paged(driver)
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
        assert driver.seqs[2].block_ids[:2] == driver.seqs[1].block_ids[:2]
        assert driver.backend.kv_usage().seq_ids == frozenset({1, 2})
        driver.generate({1: len(want[0]), 2: len(want[1])})
        assert driver.tokens(1) == want[0]
        assert driver.tokens(2) == want[1]
        shared = driver.seqs[1].block_ids[:2]
        driver.release([1, 2])
        driver.prefill({3: third}, cached=True)  # the owners are gone, the blocks stay
        assert driver.seqs[3].block_ids[:2] == shared
        driver.generate({3: len(want[2])})
        assert driver.tokens(3) == want[2]
        driver.release([3])

    def test_paged_decode_with_drafts_matches_one_token_steps(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """T > 1 decode rows: logits [R, T, V], causal among the T tokens; a rejected
        draft's KV is junk the next step overwrites."""
        self._paged(driver)
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
        assert tuple(out.logits.shape) == (2, 4, reference.vocab_size)
        assert driver.tokens(100) == want[100][:6]
        assert driver.tokens(101) == want[101][:4]  # 1 + the matching draft + its sample
        driver.generate({s: len(w) for s, w in want.items()})
        assert {s: driver.tokens(s) for s in prompts} == want

    def test_paged_preempted_sequence_is_prefilled_again_under_its_id(
        self, driver: Driver, reference: ReferenceModel
    ) -> None:
        """Release, then prefill prompt + generated[:-1] without logits under the same
        seq_id (into other blocks): decoding goes on as if nothing happened."""
        self._paged(driver)
        prompt = make_prompt(24, 10, reference.vocab_size)
        want = reference.greedy(prompt, self.max_new_tokens)
        assert len(want) >= 6, "reference stopped early"
        driver.prefill({1: prompt})
        driver.generate({1: 4})
        driver.preempt([1])
        assert driver.backend.kv_usage().seq_ids == frozenset()
        driver.prefill({9: make_prompt(25, 12, reference.vocab_size)})  # may reuse them
        out = driver.resume(1)
        assert out.seq_ids == ()
        assert driver.backend.kv_usage().seq_ids == frozenset({1, 9})
        driver.generate({1: len(want)})
        assert driver.tokens(1) == want
