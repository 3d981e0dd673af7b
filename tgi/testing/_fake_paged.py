"""`FakePagedBackend`: a `KvLayout.PAGED` backend whose "KV" is token ids in a real block pool.

NOTE: it keeps each live sequence's block table itself, as a real paged backend must
under contract v2: a `NewSequence` brings the full table, a `RunningSequence` only the
blocks appended this step (`new_block_ids`). Token `p` of a sequence lives in block
`table[p // block_size]` at offset `p % block_size`:

    block_size 4     table [7, 2, 9]
    position         0 1 2 3 | 4 5 6 7 | 8 9 .
    block            7       | 2       | 9

Every logit is computed from the history READ BACK through the table, so a wrong table
(a block missing, swapped, shared while written, reused while still live) changes the
output; the fake also keeps the tokens it was told per sequence (its shadow) and fails
the step when a read-back disagrees, so corruption is caught at once.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Callable, Sequence

import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    FedTokens,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    NewSequence,
    RunningSequence,
    StepConstraints,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.errors import BackendError
from tgi.testing._fake_plan import check_plan, log_calls, logits_ends, pad_logits

__all__ = ["FakePagedBackend", "NextToken", "mixing_next_token", "paged_expected_tokens"]

_MERSENNE = (1 << 61) - 1
NextToken = Callable[[Sequence[int], int], int]


def mixing_next_token(tokens: Sequence[int], vocab_size: int) -> int:
    """`FakePagedBackend`'s default model: a position-sensitive hash of the whole history,
    so a wrong block table, a swapped or overwritten block changes the next token."""
    h = 0
    for token in tokens:
        h = (h * 1_000_003 + token + 1) % _MERSENNE
    return h % vocab_size


def paged_expected_tokens(
    prompt: Sequence[int],
    num_tokens: int,
    vocab_size: int,
    next_token: NextToken = mixing_next_token,
) -> list[int]:
    """The greedy output of a `FakePagedBackend` with that `next_token` model."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(next_token(tokens, vocab_size))
    return tokens[len(prompt) :]


