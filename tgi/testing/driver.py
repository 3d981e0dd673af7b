"""`Driver`: a minimal router over one backend, for the conformance suite and backend tests.

NOTE: it sends what the real scheduler sends under contract v2, and nothing more:

    new sequence    NewSequence(first chunk, FULL block table or slot, want_logits, ...)
    later chunk     RunningSequence(start_position, token_ids=chunk, new_block_ids)
    decode          RunningSequence(start_position, decode=True, last_token, drafts,
                                    new_block_ids)      <- () unless a block boundary
    ended           finished / preempted ids in the NEXT plan (or `release` at once)

It allocates paged block tables with the router's own allocator (`tgi.router.paging`),
shares cached prefix blocks (`prefill(..., cached=True)` after `share_prefix`), assigns
static slots, and samples greedily (`argmax`, or the token ids of a backend that samples
on its device), so two runs agree exactly when the backend's logits pick the same
tokens. Every output is checked against its plan (rows, [R, T, V] shape, prompt logits).

With `wire=True` every plan crosses `tgi.backend.wire` (encoded, decoded, compared)
before the backend sees it, and each step's `StepResult` (the picked tokens and the
backend's `KVUsage`) makes the round trip back, as they would between processes.

With `engine=` (the suite's `worker` variant, `tgi.testing.worker`) every plan goes to
`Engine.run` instead of `backend.step`: the engine's sampler picks the tokens (default
`SamplingParams`: greedy) and accepts drafts, and the driver takes each row's tokens
from `StepResult.tokens`; `kv_usage` and `release` go to the engine too. There are no
logits to check then: `send` returns the rows and their first tokens (`token_ids`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from tgi.backend import wire as wire_format
from tgi.backend.contract import (
    Backend,
    KVCapacity,
    KvLayout,
    KVUsage,
    NewSequence,
    RunningSequence,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.backend.wire import MessageT
from tgi.engine.protocol import Engine
from tgi.engine.results import StepResult
from tgi.router.paging import BlockPool, BlockTable, block_hashes
from tgi.router.paging.prefix import ROOT
from tgi.sampling.params import SamplingParams

__all__ = ["Chunk", "Driver", "round_trip"]

# A chunk of a prompt for `Driver.step`: its token ids, and whether it is the last one.
Chunk = tuple[Sequence[int], bool]


def round_trip(message: MessageT) -> MessageT:
    """`message` encoded and decoded by `tgi.backend.wire`; asserts nothing changed."""
    back = wire_format.decode(wire_format.encode(message), type(message))
    assert back == message, f"the wire changed {type(message).__name__}: {message} -> {back}"
    return back


@dataclass(slots=True)
class _Seq:
    prompt: list[int]  # prompt tokens sent so far (prefill_chunk appends)
    generated: list[int] = field(default_factory=list)  # the last one is not in KV yet
    slot: int | None = None
    table: BlockTable = field(default_factory=BlockTable)
    sent_blocks: int = 0  # blocks of `table` the backend was told about
    sampling: SamplingParams = field(default_factory=SamplingParams)  # sent with NewSequence
    adapter_id: str | None = None

    @property
    def in_kv(self) -> int:
        """Tokens in the backend's KV that count: what the next decode row starts at."""
        return len(self.prompt) + max(len(self.generated) - 1, 0)


