"""Deterministic toy backends for router and server tests: no weights, instant steps.

Its "model" prefers token `(sum of the sequence's tokens + length) % vocab`, so the
expected output of any prompt is computable (`expected_tokens`), and it checks what a
real backend would silently get wrong: a decode at the wrong position, a sequence
decoded before its prefill, KV beyond capacity. Failures can be injected per prompt.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence

import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    DecodeBatch,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    PrefillBatch,
    StepOutput,
)
from tgi.errors import BackendError

__all__ = [
    "FakeBackend",
    "FakePagedBackend",
    "expected_tokens",
    "mixing_next_token",
    "paged_expected_tokens",
]


def _next_token(tokens: Sequence[int], vocab_size: int) -> int:
    return (sum(tokens) + len(tokens)) % vocab_size


def expected_tokens(prompt: Sequence[int], num_tokens: int, vocab_size: int) -> list[int]:
    """The greedy output of `FakeBackend` for `prompt`."""
    tokens = list(prompt)
    for _ in range(num_tokens):
        tokens.append(_next_token(tokens, vocab_size))
    return tokens[len(prompt) :]


class FakeBackend:
    """Implements the `Backend` protocol with per-sequence token lists as its "KV"."""

    def __init__(
        self,
        vocab_size: int = 64,
        capacity_tokens: int = 4096,
        *,
        fail_prompts: Sequence[tuple[int, ...]] = (),
        step_gate: threading.Event | None = None,
    ) -> None:
        self.vocab_size = vocab_size
        self.capacity_tokens = capacity_tokens
        self.fail_prompts = set(fail_prompts)  # a prefill containing one of these raises
        self.step_gate = step_gate  # when set, each step waits for it (tests pace steps)
        self.kv: dict[int, list[int]] = {}
        self.calls: list[tuple[str, tuple[int, ...]]] = []  # (method, seq_ids)
        self.released: list[int] = []
        self.healthy = True
        self._capabilities = Capabilities(
            batching=Batching.CONTINUOUS, kv_layout=KvLayout.PER_ROW, prompt_logits=True
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def warmup(self, limits: Limits) -> KVCapacity:
        if limits.max_total_tokens > self.capacity_tokens:
            raise BackendError("max_total_tokens does not fit the fake KV capacity")
        return KVCapacity(max_total_tokens=self.capacity_tokens, bytes_per_token=4)

    def _logits_for(self, tokens: Sequence[int]) -> torch.Tensor:
        logits = torch.zeros(self.vocab_size)
        logits[_next_token(tokens, self.vocab_size)] = 10.0
        return logits

    def _used(self) -> int:
        return sum(len(tokens) for tokens in self.kv.values())

    def _wait(self) -> None:
        if self.step_gate is not None:
            self.step_gate.wait(timeout=30)

    def prefill(self, batch: PrefillBatch) -> StepOutput:
        self._wait()
        self.calls.append(("prefill", tuple(row.seq_id for row in batch.rows)))
        logits, prompt_logits, seq_ids = [], {}, []
        for row in batch.rows:
            if row.token_ids in self.fail_prompts:
                raise BackendError(f"injected failure for prompt {row.token_ids}")
            if self._used() + len(row.token_ids) > self.capacity_tokens:
                raise BackendError("KV capacity exceeded")
            history = self.kv.setdefault(row.seq_id, [])
            if len(history) != row.start_position:
                raise BackendError(
                    f"seq {row.seq_id}: prefill at {row.start_position}, KV holds {len(history)}"
                )
            history.extend(row.token_ids)
            if row.want_prompt_logits:
                prompt_logits[row.seq_id] = torch.stack(
                    [self._logits_for(history[: i + 1]) for i in range(len(history))]
                )
            if row.want_logits:
                seq_ids.append(row.seq_id)
                logits.append(self._logits_for(history)[None, :])
        return StepOutput(tuple(seq_ids), torch.stack(logits), prompt_logits)

    def decode(self, batch: DecodeBatch) -> StepOutput:
        self._wait()
        self.calls.append(("decode", tuple(row.seq_id for row in batch.rows)))
        logits = []
        for row in batch.rows:
            history = self.kv.get(row.seq_id)
            if history is None:
                raise BackendError(f"seq {row.seq_id} decoded before prefill")
            if row.position != len(history):
                raise BackendError(
                    f"seq {row.seq_id}: decode at {row.position}, KV holds {len(history)}"
                )
            history.extend(row.token_ids)
            logits.append(self._logits_for(history)[None, :])
        return StepOutput(tuple(row.seq_id for row in batch.rows), torch.stack(logits))

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            if self.kv.pop(seq_id, None) is not None:
                self.released.append(seq_id)

    def kv_usage(self) -> KVUsage:
        return KVUsage(frozenset(self.kv), self._used(), self.capacity_tokens)

    def health(self) -> None:
        if not self.healthy:
            raise BackendError("fake backend marked unhealthy")

    def close(self) -> None:
        self.kv.clear()


def mixing_next_token(tokens: Sequence[int], vocab_size: int) -> int:
    """`FakePagedBackend`'s default model: a position-sensitive hash of the whole history,
    so a wrong block table, a swapped or overwritten block changes the next token."""
    h = 0
    for token in tokens:
        h = (h * 1_000_003 + token + 1) % _MERSENNE
    return h % vocab_size


_MERSENNE = (1 << 61) - 1
NextToken = Callable[[Sequence[int], int], int]


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
    """A `KvLayout.PAGED` backend whose "KV" is token ids in a real block pool.

    It writes each row's tokens into the blocks its `block_ids` name and computes every
    logit from the history it READS BACK through them, so any wrong block table, wrong
    sharing, lost or overwritten block changes the output. It also keeps, per sequence,
    the tokens it was told (its shadow) and fails the step when a read-back disagrees:
    corruption is caught at once, not only when it happens to change a token. Supports
    chunked prefill, prefix-cache starts (`start_position > 0` on a new sequence), decode
    rows with drafts (T > 1, with rewind to the first rejected position) and prompt
    logits. `next_token(history, vocab)` is the "model" (default `mixing_next_token`).
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
    ) -> None:
        self.vocab_size = vocab_size
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.next_token = next_token
        self.step_gate = step_gate
        self.blocks: list[list[int | None]] = [[None] * block_size for _ in range(num_blocks)]
        self.shadow: dict[int, list[int]] = {}  # seq_id -> tokens in KV, as told
        self.calls: list[tuple[str, tuple[int, ...]]] = []
        self.released: list[int] = []
        self.prefill_tokens = 0  # tokens computed by prefills (prefix hits are not)
        self.decode_widths: list[int] = []  # T of each decode call
        # per prefill call: (seq_id, start_position, len(token_ids), want_logits) per row
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
        )

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def warmup(self, limits: Limits) -> KVCapacity:
        total = self.num_blocks * self.block_size
        if limits.max_total_tokens > total:
            raise BackendError("max_total_tokens does not fit the fake block pool")
        return KVCapacity(
            max_total_tokens=total,
            bytes_per_token=4,
            block_size=self.block_size,
            num_blocks=self.num_blocks,
        )

    # ---- the pool ----------------------------------------------------------------------

    def _slot(self, block_ids: Sequence[int], position: int) -> tuple[int, int]:
        index = position // self.block_size
        if index >= len(block_ids):
            raise BackendError(f"position {position} is past the block table {list(block_ids)}")
        block = block_ids[index]
        if not 0 <= block < self.num_blocks:
            raise BackendError(f"block {block} is not in the pool")
        return block, position % self.block_size

    def _write(self, block_ids: Sequence[int], start: int, tokens: Sequence[int]) -> None:
        for offset, token in enumerate(tokens):
            block, slot = self._slot(block_ids, start + offset)
            self.blocks[block][slot] = token

    def _read(self, seq_id: int, block_ids: Sequence[int], length: int) -> list[int]:
        out = []
        for position in range(length):
            block, slot = self._slot(block_ids, position)
            token = self.blocks[block][slot]
            if token is None:
                raise BackendError(f"seq {seq_id}: position {position} (block {block}) unwritten")
            out.append(token)
        return out

    def _check(self, seq_id: int, history: list[int]) -> None:
        if history != self.shadow[seq_id]:
            pairs = zip(history, self.shadow[seq_id], strict=False)
            diff = next((i for i, (a, b) in enumerate(pairs) if a != b), len(history))
            raise BackendError(f"seq {seq_id}: KV read back differs at position {diff}")

    def _logits(self, history: Sequence[int], first: int, last: int) -> torch.Tensor:
        """[last - first, V]: logits after each of history[:first+1] .. history[:last]."""
        rows = torch.zeros(last - first, self.vocab_size)
        for i, end in enumerate(range(first + 1, last + 1)):
            rows[i, self.next_token(history[:end], self.vocab_size)] = 10.0
        return rows

    def _wait(self) -> None:
        if self.step_gate is not None:
            self.step_gate.wait(timeout=30)

    # ---- the contract ------------------------------------------------------------------

    def prefill(self, batch: PrefillBatch) -> StepOutput:
        self._wait()
        self.calls.append(("prefill", tuple(row.seq_id for row in batch.rows)))
        self.prefill_rows.append(
            [(r.seq_id, r.start_position, len(r.token_ids), r.want_logits) for r in batch.rows]
        )
        logits, prompt_logits, seq_ids = [], {}, []
        for row in batch.rows:
            start, end = row.start_position, row.start_position + len(row.token_ids)
            if not row.token_ids:
                raise BackendError(f"seq {row.seq_id}: empty prefill row")
            if row.seq_id in self.shadow:
                if len(self.shadow[row.seq_id]) != start:
                    raise BackendError(
                        f"seq {row.seq_id}: chunk at {start}, KV holds "
                        f"{len(self.shadow[row.seq_id])}"
                    )
            else:  # new: positions before start come from the prefix cache
                self.shadow[row.seq_id] = self._read(row.seq_id, row.block_ids, start)
            self._write(row.block_ids, start, row.token_ids)
            self.shadow[row.seq_id].extend(row.token_ids)
            history = self._read(row.seq_id, row.block_ids, end)
            self._check(row.seq_id, history)
            self.prefill_tokens += len(row.token_ids)
            if row.want_prompt_logits:
                prompt_logits[row.seq_id] = self._logits(history, start, end)
            if row.want_logits:
                seq_ids.append(row.seq_id)
                logits.append(self._logits(history, end - 1, end))
        stacked = torch.stack(logits) if logits else torch.zeros(0, 1, self.vocab_size)
        return StepOutput(tuple(seq_ids), stacked, prompt_logits)

    def decode(self, batch: DecodeBatch) -> StepOutput:
        self._wait()
        self.calls.append(("decode", tuple(row.seq_id for row in batch.rows)))
        widths = {len(row.token_ids) for row in batch.rows}
        if len(widths) != 1:
            raise BackendError(f"decode rows of different lengths {sorted(widths)}")
        width = widths.pop()
        self.decode_widths.append(width)
        logits = []
        for row in batch.rows:
            shadow = self.shadow.get(row.seq_id)
            if shadow is None:
                raise BackendError(f"seq {row.seq_id} decoded before prefill")
            if row.position > len(shadow):
                raise BackendError(
                    f"seq {row.seq_id}: decode at {row.position}, KV holds {len(shadow)}"
                )
            del shadow[row.position :]  # rejected drafts of the last step are junk
            self._write(row.block_ids, row.position, row.token_ids)
            shadow.extend(row.token_ids)
            history = self._read(row.seq_id, row.block_ids, row.position + width)
            self._check(row.seq_id, history)
            logits.append(self._logits(history, row.position, row.position + width))
        return StepOutput(tuple(row.seq_id for row in batch.rows), torch.stack(logits))

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            if self.shadow.pop(seq_id, None) is not None:
                self.released.append(seq_id)

    def kv_usage(self) -> KVUsage:
        used = sum(len(tokens) for tokens in self.shadow.values())
        return KVUsage(frozenset(self.shadow), used, self.num_blocks * self.block_size)

    def health(self) -> None:
        if not self.healthy:
            raise BackendError("fake backend marked unhealthy")

    def close(self) -> None:
        self.shadow.clear()
