"""A deterministic toy backend for router and server tests: no weights, instant steps.

Its "model" prefers token `(sum of the sequence's tokens + length) % vocab`, so the
expected output of any prompt is computable (`expected_tokens`), and it checks what a
real backend would silently get wrong: a decode at the wrong position, a sequence
decoded before its prefill, KV beyond capacity. Failures can be injected per prompt.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

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

__all__ = ["FakeBackend", "expected_tokens"]


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
