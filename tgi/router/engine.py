"""What runs on the engine thread: backend calls and sampling for one scheduler step.

NOTE: this is the hot path. Per-row sampling tensors are rebuilt only when the set of
rows changes; each forward ends with exactly one device-to-host copy (the sampled ids
and their logprobs, through `.tolist()`), which the router needs to detokenize.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence as Seq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tgi.backend.contract import (
    Backend,
    DecodeBatch,
    DecodeRow,
    KVUsage,
    PrefillBatch,
    PrefillRow,
    StepOutput,
)
from tgi.sampling import SamplingBatch, SamplingParams, sample

if TYPE_CHECKING:
    from tgi.router.sequence import Sequence

__all__ = ["EngineStep", "StepPlan", "StepResult"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StepPlan:
    """Everything the engine thread needs for one step, built on the loop thread."""

    release: tuple[int, ...]  # sequences whose KV to free first
    prefill: PrefillBatch | None
    prefill_sampling: tuple[SamplingParams, ...]
    decode: DecodeBatch | None
    decode_sampling: tuple[SamplingParams, ...]
    decode_steps: tuple[int, ...]  # tokens generated so far, per decode row

    @classmethod
    def build(
        cls, *, release: tuple[int, ...], prefill: Seq[Sequence], decode: Seq[Sequence]
    ) -> StepPlan:
        prefill_batch = None
        if prefill:
            prefill_batch = PrefillBatch(
                tuple(
                    PrefillRow(
                        seq_id=seq.seq_id,
                        token_ids=seq.request.input_ids,
                        want_prompt_logits=seq.request.decoder_input_details,
                    )
                    for seq in prefill
                )
            )
        decode_batch = None
        if decode:
            decode_batch = DecodeBatch(
                tuple(
                    DecodeRow(
                        seq_id=seq.seq_id,
                        token_ids=(seq.tokens[-1].id,),
                        position=seq.next_position,
                    )
                    for seq in decode
                )
            )
        return cls(
            release=release,
            prefill=prefill_batch,
            prefill_sampling=tuple(seq.request.sampling for seq in prefill),
            decode=decode_batch,
            decode_sampling=tuple(seq.request.sampling for seq in decode),
            decode_steps=tuple(len(seq.tokens) for seq in decode),
        )


@dataclass(slots=True)
class StepResult:
    tokens: list[tuple[int, int, float]] = field(default_factory=list)  # (seq_id, id, logprob)
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)  # seq_id -> [n-1]
    errors: dict[int, str] = field(default_factory=dict)  # seq_id -> message
    durations: dict[str, float] = field(default_factory=dict)  # method -> seconds
    kv: KVUsage = field(default_factory=lambda: KVUsage(frozenset(), 0, 0))


class EngineStep:
    """Runs steps against one backend; lives on (and is only called from) one thread."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        # method -> (rows, device, vocab) key and the sampling tensors built for it
        self._sampling_cache: dict[str, tuple[tuple[object, ...], SamplingBatch]] = {}

    def release(self, seq_ids: list[int]) -> KVUsage:
        self._backend.release(seq_ids)
        return self._backend.kv_usage()

    def run(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        if plan.release:
            self._backend.release(plan.release)
        if plan.prefill is not None:
            self._forward(
                "prefill",
                plan.prefill,
                plan.prefill_sampling,
                (0,) * len(plan.prefill.rows),
                result,
            )
        if plan.decode is not None:
            self._forward("decode", plan.decode, plan.decode_sampling, plan.decode_steps, result)
        result.kv = self._backend.kv_usage()
        return result

    def _forward(
        self,
        method: str,
        batch: PrefillBatch | DecodeBatch,
        params: tuple[SamplingParams, ...],
        steps: tuple[int, ...],
        result: StepResult,
    ) -> None:
        seq_ids = [row.seq_id for row in batch.rows]
        started = time.perf_counter()
        try:
            if isinstance(batch, PrefillBatch):
                output = self._backend.prefill(batch)
            else:
                output = self._backend.decode(batch)
            self._check_output(output, seq_ids)
            ids, logprobs = self._sample(method, output, params, steps)
        except Exception as exc:  # a backend failure fails these rows, not the server
            logger.exception("%s failed for %d rows", method, len(seq_ids))
            self._backend.release(seq_ids)
            message = f"Request failed during generation: {exc}"
            result.errors.update({seq_id: message for seq_id in seq_ids})
            return
        result.durations[method] = time.perf_counter() - started
        result.tokens.extend(zip(seq_ids, ids, logprobs, strict=True))
        for seq_id, logits in output.prompt_logits.items():
            result.prompt_logprobs[seq_id] = _prompt_logprobs(logits, batch, seq_id)

    def _sample(
        self,
        method: str,
        output: StepOutput,
        params: tuple[SamplingParams, ...],
        steps: tuple[int, ...],
    ) -> tuple[list[int], list[float]]:
        logits = output.logits[:, -1, :]  # [R, V]: the position after each row's last token
        key = (output.seq_ids, logits.device, logits.shape[-1])
        cached = self._sampling_cache.get(method)
        if cached is None or cached[0] != key:
            cached = (key, SamplingBatch.build(params, logits.shape[-1], logits.device))
            self._sampling_cache[method] = cached
        step_tensor = torch.tensor(steps, dtype=torch.int64, device=logits.device)
        sampled = sample(logits, cached[1], step_tensor)
        # The one device-to-host copy of this forward.
        packed = torch.stack(
            [sampled.token_ids.to(torch.float64), sampled.logprobs.to(torch.float64)]
        ).tolist()
        return [int(i) for i in packed[0]], packed[1]

    @staticmethod
    def _check_output(output: StepOutput, seq_ids: list[int]) -> None:
        if list(output.seq_ids) != seq_ids:
            raise RuntimeError(
                f"backend returned logits for rows {list(output.seq_ids)}, expected {seq_ids}"
            )
        if output.logits.dim() != 3 or output.logits.shape[0] != len(seq_ids):
            raise RuntimeError(f"backend returned logits of shape {tuple(output.logits.shape)}")


def _prompt_logprobs(
    logits: torch.Tensor, batch: PrefillBatch | DecodeBatch, seq_id: int
) -> list[float]:
    """Logprob of each prompt token after the first, from the logits before it."""
    row = next(row for row in batch.rows if row.seq_id == seq_id)
    targets = torch.tensor(row.token_ids[1:], dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [n-1, V]
    return logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