class Driver:
    """Builds v2 plans for one backend's layout and samples their outputs greedily.

    `report` is what the backend's `warmup` returned. Public state: `seqs` (seq_id ->
    prompt, generated tokens, slot, block table), `plans` (every plan sent, in order)
    and `pool` (paged layouts: the block allocator).

    `prefill`, `step` and `send` send exactly the rows they are given (the test picks
    the shapes); only `generate` splits its decode rows into steps of at most
    `report.constraints.max_rows`.

    With `engine`, plans, `kv_usage` and `release` go to the engine, and `backend` is
    only what tests call directly (`tgi.testing.worker.EngineBackend(engine)`).
    """

    def __init__(
        self,
        backend: Backend,
        report: WarmupReport | KVCapacity,
        *,
        wire: bool = False,
        engine: Engine | None = None,
    ) -> None:
        self.backend = backend
        self.engine = engine
        self.report = report if isinstance(report, WarmupReport) else WarmupReport(report)
        self.capacity = self.report.kv
        self.constraints = self.report.constraints
        self.caps = backend.capabilities
        self.wire = wire
        self.seqs: dict[int, _Seq] = {}
        self.plans: list[StepPlan] = []
        self.pool: BlockPool | None = None
        self.block_size = 1
        if self.caps.kv_layout is KvLayout.PAGED:
            self.block_size = self.capacity.block_size or self.caps.block_size or 1
            self.pool = BlockPool(self.capacity.num_blocks or 1, self.block_size)
        num_slots = self.caps.static_batch_size if self._uses_slots() else None
        self._free_slots = list(range(num_slots or 0))
        self._finished: list[int] = []
        self._preempted: list[int] = []
        self._step_index = itertools.count(1)

    # ---- whole steps ------------------------------------------------------------------

    def prefill(
        self,
        prompts: Mapping[int, Sequence[int]],
        *,
        want_prompt_logits: bool = False,
        cached: bool = False,
        sampling: SamplingParams | None = None,
    ) -> StepOutput:
        """New sequences with their whole prompts; each greedy token is its first one.
        `cached` (paged): each first takes the longest run of keyed prefix blocks
        (`share_prefix`), always leaving one token to compute, and starts after it.
        `sampling` travels with each NewSequence (a backend sampling on its device
        uses it, and so does an engine's sampler; otherwise the driver samples greedily
        whatever it says)."""
        new = [
            self.new_row(
                s, p, want_prompt_logits=want_prompt_logits, cached=cached, sampling=sampling
            )
            for s, p in prompts.items()
        ]
        return self.send(new, [])

    def prefill_chunk(self, seq_id: int, token_ids: Sequence[int], *, last: bool) -> StepOutput:
        """One chunk of a chunked prefill (a NewSequence first, then chunk rows); only
        the last chunk asks for logits."""
        return self.step(chunks={seq_id: (token_ids, last)})

    def decode(
        self, seq_ids: Sequence[int], *, drafts: Mapping[int, Sequence[int]] | None = None
    ) -> StepOutput:
        """Advance `seq_ids` by one token each; with `drafts` a row also carries its
        drafts and takes the greedy tokens while they match (the exact-match rule)."""
        return self.step(decode=seq_ids, drafts=drafts)

    def step(
        self,
        *,
        prompts: Mapping[int, Sequence[int]] | None = None,
        chunks: Mapping[int, Chunk] | None = None,
        decode: Sequence[int] = (),
        drafts: Mapping[int, Sequence[int]] | None = None,
        want_prompt_logits: bool = False,
        cached: bool = False,
    ) -> StepOutput:
        """One plan of any mix: new sequences (`prompts`, whole), chunks (a new sequence's
        first or a running one's next), decode rows (with `drafts`), plus every id
        `finish`/`preempt` queued since the last step."""
        new: list[NewSequence] = [
            self.new_row(s, p, want_prompt_logits=want_prompt_logits, cached=cached)
            for s, p in (prompts or {}).items()
        ]
        running: list[RunningSequence] = []
        for seq_id, (token_ids, last) in (chunks or {}).items():
            row = self.chunk_row(seq_id, token_ids, last=last)
            if isinstance(row, NewSequence):
                new.append(row)
            else:
                running.append(row)
        drafts = drafts or {}
        running += [self.decode_row(s, drafts.get(s, ())) for s in decode]
        return self.send(new, running)

    def resume(self, seq_id: int) -> StepOutput:
        """Bring a preempted sequence back under its id: prompt + generated minus the
        pending token, no logits; its next decode row feeds the pending token."""
        return self.send([self.resume_row(seq_id)], [])

    def generate(self, targets: Mapping[int, int]) -> None:
        """Decode the live sequences together until each has `targets[seq_id]` tokens,
        at most `constraints.max_rows` rows a step."""
        width = self.constraints.max_rows or len(targets) or 1
        while True:
            active = [s for s, n in targets.items() if len(self.seqs[s].generated) < n]
            if not active:
                return
            for start in range(0, len(active), width):
                self.decode(active[start : start + width])

    def flush(self) -> StepOutput:
        """A plan with no rows: only the queued `finished` and `preempted` ids."""
        return self.send([], [])

    # ---- ending sequences -------------------------------------------------------------

    def finish(self, seq_ids: Sequence[int]) -> None:
        """End sequences: their blocks and slots are free at once (a sequence admitted
        in the same plan may take them), the backend hears in the next plan."""
        for seq_id in seq_ids:
            self._free(self.seqs.pop(seq_id))
            self._finished.append(seq_id)

    def preempt(self, seq_ids: Sequence[int]) -> None:
        """Free KV, blocks and slot but keep the tokens, for `resume`; the backend hears
        in the next plan."""
        for seq_id in seq_ids:
            self._free(self.seqs[seq_id])
            self._preempted.append(seq_id)

    def release(self, seq_ids: Sequence[int]) -> None:
        """End sequences outside a step (`Backend.release`, or `Engine.release`, which
        also drops their sampler state), as shutdown does."""
        for seq_id in seq_ids:
            seq = self.seqs.pop(seq_id, None)
            if seq is not None:
                self._free(seq)
        if self.engine is not None:
            self.engine.release(seq_ids)
        else:
            self.backend.release(seq_ids)

    def release_all(self) -> None:
        """Release every sequence the driver holds, preempted ones and ended ones not
        sent yet included: a backend or engine that outlives this driver (the suite's
        shared worker) is left holding nothing."""
        ids = [*self.seqs, *self._finished, *self._preempted]
        self._finished.clear()
        self._preempted.clear()
        self.release(list(dict.fromkeys(ids)))

    # ---- reading ----------------------------------------------------------------------

    def tokens(self, seq_id: int) -> list[int]:
        return list(self.seqs[seq_id].generated)

    def block_ids(self, seq_id: int) -> tuple[int, ...]:
        return tuple(self.seqs[seq_id].table.blocks)

    def kv_usage(self) -> KVUsage:
        """The backend's `kv_usage()`, through the wire when the driver uses it (or the
        engine's)."""
        if self.engine is not None:
            return self.engine.kv_usage()
        usage = self.backend.kv_usage()
        return round_trip(usage) if self.wire else usage

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

    # ---- rows, for tests that build plans themselves ------------------------------------

    def new_row(
        self,
        seq_id: int,
        prompt: Sequence[int],
        *,
        want_logits: bool = True,
        want_prompt_logits: bool = False,
        cached: bool = False,
        sampling: SamplingParams | None = None,
        adapter_id: str | None = None,
    ) -> NewSequence:
        """Admit a new sequence: its slot or full block table, the whole prompt."""
        seq = self.seqs[seq_id] = _Seq(list(prompt), adapter_id=adapter_id)
        seq.sampling = sampling or seq.sampling
        self._take_slot(seq)
        start = self._take_cached(seq) if cached else 0
        return NewSequence(
            seq_id,
            tuple(prompt[start:]),
            start_position=start,
            block_ids=self._table(seq, len(prompt)),
            slot=seq.slot,
            want_logits=want_logits,
            want_prompt_logits=want_prompt_logits,
            adapter_id=adapter_id,
            sampling=seq.sampling,
        )

    def chunk_row(
        self, seq_id: int, token_ids: Sequence[int], *, last: bool
    ) -> NewSequence | RunningSequence:
        """The next chunk of `seq_id`'s prompt: a NewSequence when it is the first."""
        seq = self.seqs.get(seq_id)
        if seq is None:
            return self.new_row(seq_id, token_ids, want_logits=last)
        start = len(seq.prompt)
        seq.prompt.extend(token_ids)
        return RunningSequence(
            seq_id,
            start,
            tuple(token_ids),
            new_block_ids=self._unsent(seq, start + len(token_ids)),
            want_logits=last,
        )

    def decode_row(self, seq_id: int, drafts: Sequence[int] = ()) -> RunningSequence:
        """Feed the pending token (and `drafts`), from where the KV that counts ends."""
        seq = self.seqs[seq_id]
        start = seq.in_kv
        return RunningSequence(
            seq_id,
            start,
            tuple(drafts),
            decode=True,
            last_token=seq.generated[-1],
            new_block_ids=self._unsent(seq, start + 1 + len(drafts)),
        )

    def resume_row(self, seq_id: int) -> NewSequence:
        """A preempted sequence again, under its id, into fresh blocks or a free slot."""
        seq = self.seqs[seq_id]
        history = seq.prompt + seq.generated[:-1]
        self._take_slot(seq)
        return NewSequence(
            seq_id,
            tuple(history),
            block_ids=self._table(seq, len(history)),
            slot=seq.slot,
            want_logits=False,
            adapter_id=seq.adapter_id,
            sampling=seq.sampling,
        )

    def send(self, new: Sequence[NewSequence], running: Sequence[RunningSequence]) -> StepOutput:
        """Send one plan (with the queued ended ids), check the output against it and
        take each logits row's greedy tokens (with an engine: the tokens it sampled)."""
        plan = StepPlan(
            new=tuple(new),
            running=tuple(running),
            finished=tuple(self._finished),
            preempted=tuple(self._preempted),
            step_index=next(self._step_index),
        )
        self._finished.clear()
        self._preempted.clear()
        self.plans.append(plan)
        if self.engine is not None:
            self.engine.submit(plan)
            return self._take_sampled(plan, self.engine.collect())
        out = self.backend.step(round_trip(plan) if self.wire else plan)
        picked = self._picked(plan, out)
        result = self._take(plan, picked)
        if self.wire:
            round_trip(result)
        return out

    # ---- internals --------------------------------------------------------------------

    def _picked(self, plan: StepPlan, out: StepOutput) -> list[list[int]]:
        """Per logits row, the greedy token of each of its `num_logits` positions."""
        rows = plan.logits_rows
        want = tuple(row.seq_id for row in rows)
        assert out.seq_ids == want, f"step {plan.step_index}: rows {out.seq_ids}, asked for {want}"
        asked = {new.seq_id for new in plan.new if new.want_prompt_logits}
        assert set(out.prompt_logits) == asked, f"prompt logits for {set(out.prompt_logits)}"
        if self.caps.samples_on_device:
            assert all(row.num_logits == 1 for row in rows), "a device sampler returns 1 token"
            assert out.token_ids is not None and tuple(out.token_ids.shape) == (len(rows),)
            return [[int(token)] for token in out.token_ids.tolist()]
        if not rows:
            assert out.logits is None or out.logits.shape[0] == 0, "logits for no rows"
            return []
        width = max(row.num_logits for row in rows)
        assert out.logits is not None, f"step {plan.step_index}: no logits"
        shape = tuple(out.logits.shape[:2])
        assert shape == (len(rows), width), (
            f"logits {tuple(out.logits.shape)}, want [{len(rows)}, {width}, V]"
        )
        tokens = out.logits.argmax(dim=-1).tolist()  # [R, T]
        return [row_tokens[: row.num_logits] for row_tokens, row in zip(tokens, rows, strict=True)]

    def _take(self, plan: StepPlan, picked: list[list[int]]) -> StepResult:
        """Append the picked tokens (drafts accepted while they match); the result the
        engine would send back for this step."""
        result = StepResult(step_index=plan.step_index)
        for row, tokens in zip(plan.logits_rows, picked, strict=True):
            accepted = tokens[:1]
            if isinstance(row, RunningSequence) and row.decode:
                for draft, token in zip(row.token_ids, tokens[1:], strict=True):
                    if draft != accepted[-1]:
                        break
                    accepted.append(token)
                result.drafts_proposed += len(row.token_ids)
                result.drafts_accepted += len(accepted) - 1
            self.seqs[row.seq_id].generated.extend(accepted)
            result.tokens += [(row.seq_id, token, 0.0) for token in accepted]
        if self.wire:
            result.kv = self.backend.kv_usage()
        return result

    def _take_sampled(self, plan: StepPlan, result: StepResult) -> StepOutput:
        """Append the tokens the engine sampled (drafts it accepted included), checked
        against the plan; the output without logits: rows and their first tokens."""
        step = f"step {plan.step_index}"
        assert not result.errors and not result.recompute, (
            f"{step} failed in the engine: {result.errors}, recompute {result.recompute}"
        )
        picked: dict[int, list[int]] = {}
        for seq_id, token, _ in result.tokens:
            picked.setdefault(seq_id, []).append(token)
        rows = plan.logits_rows
        want = tuple(row.seq_id for row in rows)
        assert tuple(picked) == want, f"{step}: tokens for {tuple(picked)}, asked for {want}"
        for row in rows:
            assert len(picked[row.seq_id]) <= row.num_logits, f"{step}: {picked[row.seq_id]}"
            self.seqs[row.seq_id].generated.extend(picked[row.seq_id])
        asked = {new.seq_id for new in plan.new if new.want_prompt_logits}
        got = set(result.prompt_logprobs)
        assert got == asked, f"{step}: prompt logprobs for {got}, asked for {asked}"
        firsts = [tokens[0] for tokens in picked.values()]
        return StepOutput(want, logits=None, token_ids=torch.tensor(firsts, dtype=torch.int64))

    def _uses_slots(self) -> bool:
        return self.caps.kv_layout is KvLayout.SLOTS or self.caps.static_batch_size is not None

    def _take_slot(self, seq: _Seq) -> None:
        if self._uses_slots():
            assert self._free_slots, "no free slot: release a sequence first"
            seq.slot = self._free_slots.pop(0)

    def _table(self, seq: _Seq, num_tokens: int) -> tuple[int, ...]:
        """The whole block table, grown to `num_tokens`, all of it now sent."""
        self._unsent(seq, num_tokens)
        return tuple(seq.table.blocks)

    def _unsent(self, seq: _Seq, num_tokens: int) -> tuple[int, ...]:
        """Grow the table to `num_tokens`; the blocks the backend has not heard of."""
        if self.pool is None:
            return ()
        seq.table.grow(self.pool, num_tokens)
        new = tuple(seq.table.blocks[seq.sent_blocks :])
        seq.sent_blocks = len(seq.table.blocks)
        return new

    def _free(self, seq: _Seq) -> None:
        if self.pool is not None:
            seq.table.free(self.pool)
        seq.sent_blocks = 0
        if seq.slot is not None:
            self._free_slots.append(seq.slot)
            seq.slot = None

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
