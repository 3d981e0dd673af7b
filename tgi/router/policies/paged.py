"""Paged continuous batching: block-budget admission, chunked prefill, prefix cache,
preemption by recompute and n-gram speculation, for backends with `KvLayout.PAGED`.

NOTE: the router owns the blocks (`tgi.router.paging`); this policy decides, once per
step, what every sequence does and which blocks it holds:

1. Running sequences, in admission order (FCFS), each get their work for the step: a
   decode row (the pending token plus any drafts), or the next chunk of their prefill.
   Blocks are taken lazily, only for the positions this step writes. When none is free
   or evictable, the most recently admitted running sequence is preempted (its blocks
   are freed, the backend releases it; its sampler state and generated tokens are kept)
   and it goes back to the FRONT of the waiting queue.
2. Waiting sequences are admitted first come, first served while the step's prefill
   token budget (`max_batch_prefill_tokens`, shared with step 1's chunks), the blocks
   (free + evictable, minus a small watermark) and `max_batch_size` allow. A prompt
   longer than the budget left is prefilled in chunks over several steps
   (`want_logits` only on the last), while the running rows keep decoding. Nothing is
   admitted in a step that preempted.

A sequence's prefill covers `prompt + generated[:-1]`: for a new one that is its prompt,
and its last chunk asks for logits (the first token); for a resumed (preempted) one it
is everything but the pending token, its last chunk asks for none, and the pending token
is fed by the next decode as if nothing happened. The tokens, the sampler state and the
step indexes are those of the never-preempted run, so its output is identical.

Prefix cache: the full blocks of a prefill are keyed by chained hashes once written; a
newcomer takes the longest cached run (at most up to its last prefill token, so one
token is always computed and a sequence never writes into a shared block) and starts
its prefill after it. Rows asking for prompt logits bypass the lookup.

TGI's `waiting_served_ratio` / `max_waiting_tokens` do not apply: a paged prefill runs
next to the decode rows without re-shaping them (TGI v3 skips them for chunking
backends too), so a newcomer joins at the very next step.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from tgi.backend.contract import Capabilities, KvLayout
from tgi.router.paging import BlockPool, BlockTable, block_hashes
from tgi.router.paging.prefix import ROOT
from tgi.router.sequence import Sequence
from tgi.sampling.speculation import NgramIndex, SpeculationGate, speculable

__all__ = ["PagedPolicy", "PagedStep", "PrefillWork"]


@dataclass(slots=True)
class _State:
    """A sequence's paged bookkeeping while it holds KV (from admission to release)."""

    table: BlockTable
    tokens: tuple[int, ...]  # what its prefill writes: prompt + generated[:-1]
    computed: int  # positions already in KV
    wants_first_token: bool  # a new sequence: its last chunk asks for logits
    whole: bool  # prompt logits asked: prefilled in one piece, never chunked
    keys: list[int]  # prefix-cache keys of the full blocks of `tokens`
    registered: int  # blocks of `tokens` already keyed (or shared from the cache)
    ngrams: NgramIndex | None = None  # speculation: prompt + generated, indexed as they come

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens)


@dataclass(frozen=True, slots=True)
class PrefillWork:
    sequence: Sequence
    start: int
    token_ids: tuple[int, ...]
    want_logits: bool
    block_ids: tuple[int, ...]


@dataclass(slots=True)
class PagedStep:
    """What one step runs, as decided by `PagedPolicy.schedule`."""

    prefill: list[PrefillWork] = field(default_factory=list)
    decode: list[tuple[Sequence, tuple[int, ...], tuple[int, ...]]] = field(
        default_factory=list
    )  # (sequence, drafts, block_ids)
    admitted: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)  # most recently admitted first
    hit_tokens: int = 0
    queried_tokens: int = 0