class FakePagedBackend:
    """Paged continuous batching over a block pool of token ids (see the module note).

    Supports chunked prefill, prefix-cache starts (`start_position > 0` on a new
    sequence: those positions are read from the blocks it was given), decode rows with
    drafts (T > 1; a later step may start below the KV count, over rejected drafts) and
    prompt logits. `next_token(history, vocab)` is the "model".

    Records `plans`, `calls` (as `FakeBackend`), `released`, `prefill_rows` (per step
    with new or chunk rows: `(seq_id, start_position, len(token_ids), want_logits)` of
    each), `prefill_tokens` (tokens computed by those rows; prefix hits are not) and
    `decode_widths` (per step with decode rows: its largest 1 + drafts). With
    `fed_tokens` it declares that capability and counts in `fed_rows` the decode rows
    whose token came as `FedTokens` (read back from the tensor, as a device would).
    """

    def __init__(
        self,
        vocab_size: int = 64,
        *,
        num_blocks: int = 64,
        block_size: int = 4,
        next_token: NextToken = mixing_next_token,
        speculation: bool = True,
        chunked_prefill: bool = True,
        prefix_caching: bool = True,
        step_gate: threading.Event | None = None,
        constraints: StepConstraints | None = None,
        fed_tokens: bool = False,
    ) -> None:
        self.vocab_size = vocab_size
        self.fed_rows = 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.next_token = next_token
        self.step_gate = step_gate
        self.constraints = constraints or StepConstraints()
        self.blocks: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.tables: dict[int, list[int]] = {}  # seq_id -> its block table, as told
        self.shadow: dict[int, list[int]] = {}  # seq_id -> tokens in KV, as told
        self.plans: list[StepPlan] = []
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.released: list[int] = []
        self.prefill_tokens = 0
        self.decode_widths: list[int] = []
        self.prefill_rows: list[list[tuple[int, int, int, bool]]] = []
        self.healthy = True
        self._capabilities = Capabilities(
            batching=Batching.CONTINUOUS,
            kv_layout=KvLayout.PAGED,
            block_size=block_size,
            chunked_prefill=chunked_prefill,
            prefix_caching=prefix_caching,
            speculation=speculation,
            prompt_logits=True,
            fed_tokens=fed_tokens,
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def warmup(self, limits: Limits) -> WarmupReport:
        total = self.num_blocks * self.block_size
        if limits.max_total_tokens > total:
            raise BackendError("max_total_tokens does not fit the fake block pool")
        capacity = KVCapacity(
            total_tokens=total,
            bytes_per_token=4,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
        )
        return WarmupReport(kv=capacity, constraints=self.constraints)

    # ---- the pool ----------------------------------------------------------------------

    def _slot(self, table: Sequence[int], position: int) -> tuple[int, int]:
        index = position // self.block_size
        if index >= len(table):
            raise BackendError(f"position {position} is past the block table {list(table)}")
        block = table[index]
        if not 0 <= block < self.num_blocks:
            raise BackendError(f"block {block} is not in the pool")
        return block, position % self.block_size

    def _write(self, table: Sequence[int], start: int, tokens: Sequence[int]) -> None:
        for offset, token in enumerate(tokens):
            block, slot = self._slot(table, start + offset)
            self.blocks[block][slot] = token

    def _read(self, seq_id: int, table: Sequence[int], length: int) -> list[int]:
        out = []
        for position in range(length):
            block, slot = self._slot(table, position)
            token = self.blocks[block][slot]
            if token is None:
                raise BackendError(f"seq {seq_id}: position {position} (block {block}) unwritten")
            out.append(token)
        return out

    def _verify(self, seq_id: int, history: list[int]) -> None:
        if history != self.shadow[seq_id]:
            pairs = zip(history, self.shadow[seq_id], strict=False)
            diff = next((i for i, (a, b) in enumerate(pairs) if a != b), len(history))
            raise BackendError(f"seq {seq_id}: KV read back differs at position {diff}")

    def _logits(self, history: Sequence[int], ends: Sequence[int]) -> torch.Tensor:
        """[len(ends), V]: the model's logits after each prefix history[:end]."""
        rows = torch.zeros(len(ends), self.vocab_size)
        for i, end in enumerate(ends):
            rows[i, self.next_token(history[:end], self.vocab_size)] = 10.0
        return rows

    # ---- the contract ------------------------------------------------------------------

    def step(self, plan: StepPlan, fed: FedTokens | None = None) -> StepOutput:
        """Check the plan, drop `finished`/`preempted`, take in `new`, then write every
        row's tokens through its table and compute logits from what reads back."""
        if self.step_gate is not None:
            self.step_gate.wait(timeout=30)
        if fed is not None:
            if not self._capabilities.fed_tokens:
                raise BackendError("FedTokens reached a backend that does not take them")
            plan = _with_fed_tokens(plan, fed)
            self.fed_rows += len(fed.rows)
        self.plans.append(plan)
        log_calls(self.calls, plan)
        self._check(plan)
        self._record(plan)
        self._drop((*plan.finished, *plan.preempted))
        histories: dict[int, list[int]] = {}
        for new in plan.new:
            self.tables[new.seq_id] = list(new.block_ids)
            # positions before start_position come from the prefix cache's blocks
            self.shadow[new.seq_id] = self._read(new.seq_id, new.block_ids, new.start_position)
            histories[new.seq_id] = self._run(new.seq_id, new.start_position, new.input_ids)
        for row in plan.running:
            self.tables[row.seq_id].extend(row.new_block_ids)
            del self.shadow[row.seq_id][row.start_position :]  # rejected drafts are junk
            histories[row.seq_id] = self._run(row.seq_id, row.start_position, row.input_ids)
        logits = [
            self._logits(histories[row.seq_id], logits_ends(row, len(histories[row.seq_id])))
            for row in plan.logits_rows
        ]
        prompt_logits = {
            new.seq_id: self._logits(
                histories[new.seq_id],
                range(new.start_position + 1, new.start_position + len(new.token_ids) + 1),
            )
            for new in plan.new
            if new.want_prompt_logits
        }
        seq_ids = tuple(row.seq_id for row in plan.logits_rows)
        return StepOutput(seq_ids, pad_logits(logits, self.vocab_size), prompt_logits)

    def _run(self, seq_id: int, start: int, tokens: Sequence[int]) -> list[int]:
        table = self.tables[seq_id]
        self._write(table, start, tokens)
        self.shadow[seq_id].extend(tokens)
        history = self._read(seq_id, table, start + len(tokens))
        self._verify(seq_id, history)
        return history

    def _check(self, plan: StepPlan) -> None:
        check_plan(plan, self.capabilities, self.constraints, {})
        for seq_id in (*plan.finished, *plan.preempted):
            if seq_id not in self.shadow:
                raise BackendError(f"seq {seq_id} ended but the backend does not hold it")
        dropped = {*plan.finished, *plan.preempted}
        for new in plan.new:
            if new.seq_id in self.shadow and new.seq_id not in dropped:
                raise BackendError(f"seq {new.seq_id} is new but already held")
        for row in plan.running:
            self._check_running(row, dropped)

    def _check_running(self, row: RunningSequence, dropped: set[int]) -> None:
        shadow = self.shadow.get(row.seq_id)
        if shadow is None or row.seq_id in dropped:
            raise BackendError(f"seq {row.seq_id} runs but the backend does not hold it")
        held = len(shadow)
        if row.start_position > held or (row.start_position < held and not row.decode):
            raise BackendError(f"seq {row.seq_id}: step at {row.start_position}, KV holds {held}")
        table = [*self.tables[row.seq_id], *row.new_block_ids]
        if len(set(table)) != len(table):
            raise BackendError(f"seq {row.seq_id}: its block table holds a block twice {table}")
        if row.decode and row.last_token is None:
            raise BackendError(
                f"decode row of seq {row.seq_id} reached the backend without a token"
            )

    def _record(self, plan: StepPlan) -> None:
        prefill: list[NewSequence | RunningSequence] = [
            row for row in plan.rows if isinstance(row, NewSequence) or not row.decode
        ]
        if prefill:
            self.prefill_rows.append(
                [(r.seq_id, r.start_position, len(r.token_ids), r.want_logits) for r in prefill]
            )
            self.prefill_tokens += sum(len(row.token_ids) for row in prefill)
        widths = [row.num_logits for row in plan.running if row.decode]
        if widths:
            self.decode_widths.append(max(widths))

    def _drop(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.tables.pop(seq_id, None)
            if self.shadow.pop(seq_id, None) is not None:
                self.released.append(seq_id)

    def release(self, seq_ids: Sequence[int]) -> None:
        self._drop(seq_ids)

    def kv_usage(self) -> KVUsage:
        used = sum(len(tokens) for tokens in self.shadow.values())
        return KVUsage(frozenset(self.shadow), used, self.num_blocks * self.block_size)

    def health(self) -> None:
        if not self.healthy:
            raise BackendError("fake backend marked unhealthy")

    def close(self) -> None:
        self.shadow.clear()
        self.tables.clear()


def _with_fed_tokens(plan: StepPlan, fed: FedTokens) -> StepPlan:
    """`plan` with the tokens `fed` brings written into its decode rows."""
    running = []
    for row in plan.running:
        index = fed.rows.get(row.seq_id)
        if index is not None:
            if not row.decode or row.last_token is not None:
                raise BackendError(f"FedTokens name seq {row.seq_id}, which has its token")
            row = dataclasses.replace(row, last_token=int(fed.ids[index]))
        running.append(row)
    return dataclasses.replace(plan, running=tuple(running))
