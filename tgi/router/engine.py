"""What runs on the engine thread: backend calls and sampling for one scheduler step.

NOTE: this is the hot path. Per-row sampling tensors are rebuilt only when the set of
rows changes; each forward ends with exactly one device-to-host copy (the sampled ids
and their logprobs, through `.tolist()`), which the router needs to detokenize. A decode
with speculative drafts makes a second one, for the draft positions' samples (`_verify`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
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
from tgi.sampling import BatchSampler, SampledTokens, SamplingParams

if TYPE_CHECKING:
    from tgi.router.policies.paged import PrefillWork
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
    # paged layouts only:
    preempt: tuple[int, ...] = ()  # release KV in the backend, keep sampler state
    forget: tuple[int, ...] = ()  # drop sampler state only (KV released earlier)
    prefill_prompts: tuple[tuple[int, ...], ...] | None = None  # per logits row: the prompt
    decode_drafts: tuple[int, ...] = ()  # real drafts per decode row (the rest is padding)

    @classmethod
    def paged(
        cls,
        *,
        release: tuple[int, ...],
        preempt: tuple[int, ...],
        forget: tuple[int, ...],
        prefill: Seq[PrefillWork],
        decode: Seq[tuple[Sequence, tuple[int, ...], tuple[int, ...]]],
    ) -> StepPlan:
        """Rows of a paged step: prefill chunks and decode rows with their block tables.
        Decode rows carry `(pending token, drafts...)`, padded with the pending token to
        the longest row's length (one forward of one shape; padded logits are unused)."""
        rows = tuple(
            PrefillRow(
                seq_id=work.sequence.seq_id,
                token_ids=work.token_ids,
                start_position=work.start,
                block_ids=work.block_ids,
                want_logits=work.want_logits,
                want_prompt_logits=work.want_logits
                and work.start == 0
                and work.sequence.request.decoder_input_details,
            )
            for work in prefill
        )
        logits_rows = [work.sequence for work in prefill if work.want_logits]
        width = max((len(drafts) for _, drafts, _ in decode), default=0)
        decode_rows = tuple(
            DecodeRow(
                seq_id=seq.seq_id,
                token_ids=(seq.tokens[-1].id, *drafts)
                + (seq.tokens[-1].id,) * (width - len(drafts)),
                position=seq.next_position,
                block_ids=blocks,
            )
            for seq, drafts, blocks in decode
        )
        return cls(
            release=release,
            prefill=PrefillBatch(rows) if rows else None,
            prefill_sampling=tuple(seq.request.sampling for seq in logits_rows),
            decode=DecodeBatch(decode_rows) if decode_rows else None,
            decode_sampling=tuple(seq.request.sampling for seq, _, _ in decode),
            decode_steps=tuple(len(seq.tokens) for seq, _, _ in decode),
            preempt=preempt,
            forget=forget,
            prefill_prompts=tuple(seq.request.input_ids for seq in logits_rows),
            decode_drafts=tuple(len(drafts) for _, drafts, _ in decode),
        )

    @classmethod
    def build(
        cls,
        *,
        release: tuple[int, ...],
        prefill: Seq[Sequence],
        decode: Seq[Sequence],
        rebuild: Seq[Sequence] = (),
        slots: Mapping[int, int] | None = None,
    ) -> StepPlan:
        """Rows for one step. `slots` (seq_id -> slot) addresses static layouts; each of
        `rebuild` (running sequences of a backend whose prefill rewrites every slot) is
        re-sent from position 0 without its pending token, asking for no logits."""
        slot_of = slots or {}
        rows = [
            PrefillRow(
                seq_id=seq.seq_id,
                # prompt + generated[:-1]: the last token is fed by this step's decode
                token_ids=seq.request.input_ids + tuple(token.id for token in seq.tokens[:-1]),
                slot=slot_of.get(seq.seq_id),
                want_logits=False,
            )
            for seq in rebuild
        ]
        rows += [
            PrefillRow(
                seq_id=seq.seq_id,
                token_ids=seq.request.input_ids,
                slot=slot_of.get(seq.seq_id),
                want_prompt_logits=seq.request.decoder_input_details,
            )
            for seq in prefill
        ]
        prefill_batch = PrefillBatch(tuple(rows)) if rows else None
        decode_batch = None
        if decode:
            decode_batch = DecodeBatch(
                tuple(
                    DecodeRow(
                        seq_id=seq.seq_id,
                        token_ids=(seq.tokens[-1].id,),
                        position=seq.next_position,
                        slot=slot_of.get(seq.seq_id),
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
    # seq_id -> the step's top-n (token id, logprob), best first; only rows that asked
    top_tokens: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    kv: KVUsage = field(default_factory=lambda: KVUsage(frozenset(), 0, 0))
    drafts_proposed: int = 0  # speculation: draft tokens verified this step
    drafts_accepted: int = 0  # ... and accepted


class EngineStep:
    """Runs steps against one backend; lives on (and is only called from) one thread."""

    def __init__(self, backend: Backend) -> None:
        self._backend = backend
        # per-row sampling tensors (rebuilt when rows change) and token histories
        self._sampler = BatchSampler()

    def release(self, seq_ids: list[int]) -> KVUsage:
        self._backend.release(seq_ids)
        self._sampler.release(seq_ids)
        return self._backend.kv_usage()

    def run(self, plan: StepPlan) -> StepResult:
        result = StepResult()
        if plan.release:
            self._backend.release(plan.release)
            self._sampler.release(plan.release)
        if plan.preempt:  # recomputed later under the same id: keep the token histories
            self._backend.release(plan.preempt)
        if plan.forget:
            self._sampler.release(plan.forget)
        if plan.prefill is not None:
            self._forward(
                "prefill",
                plan.prefill,
                plan.prefill_sampling,
                (0,) * len(plan.prefill_sampling),  # one per row that asked for logits
                result,
                prompts=plan.prefill_prompts,
            )
        if plan.decode is not None:
            decode, params, steps = _without_failed(plan.decode, plan, result.errors)
            if decode.rows:
                drafts = _kept(plan.decode_drafts, plan.decode, decode)
                self._forward("decode", decode, params, steps, result, drafts)
        result.kv = self._backend.kv_usage()
        return result

    def _forward(
        self,
        method: str,
        batch: PrefillBatch | DecodeBatch,
        params: tuple[SamplingParams, ...],
        steps: tuple[int, ...],
        result: StepResult,
        drafts: tuple[int, ...] = (),
        prompts: Seq[Seq[int]] | None = None,
    ) -> None:
        # Rebuild rows (want_logits=False) are written but get no logits and no token.
        seq_ids = [
            row.seq_id for row in batch.rows if not isinstance(row, PrefillRow) or row.want_logits
        ]
        all_ids = [row.seq_id for row in batch.rows]
        started = time.perf_counter()
        try:
            if isinstance(batch, PrefillBatch):
                output = self._backend.prefill(batch)
            else:
                output = self._backend.decode(batch)
            self._check_output(output, seq_ids)
            sampled = self._sample(method, batch, output, params, steps, prompts)
            accepted = (
                self._verify(batch, output, params, steps, sampled, drafts, result)
                if any(drafts)
                else None
            )
        except Exception as exc:  # a backend failure fails these rows, not the server
            logger.exception("%s failed for %d rows", method, len(all_ids))
            self._backend.release(all_ids)
            self._sampler.release(all_ids)
            message = f"Request failed during generation: {exc}"
            result.errors.update({seq_id: message for seq_id in all_ids})
            return
        result.durations[method] = time.perf_counter() - started
        if accepted is None:
            result.tokens.extend(zip(seq_ids, sampled.token_ids, sampled.logprobs, strict=True))
        else:
            for seq_id, tokens in zip(seq_ids, accepted, strict=True):
                result.tokens.extend((seq_id, token, logprob) for token, logprob in tokens)
        for seq_id, top in zip(seq_ids, sampled.top_tokens, strict=True):
            if top:
                result.top_tokens[seq_id] = top
        for seq_id, logits in output.prompt_logits.items():
            result.prompt_logprobs[seq_id] = _prompt_logprobs(logits, batch, seq_id)

    def _sample(
        self,
        method: str,
        batch: PrefillBatch | DecodeBatch,
        output: StepOutput,
        params: tuple[SamplingParams, ...],
        steps: tuple[int, ...],
        prompts: Seq[Seq[int]] | None = None,
    ) -> SampledTokens:
        # [R, V]: prefill: each row's last position; decode: the pending token's
        logits = output.logits[:, -1, :] if isinstance(batch, PrefillBatch) else output.logits[:, 0]
        if isinstance(batch, PrefillBatch) and prompts is None:
            # new rows start the histories penalties read
            prompts = [row.token_ids for row in batch.rows if row.want_logits]
        elif not isinstance(batch, PrefillBatch):
            prompts = None
        # Ends with the one device-to-host copy of this forward (ids, logprobs, top-n).
        return self._sampler.sample(method, output.seq_ids, params, steps, logits, prompts)

    def _verify(
        self,
        batch: PrefillBatch | DecodeBatch,
        output: StepOutput,
        params: tuple[SamplingParams, ...],
        steps: tuple[int, ...],
        first: SampledTokens,
        drafts: tuple[int, ...],
        result: StepResult,
    ) -> list[list[tuple[int, float]]]:
        """Each row's accepted tokens: the token sampled after the pending one, then each
        draft position's sample while the draft before it equals what was sampled there.

        Position t of a row is sampled with step index `steps + t`, exactly as it would
        be one token at a time; only rows whose sampling reads nothing else get drafts
        (`tgi.sampling.speculation.speculable`), so the output is that of plain decoding.
        """
        rows = [i for i, k in enumerate(drafts) if k]
        # every draft position of every row, flattened: (row, position t >= 1)
        places = [(i, t) for i in rows for t in range(1, drafts[i] + 1)]
        row_index = torch.tensor([i for i, _ in places], device=output.logits.device)
        position_index = torch.tensor([t for _, t in places], device=output.logits.device)
        sampled = self._sampler.sample(
            "draft",
            [batch.rows[i].seq_id for i, _ in places],
            [params[i] for i, _ in places],
            [steps[i] + t for i, t in places],
            output.logits[row_index, position_index],  # one gather: [sum(drafts), V]
        )
        accepted = [
            [(token, lp)] for token, lp in zip(first.token_ids, first.logprobs, strict=True)
        ]
        cursor = 0
        for i in rows:
            row_tokens = batch.rows[i].token_ids
            ids = sampled.token_ids[cursor : cursor + drafts[i]]
            lps = sampled.logprobs[cursor : cursor + drafts[i]]
            cursor += drafts[i]
            result.drafts_proposed += drafts[i]
            for t in range(1, drafts[i] + 1):
                if row_tokens[t] != accepted[i][-1][0]:
                    break
                accepted[i].append((ids[t - 1], lps[t - 1]))
                result.drafts_accepted += 1
        return accepted

    @staticmethod
    def _check_output(output: StepOutput, seq_ids: list[int]) -> None:
        if list(output.seq_ids) != seq_ids:
            raise RuntimeError(
                f"backend returned logits for rows {list(output.seq_ids)}, expected {seq_ids}"
            )
        if output.logits.dim() != 3 or output.logits.shape[0] != len(seq_ids):
            raise RuntimeError(f"backend returned logits of shape {tuple(output.logits.shape)}")


def _without_failed(
    decode: DecodeBatch, plan: StepPlan, errors: Mapping[int, str]
) -> tuple[DecodeBatch, tuple[SamplingParams, ...], tuple[int, ...]]:
    """The decode rows less those whose prefill (a rebuild) failed this step."""
    if not errors:
        return decode, plan.decode_sampling, plan.decode_steps
    keep = [i for i, row in enumerate(decode.rows) if row.seq_id not in errors]
    return (
        DecodeBatch(tuple(decode.rows[i] for i in keep)),
        tuple(plan.decode_sampling[i] for i in keep),
        tuple(plan.decode_steps[i] for i in keep),
    )


def _kept(drafts: tuple[int, ...], planned: DecodeBatch, kept: DecodeBatch) -> tuple[int, ...]:
    """The draft counts of the decode rows that are still in the batch."""
    if not drafts or len(planned.rows) == len(kept.rows):
        return drafts
    keep = {row.seq_id for row in kept.rows}
    return tuple(k for k, row in zip(drafts, planned.rows, strict=True) if row.seq_id in keep)


def _prompt_logprobs(
    logits: torch.Tensor, batch: PrefillBatch | DecodeBatch, seq_id: int
) -> list[float]:
    """Logprob of each prompt token after the first, from the logits before it."""
    row = next(row for row in batch.rows if row.seq_id == seq_id)
    targets = torch.tensor(row.token_ids[1:], dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [n-1, V]
    return logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