class PagedPolicy:
    """Owns the block pool and every sequence's block table; plans one step at a time."""

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        chunked_prefill: bool,
        prefix_caching: bool,
        speculate: int = 0,
        watermark_blocks: int | None = None,
        gate: SpeculationGate | None = None,
    ) -> None:
        self.pool = BlockPool(num_blocks, block_size)
        self.block_size = block_size
        self.chunked_prefill = chunked_prefill
        self.prefix_caching = prefix_caching
        self.speculate = speculate
        self.gate = gate or SpeculationGate()
        # Blocks admission leaves free for the running rows to grow into, so a newcomer
        # does not cause an immediate preemption (vLLM keeps 1%).
        self.watermark = (
            watermark_blocks if watermark_blocks is not None else max(1, num_blocks // 100)
        )
        self._state: dict[int, _State] = {}

    @classmethod
    def from_capabilities(
        cls,
        capabilities: Capabilities,
        *,
        num_blocks: int,
        prefix_caching: bool,
        speculate: int,
    ) -> PagedPolicy:
        if capabilities.kv_layout is not KvLayout.PAGED or not capabilities.block_size:
            raise ValueError(f"a paged policy needs a PAGED backend, got {capabilities}")
        return cls(
            num_blocks=num_blocks,
            block_size=capabilities.block_size,
            chunked_prefill=capabilities.chunked_prefill,
            prefix_caching=prefix_caching and capabilities.prefix_caching,
            speculate=speculate if capabilities.speculation else 0,
        )

    # ---- queries ---------------------------------------------------------------------

    def holds(self, seq_id: int) -> bool:
        return seq_id in self._state

    def block_table(self, seq_id: int) -> tuple[int, ...]:
        state = self._state.get(seq_id)
        return tuple(state.table.blocks) if state else ()

    def tables(self) -> dict[int, tuple[int, ...]]:
        """seq_id -> block table of every sequence holding blocks (for invariant checks)."""
        return {seq_id: tuple(s.table.blocks) for seq_id, s in self._state.items()}

    def shared_counts(self) -> dict[int, int]:
        """seq_id -> how many leading blocks of its table are read-only (shared/cached)."""
        return {seq_id: s.registered for seq_id, s in self._state.items()}

    def is_decoding(self, seq_id: int) -> bool:
        state = self._state.get(seq_id)
        return state is not None and not state.prefilling

    # ---- one step --------------------------------------------------------------------

    def schedule(
        self,
        running: list[Sequence],
        waiting: Iterable[Sequence],
        *,
        max_batch_prefill_tokens: int,
        max_batch_size: int | None,
    ) -> PagedStep:
        """Plan a step. `running` is in admission order; `waiting` in queue order (with
        preempted sequences already at its front). Mutates block tables."""
        step = PagedStep()
        budget = max_batch_prefill_tokens
        active = list(running)
        drafts = self._drafts(active)
        num_drafts = max((len(d) for d in drafts.values()), default=0)
        if num_drafts:  # padded positions must stay inside every row's max_total_tokens
            num_drafts = min(
                num_drafts,
                *(
                    s.max_total_tokens - s.next_position - 1
                    for s in active
                    if not self._state[s.seq_id].prefilling
                ),
            )
            drafts = {k: d[:num_drafts] for k, d in drafts.items() if num_drafts}
        if num_drafts and not self._fits_drafts(active, num_drafts):
            drafts, num_drafts = {}, 0
        index = 0
        while index < len(active):
            sequence = active[index]
            state = self._state[sequence.seq_id]
            if state.prefilling:
                chunk = self._chunk_size(state, budget, first=not step.prefill)
                if chunk <= 0:
                    index += 1
                    continue
                need = state.computed + chunk
            else:
                need = sequence.next_position + 1 + num_drafts
            if not self._reserve(state, need, active, index, step):
                continue  # it was preempted itself: `active` shrank, same index is next
            if state.prefilling:
                step.prefill.append(self._work(sequence, state, chunk))
                budget -= chunk
            else:
                mine = drafts.get(sequence.seq_id, ())
                step.decode.append((sequence, mine, tuple(state.table.blocks)))
            index += 1
        if step.preempted:
            return step
        self._admit(waiting, step, budget, len(active), max_batch_size)
        return step

    def after_step(self, failed: Iterable[int] = ()) -> None:
        """The step ran: key the full blocks its chunks filled, for the prefix cache."""
        if not self.prefix_caching:
            return
        failed_ids = set(failed)
        size = self.block_size
        for seq_id, state in self._state.items():
            full = min(state.computed // size, len(state.keys))
            if seq_id in failed_ids or state.registered >= full:
                continue
            for index in range(state.registered, full):
                parent = state.keys[index - 1] if index else ROOT
                tokens = state.tokens[index * size : (index + 1) * size]
                self.pool.register(state.table.blocks[index], state.keys[index], parent, tokens)
            state.registered = full

    def free(self, seq_ids: Iterable[int]) -> None:
        """The sequences ended (or were preempted): give their blocks back."""
        for seq_id in seq_ids:
            state = self._state.pop(seq_id, None)
            if state is not None:
                state.table.free(self.pool)

    # ---- internals -------------------------------------------------------------------

    def _drafts(self, running: list[Sequence]) -> dict[int, tuple[int, ...]]:
        if not self.speculate:
            return {}
        decoding = [s for s in running if not self._state[s.seq_id].prefilling]
        if not decoding or not self.gate.open(len(decoding)):
            return {}
        out: dict[int, tuple[int, ...]] = {}
        for sequence in decoding:
            if not speculable(sequence.request.sampling):
                continue
            room = sequence.request.stopping.max_new_tokens - len(sequence.tokens) - 1
            if room <= 0:
                continue
            proposal = self._ngrams(sequence).propose(min(self.speculate, room))
            if proposal:
                out[sequence.seq_id] = proposal
        return out

    def _ngrams(self, sequence: Sequence) -> NgramIndex:
        """The sequence's n-gram index, brought up to date with its newest tokens."""
        state = self._state[sequence.seq_id]
        prompt = sequence.request.input_ids
        if state.ngrams is None:
            state.ngrams = NgramIndex()
            state.ngrams.extend(prompt)
        known = len(state.ngrams.tokens) - len(prompt)
        state.ngrams.extend(token.id for token in sequence.tokens[known:])
        return state.ngrams

    def _fits_drafts(self, running: list[Sequence], num_drafts: int) -> bool:
        """Whether every decode row can take `num_drafts` extra positions without
        preempting anyone: drafts are an optimisation, never worth a recompute."""
        extra = 0
        for sequence in running:
            state = self._state[sequence.seq_id]
            if state.prefilling:
                continue
            position = sequence.next_position
            with_drafts = state.table.blocks_needed(position + 1 + num_drafts, self.block_size)
            without = state.table.blocks_needed(position + 1, self.block_size)
            extra += with_drafts - without
        return extra == 0 or extra + self._decode_blocks(running) <= self.pool.num_available

    def _decode_blocks(self, running: list[Sequence]) -> int:
        return sum(
            self._state[s.seq_id].table.blocks_needed(s.next_position + 1, self.block_size)
            for s in running
            if not self._state[s.seq_id].prefilling
        )

    def _chunk_size(self, state: _State, budget: int, *, first: bool) -> int:
        remaining = len(state.tokens) - state.computed
        if remaining <= budget:
            return remaining
        if self.chunked_prefill and not state.whole:
            return max(budget, 0)
        return remaining if first else 0  # the first prefill of a step always runs

    def _reserve(
        self, state: _State, need: int, active: list[Sequence], index: int, step: PagedStep
    ) -> bool:
        """Blocks for `need` positions, preempting the latest-admitted rows if needed.
        False when the row at `index` had to preempt itself."""
        missing = state.table.blocks_needed(need, self.block_size)
        while missing > self.pool.num_available:
            victim = active.pop()
            self._preempt(victim, step)
            if len(active) == index:  # the victim was this row
                return False
        state.table.grow(self.pool, need)
        return True

    def _preempt(self, sequence: Sequence, step: PagedStep) -> None:
        step.preempted.append(sequence)
        self.free([sequence.seq_id])

    def _work(self, sequence: Sequence, state: _State, chunk: int) -> PrefillWork:
        start = state.computed
        end = start + chunk
        last = end == len(state.tokens)
        state.computed = end  # in KV once the step runs; a failed step frees the row
        return PrefillWork(
            sequence=sequence,
            start=start,
            token_ids=state.tokens[start:end],
            want_logits=last and state.wants_first_token,
            block_ids=tuple(state.table.blocks),
        )

    def _admit(
        self,
        waiting: Iterable[Sequence],
        step: PagedStep,
        budget: int,
        num_running: int,
        max_batch_size: int | None,
    ) -> None:
        for sequence in waiting:
            if max_batch_size is not None and num_running >= max_batch_size:
                return
            if budget <= 0 and (step.prefill or not self.chunked_prefill):
                return
            state = self._new_state(sequence)
            hits, hit_blocks = self._lookup(sequence, state)
            state.computed = hits * self.block_size
            chunk = self._chunk_size(state, budget, first=not step.prefill)
            if chunk <= 0:
                return
            end = state.computed + chunk
            new_blocks = -(-end // self.block_size) - hits
            revived = sum(1 for b in hit_blocks if self.pool.ref_count(b) == 0)
            reserve = self.watermark if num_running else 0
            if new_blocks + revived + reserve > self.pool.num_available:
                return
            for block in hit_blocks:
                self.pool.share(block)
            state.table.blocks.extend(hit_blocks)
            state.table.num_shared = hits
            state.registered = hits
            state.table.grow(self.pool, end)
            self._state[sequence.seq_id] = state
            if self.prefix_caching and not sequence.request.decoder_input_details:
                step.queried_tokens += len(state.tokens)
                step.hit_tokens += state.computed
            step.admitted.append(sequence)
            step.prefill.append(self._work(sequence, state, chunk))
            budget -= chunk
            num_running += 1

    def _new_state(self, sequence: Sequence) -> _State:
        generated = tuple(t.id for t in sequence.tokens[:-1])
        tokens = sequence.request.input_ids + generated
        keys = block_hashes(tokens, self.block_size) if self.prefix_caching else []
        return _State(
            table=BlockTable(),
            tokens=tokens,
            computed=0,
            wants_first_token=not sequence.tokens,
            whole=not sequence.tokens and sequence.request.decoder_input_details,
            keys=keys,
            registered=0,
        )

    def _lookup(self, sequence: Sequence, state: _State) -> tuple[int, list[int]]:
        """The longest cached run of full blocks; one prefill token is always left."""
        if not self.prefix_caching or sequence.request.decoder_input_details:
            return 0, []
        limit = (len(state.tokens) - 1) // self.block_size
        blocks: list[int] = []
        parent = ROOT
        size = self.block_size
        for index in range(min(limit, len(state.keys))):
            tokens = state.tokens[index * size : (index + 1) * size]
            block = self.pool.lookup(state.keys[index], parent, tokens)
            if block is None:
                break
            blocks.append(block)
            parent = state.keys[index]
        return len(blocks), blocks
