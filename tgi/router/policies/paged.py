"""Paged continuous batching: block-budget admission, chunked prefill, prefix cache,
preemption by recompute and n-gram speculation, for backends with `KvLayout.PAGED`.

NOTE: the router owns the blocks (`tgi.router.paging`); this policy decides, once per
step, what every sequence does and which blocks it holds:

1. Running sequences, in admission order (FCFS), each get their row for the step: a
   decode row (the pending token plus any drafts), or the next chunk of their prefill.
   A row names only the blocks its sequence gained this step (`new_block_ids`); the
   backend keeps each table and appends them, so a steady-state decode row carries no
   block id at all.
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
its prefill after it. Rows asking for prompt logits, or whose sampling reads the prompt as a history
(penalties, watermark: the engine starts that history from the tokens the plan sends),
bypass the lookup.

TGI's `waiting_served_ratio` / `max_waiting_tokens` do not apply: a paged prefill runs
next to the decode rows without re-shaping them (TGI v3 skips them for chunking
backends too), so a newcomer joins at the very next step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tgi.backend.contract import (
    Capabilities,
    KvLayout,
    NewSequence,
    RunningSequence,
    StepPlan,
)
from tgi.engine.results import StepResult
from tgi.router.paging import BlockPool, BlockTable, block_hashes
from tgi.router.paging.prefix import ROOT
from tgi.router.policies.base import (
    PolicyLimits,
    Schedule,
    decode_row,
    fits_longest_chunk,
    new_row,
)
from tgi.router.sequence import SequenceState
from tgi.sampling.speculation import NgramIndex, SpeculationGate, speculable

__all__ = ["PagedPolicy"]


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
    owner: SequenceState  # the sequence (for the step that admitted it)
    sent_blocks: int = 0  # blocks of `table` the backend was told about
    ngrams: NgramIndex | None = None  # speculation: prompt + generated, indexed as they come

    @property
    def prefilling(self) -> bool:
        return self.computed < len(self.tokens)

    def unsent_blocks(self) -> tuple[int, ...]:
        """Blocks appended since the backend last heard of this table; marks them sent."""
        blocks = self.table.blocks
        if self.sent_blocks == len(blocks):
            return ()
        new = tuple(blocks[self.sent_blocks :])
        self.sent_blocks = len(blocks)
        return new


class PagedPolicy:
    """`SchedulingPolicy` that owns the block pool and every sequence's block table."""

    def __init__(
        self,
        limits: PolicyLimits,
        *,
        num_blocks: int,
        block_size: int,
        chunked_prefill: bool,
        prefix_caching: bool,
        speculate: int = 0,
        watermark_blocks: int | None = None,
        gate: SpeculationGate | None = None,
    ) -> None:
        self.limits = limits
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
        limits: PolicyLimits,
        *,
        num_blocks: int,
        prefix_caching: bool,
        speculate: int,
    ) -> PagedPolicy:
        if capabilities.kv_layout is not KvLayout.PAGED or not capabilities.block_size:
            raise ValueError(f"a paged policy needs a PAGED backend, got {capabilities}")
        return cls(
            limits,
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

    def reserved_tokens(self, running: Sequence[SequenceState]) -> int:
        return self.pool.num_used * self.block_size

    def block_usage(self) -> tuple[int, int] | None:
        return self.pool.num_used, self.pool.num_available

    def can_recompute(self, sequence: SequenceState) -> bool:
        return self.chunked_prefill or fits_longest_chunk(self.limits, sequence)

    def may_plan_ahead(self, running: Sequence[SequenceState]) -> bool:
        """No drafts (they are proposed from the newest tokens), and room for every row
        to grow by one token plus a full prefill budget, so nobody is preempted."""
        if self.speculate:
            return False
        budget_blocks = -(-self.limits.max_batch_prefill_tokens // self.block_size)
        return self.pool.num_available >= len(running) + budget_blocks + self.watermark

    # ---- one step --------------------------------------------------------------------

    def schedule(
        self, running: Sequence[SequenceState], waiting: Sequence[SequenceState]
    ) -> Schedule:
        """Plan a step. `running` is in admission order; `waiting` in queue order (with
        preempted sequences already at its front). Mutates block tables."""
        step = Schedule()
        budget = self.limits.max_batch_prefill_tokens
        active = list(running)
        drafts = self._drafts(active)
        if drafts and not self._fits_drafts(active, drafts):
            drafts = {}
        index = 0
        while index < len(active):
            sequence = active[index]
            state = self._state[sequence.seq_id]
            if not sequence.needs_rows:  # its last token is in flight (planned ahead)
                index += 1
                continue
            if state.prefilling:
                chunk = self._chunk_size(state, budget, first=not self._has_chunks(step))
                if chunk <= 0:
                    index += 1
                    continue
                need = state.computed + chunk
            else:
                mine = drafts.get(sequence.seq_id, ())
                need = sequence.next_position + 1 + len(mine)
            if not self._reserve(state, need, active, index, step):
                continue  # it was preempted itself: `active` shrank, same index is next
            if state.prefilling:
                step.running.append(self._chunk_row(sequence, state, chunk))
                budget -= chunk
            else:
                row = decode_row(sequence, drafts=mine, new_block_ids=state.unsent_blocks())
                step.running.append(row)
            index += 1
        if step.preempted:
            return step
        self._admit(waiting, step, budget, len(active))
        return step

    def after_step(self, plan: StepPlan, result: StepResult) -> None:
        """The step ran: key the full prompt blocks its rows wrote, for the prefix cache.

        Only what this plan computed is keyed (not what a later plan already in flight
        will), and nothing of a row that failed."""
        if result.drafts_proposed:
            self.gate.record(result.drafts_proposed, result.drafts_accepted)
        if not self.prefix_caching or result.errors or result.recompute:
            return  # a failed step's KV is undefined: nothing of it may be shared
        size = self.block_size
        for row in plan.rows:
            state = self._state.get(row.seq_id)
            if state is None or plan.step_index < state.owner.admitted_step:
                continue  # gone, or a row of an earlier admission of the same sequence
            end = row.start_position + len(row.token_ids) + int(getattr(row, "decode", False))
            full = min(end // size, len(state.keys))
            for index in range(state.registered, full):
                parent = state.keys[index - 1] if index else ROOT
                tokens = state.tokens[index * size : (index + 1) * size]
                self.pool.register(state.table.blocks[index], state.keys[index], parent, tokens)
            state.registered = max(state.registered, full)

    def free(self, seq_ids: Iterable[int]) -> None:
        """The sequences ended (or were preempted): give their blocks back."""
        for seq_id in seq_ids:
            state = self._state.pop(seq_id, None)
            if state is not None:
                state.table.free(self.pool)

    def retain(self, seq_ids: Iterable[int]) -> list[int]:
        keep = set(seq_ids)
        strays = sorted(seq_id for seq_id in self._state if seq_id not in keep)
        self.free(strays)
        return strays

    def reset(self) -> None:
        """Forget every table and every cached prefix: the backend's KV is gone."""
        self._state.clear()
        self.pool = BlockPool(self.pool.num_blocks, self.block_size)

    # ---- internals -------------------------------------------------------------------

    @staticmethod
    def _has_chunks(step: Schedule) -> bool:
        return bool(step.new) or any(not row.decode for row in step.running)

    def _drafts(self, running: list[SequenceState]) -> dict[int, tuple[int, ...]]:
        """Each decoding row's n-gram drafts, none past its own token limits."""
        if not self.speculate:
            return {}
        decoding = [s for s in running if not self._state[s.seq_id].prefilling]
        if not decoding or not self.gate.open(len(decoding)):
            return {}
        out: dict[int, tuple[int, ...]] = {}
        for sequence in decoding:
            if not speculable(sequence.request.sampling):
                continue
            room = min(
                sequence.request.stopping.max_new_tokens - len(sequence.tokens) - 1,
                sequence.max_total_tokens - sequence.next_position - 1,
            )
            if room <= 0:
                continue
            proposal = self._ngrams(sequence).propose(min(self.speculate, room))
            if proposal:
                out[sequence.seq_id] = proposal
        return out

    def _ngrams(self, sequence: SequenceState) -> NgramIndex:
        """The sequence's n-gram index, brought up to date with its newest tokens."""
        state = self._state[sequence.seq_id]
        prompt = sequence.request.input_ids
        if state.ngrams is None:
            state.ngrams = NgramIndex()
            state.ngrams.extend(prompt)
        known = len(state.ngrams.tokens) - len(prompt)
        state.ngrams.extend(token.id for token in sequence.tokens[known:])
        return state.ngrams

    def _fits_drafts(
        self, running: list[SequenceState], drafts: dict[int, tuple[int, ...]]
    ) -> bool:
        """Whether every decode row can take its drafts without preempting anyone:
        drafts are an optimisation, never worth a recompute."""
        extra = without_drafts = 0
        for sequence in running:
            state = self._state[sequence.seq_id]
            if state.prefilling:
                continue
            position = sequence.next_position
            count = len(drafts.get(sequence.seq_id, ()))
            without = state.table.blocks_needed(position + 1, self.block_size)
            extra += state.table.blocks_needed(position + 1 + count, self.block_size) - without
            without_drafts += without
        return extra == 0 or extra + without_drafts <= self.pool.num_available

    def _chunk_size(self, state: _State, budget: int, *, first: bool) -> int:
        remaining = len(state.tokens) - state.computed
        limit = self.limits.constraints.max_chunk
        splittable = self.chunked_prefill and not state.whole
        if limit is not None and remaining > limit and splittable:
            remaining = limit  # the backend's largest compiled length
        if remaining <= budget:
            return remaining
        if splittable:
            return max(budget, 0)
        return remaining if first else 0  # the first prefill of a step always runs

    def _reserve(
        self,
        state: _State,
        need: int,
        active: list[SequenceState],
        index: int,
        step: Schedule,
    ) -> bool:
        """Blocks for `need` positions, preempting the latest-admitted rows if needed.
        False when the row at `index` had to preempt itself."""
        missing = state.table.blocks_needed(need, self.block_size)
        while missing > self.pool.num_available:
            victim = active.pop()
            step.preempted.append(victim)
            self.free([victim.seq_id])
            step.running = [row for row in step.running if row.seq_id != victim.seq_id]
            if len(active) == index:  # the victim was this row
                return False
        state.table.grow(self.pool, need)
        return True

    def _chunk_row(self, sequence: SequenceState, state: _State, chunk: int) -> RunningSequence:
        """The next prefill chunk of a sequence the backend already holds."""
        start = state.computed
        end = start + chunk
        state.computed = end  # in KV once the step runs; a failed step frees the row
        return RunningSequence(
            seq_id=sequence.seq_id,
            start_position=start,
            token_ids=state.tokens[start:end],
            new_block_ids=state.unsent_blocks(),
            want_logits=end == len(state.tokens) and state.wants_first_token,
        )

    def _new_row(self, sequence: SequenceState, state: _State, chunk: int) -> NewSequence:
        """The first chunk of a sequence the backend does not hold (new or resumed)."""
        start = state.computed  # past a cached prefix, if any
        end = start + chunk
        state.computed = end
        state.sent_blocks = len(state.table.blocks)
        return new_row(
            sequence,
            token_ids=state.tokens[start:end],
            start_position=start,
            block_ids=tuple(state.table.blocks),
            want_logits=end == len(state.tokens) and state.wants_first_token,
        )

    def _admit(
        self,
        waiting: Sequence[SequenceState],
        step: Schedule,
        budget: int,
        num_running: int,
    ) -> None:
        max_rows = self.limits.max_rows
        for sequence in waiting:
            if max_rows is not None and num_running >= max_rows:
                return
            if budget <= 0 and (self._has_chunks(step) or not self.chunked_prefill):
                return
            state = self._new_state(sequence)
            hits, hit_blocks = self._lookup(sequence, state)
            state.computed = hits * self.block_size
            chunk = self._chunk_size(state, budget, first=not self._has_chunks(step))
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
            if self._may_use_cache(sequence):
                step.queried_tokens += len(state.tokens)
                step.hit_tokens += state.computed
            step.admitted.append(sequence)
            step.new.append(self._new_row(sequence, state, chunk))
            budget -= chunk
            num_running += 1

    def _new_state(self, sequence: SequenceState) -> _State:
        tokens = sequence.recompute_tokens
        keys = block_hashes(tokens, self.block_size) if self.prefix_caching else []
        return _State(
            table=BlockTable(),
            tokens=tokens,
            computed=0,
            wants_first_token=not sequence.tokens,
            whole=not sequence.tokens and sequence.request.decoder_input_details,
            keys=keys,
            registered=0,
            owner=sequence,
        )

    def _may_use_cache(self, sequence: SequenceState) -> bool:
        """Prompt logits need every position computed; a history starts from the tokens
        the plan sends, so penalised rows compute theirs too (a resumed one keeps its
        history in the engine and may use the cache)."""
        request = sequence.request
        if not self.prefix_caching or request.decoder_input_details:
            return False
        return bool(sequence.tokens) or not request.sampling.needs_history

    def _lookup(self, sequence: SequenceState, state: _State) -> tuple[int, list[int]]:
        """The longest cached run of full blocks; one prefill token is always left."""
        if not self._may_use_cache(sequence):
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
