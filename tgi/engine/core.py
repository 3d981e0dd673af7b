"""The engine core: one backend and the sampler, one `StepPlan` in, one `StepResult` out.

NOTE: this is the hot path. A step is

    finished/forgotten -> sampler state dropped     (the backend drops KV in `step`)
    new rows           -> sampling params recorded  (kept across preemption)
    decode rows        -> `last_token` filled in where the plan left it None
    backend.step(plan) -> ONE forward, logits [R, T, V] (or token ids sampled on device)
    sample             -> position 0 of every logits row in one batched call, then the
                          draft positions of speculative rows in a second one
    StepResult         -> plain data for the router (one device-to-host copy per call)

The engine keeps, per live sequence, what sampling needs and the router need not send
again: its `SamplingParams`, how many tokens it has sampled (the step index that seeds
its noise) and the last token it sampled (what its next decode row feeds). A preempted
sequence keeps all three: it comes back under the same id and goes on as if nothing
happened.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tgi.backend.contract import (
    Backend,
    KVUsage,
    NewSequence,
    RunningSequence,
    StepOutput,
    StepPlan,
)
from tgi.engine.protocol import EngineStats
from tgi.engine.results import StepResult
from tgi.sampling import BatchSampler, SampledTokens, SamplingParams

if TYPE_CHECKING:
    from tgi.sampling.grammar import GrammarCompiler

__all__ = ["EngineCore"]

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Tracked:
    """What the engine remembers of one sequence between steps."""

    sampling: SamplingParams
    num_sampled: int = 0  # tokens sampled so far: the step index of the next sample
    last_token: int | None = None  # what the next decode row feeds
    # Tokens fed before the first sample, kept only for rows whose sampling reads a
    # history (penalties, watermark): the history starts from them.
    fed: list[int] | None = field(default=None)
    held: bool = True  # False once a failed step dropped its KV, until it comes back new


class EngineCore:
    """Runs step plans against one backend; called from one thread only."""

    def __init__(self, backend: Backend, grammars: GrammarCompiler | None = None) -> None:
        self._backend = backend
        self._sampler = BatchSampler(grammars=grammars)  # compiles new rows' grammar specs
        self._tracked: dict[int, _Tracked] = {}
        # Released by a failed step: a plan made before the failure was known (planned
        # ahead) may still name them in `finished`; the backend must not hear it twice.
        self._released: set[int] = set()
        # Retried after a failed multi-row step, until they sample a token: one that
        # fails again is to blame (`_blame`).
        self._suspects: set[int] = set()

    @property
    def num_tracked(self) -> int:
        """Sequences whose sampling state the engine holds (for leak checks)."""
        return len(self._tracked)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_tracked=len(self._tracked),
            num_histories=self._sampler.num_histories,
            num_matchers=self._sampler.num_matchers,
        )

    def release(self, seq_ids: Iterable[int]) -> KVUsage:
        """Free sequences outside a step (shutdown, reconciliation)."""
        ids = list(seq_ids)
        self._backend.release(ids)
        self._forget(ids)
        self._suspects.difference_update(ids)
        return self._backend.kv_usage()

    def run(self, plan: StepPlan) -> StepResult:
        """One step; a backend failure fails the step's rows, never the engine."""
        began = time.perf_counter()
        result = StepResult(step_index=plan.step_index)
        if self._released and (plan.finished or plan.preempted):
            plan = self._without_released(plan)
        self._forget(plan.finished)
        self._forget(plan.forgotten)
        if self._suspects:
            self._suspects.difference_update((*plan.finished, *plan.forgotten))
        self._released.difference_update(plan.forgotten)
        plan = self._prepare(plan)
        if plan.new or plan.running:
            rows = plan.logits_rows
            started = time.perf_counter()
            try:
                output = self._backend.step(plan)
                self._check(rows, output)
                forward_s = time.perf_counter() - started
                self._sample(plan, rows, output, result)
            except Exception as exc:  # a backend failure fails these rows, not the server
                self._fail(plan, exc, result)
            else:
                # TGI's `method` label: "prefill" for a step that computes prompt tokens
                prefills = plan.new or any(not row.decode for row in plan.running)
                result.durations["prefill" if prefills else "decode"] = forward_s
        elif plan.finished or plan.preempted:
            try:
                self._backend.step(plan)  # releases only
            except Exception:  # the ids are gone from the router; reconciliation retries
                logger.exception("releasing %d sequences failed", len(plan.finished))
        result.kv = self._backend.kv_usage()
        result.engine_s = time.perf_counter() - began
        return result

    def _without_released(self, plan: StepPlan) -> StepPlan:
        """`plan` less the releases of sequences a failed step released already."""
        stale = self._released & {*plan.finished, *plan.preempted}
        if not stale:
            return plan
        self._released -= stale
        return dataclasses.replace(
            plan,
            finished=tuple(i for i in plan.finished if i not in stale),
            preempted=tuple(i for i in plan.preempted if i not in stale),
        )

    # ---- internals ------------------------------------------------------------------

    def _forget(self, seq_ids: Iterable[int]) -> None:
        ids = list(seq_ids)
        if ids:
            self._sampler.release(ids)
            for seq_id in ids:
                self._tracked.pop(seq_id, None)

    def _prepare(self, plan: StepPlan) -> StepPlan:
        """Record new sequences; fill in decode rows' `last_token` where the plan could not."""
        for new in plan.new:
            self._released.discard(new.seq_id)
            known = self._tracked.get(new.seq_id)
            if known is not None and known.num_sampled:
                known.held = True  # resumed after a preemption: its sampler state stays
                continue
            started = self._tracked[new.seq_id] = _Tracked(new.sampling)
            if new.sampling.needs_history:
                started.fed = list(new.token_ids)
        running: list[RunningSequence] = []
        changed = False
        for row in plan.running:
            tracked = self._tracked.get(row.seq_id)
            if tracked is None or not tracked.held:
                # A step that ended after this plan was made (overlapped planning) failed
                # it: the router fails or recomputes it; nothing of it is left here.
                changed = True
                continue
            if not row.decode:
                if tracked.fed is not None and tracked.num_sampled == 0:
                    tracked.fed.extend(row.token_ids)
            elif row.last_token is None:
                row = dataclasses.replace(row, last_token=tracked.last_token)
                changed = True
            running.append(row)
        if not changed:
            return plan
        return dataclasses.replace(plan, running=tuple(running))

    @staticmethod
    def _check(rows: tuple[NewSequence | RunningSequence, ...], output: StepOutput) -> None:
        wanted = tuple(row.seq_id for row in rows)
        if tuple(output.seq_ids) != wanted:
            raise RuntimeError(f"backend returned rows {list(output.seq_ids)}, expected {wanted}")
        if output.logits is None:
            if output.token_ids is None:
                raise RuntimeError("backend returned neither logits nor token ids")
            return
        if output.logits.dim() != 3 or output.logits.shape[0] != len(wanted):
            raise RuntimeError(f"backend returned logits of shape {tuple(output.logits.shape)}")

    def _sample(
        self,
        plan: StepPlan,
        rows: tuple[NewSequence | RunningSequence, ...],
        output: StepOutput,
        result: StepResult,
    ) -> None:
        tracked = [self._tracked[row.seq_id] for row in rows]
        seq_ids = [row.seq_id for row in rows]
        if output.logits is None:
            first = _device_sampled(output)
        else:
            prompts = [t.fed if t.num_sampled == 0 else None for t in tracked]
            first = self._sampler.sample(
                "step",
                seq_ids,
                [t.sampling for t in tracked],
                [t.num_sampled for t in tracked],
                output.logits[:, 0],  # [R, V]: the next token of every row
                prompts if any(p is not None for p in prompts) else None,
            )
        accepted = [
            [(token, logprob)]
            for token, logprob in zip(first.token_ids, first.logprobs, strict=True)
        ]
        drafted = [i for i, row in enumerate(rows) if row.num_logits > 1]
        if drafted and output.logits is not None:
            self._verify(rows, tracked, output.logits, drafted, accepted, result)
        for seq_id, logits in output.prompt_logits.items():
            new = next(r for r in plan.new if r.seq_id == seq_id)
            result.prompt_logprobs[seq_id] = _prompt_logprobs(logits, new)
        for seq_id, top in zip(seq_ids, first.top_tokens, strict=True):
            if top:
                result.top_tokens[seq_id] = top
        # Last, once nothing of the step can fail any more: what the engine remembers.
        for row, state, tokens in zip(rows, tracked, accepted, strict=True):
            state.num_sampled += len(tokens)
            state.last_token = tokens[-1][0]
            state.fed = None
            self._suspects.discard(row.seq_id)  # it ran: no longer under suspicion
            result.tokens.extend((row.seq_id, token, logprob) for token, logprob in tokens)

    def _verify(
        self,
        rows: tuple[NewSequence | RunningSequence, ...],
        tracked: list[_Tracked],
        logits: torch.Tensor,
        drafted: list[int],
        accepted: list[list[tuple[int, float]]],
        result: StepResult,
    ) -> None:
        """Extend each drafted row's tokens while its drafts equal what was sampled.

        Position t of a row is sampled with step index `num_sampled + t`, exactly as it
        would be one token at a time; only rows whose sampling reads nothing but logits
        and step get drafts (`tgi.sampling.speculation.speculable`), so the output is
        that of plain decoding.
        """
        places = [(i, t) for i in drafted for t in range(1, rows[i].num_logits)]
        width = logits.shape[1]
        flat = torch.tensor([i * width + t for i, t in places], device=logits.device)
        sampled = self._sampler.sample(
            "draft",
            [rows[i].seq_id for i, _ in places],
            [tracked[i].sampling for i, _ in places],
            [tracked[i].num_sampled + t for i, t in places],
            logits.flatten(0, 1).index_select(0, flat),  # one gather: [sum(drafts), V]
        )
        cursor = 0
        for i in drafted:
            drafts = rows[i].token_ids
            result.drafts_proposed += len(drafts)
            for t, draft in enumerate(drafts):
                if draft != accepted[i][-1][0]:
                    break
                accepted[i].append((sampled.token_ids[cursor + t], sampled.logprobs[cursor + t]))
                result.drafts_accepted += 1
            cursor += len(drafts)

    def _fail(self, plan: StepPlan, exc: Exception, result: StepResult) -> None:
        """The forward failed: every row's KV is undefined and is dropped (released).

        Which rows get the error and which are recomputed is `_blame`'s rule. A
        recomputed row that generated already keeps its sampler state (held=False until
        it comes back new); one that sampled nothing starts afresh. The router then
        admits at most one suspect per step (`Router._admissible`), so a recomputed row
        runs without the others it failed beside."""
        ids = [row.seq_id for row in plan.rows]
        logger.exception("step %d failed for %d rows", plan.step_index, len(ids))
        retried = self._blame(ids)
        # The step may have failed before it dropped its finished and preempted ones.
        dropped = [*ids, *plan.finished, *plan.preempted]
        try:
            self._backend.release(dropped)
        except Exception:  # nothing more to do for them; reconciliation reports strays
            logger.exception("releasing the rows of failed step %d failed", plan.step_index)
        self._released.update(ids)
        self._forget([i for i in ids if i not in retried or not self._tracked[i].num_sampled])
        for seq_id in retried:
            if seq_id in self._tracked:
                self._tracked[seq_id].held = False
        self._suspects.difference_update(i for i in ids if i not in retried)
        self._suspects.update(retried)
        message = f"Request failed during generation: {exc}"
        result.errors.update({seq_id: message for seq_id in ids if seq_id not in retried})
        result.recompute.extend(i for i in ids if i in retried)

    def _blame(self, ids: list[int]) -> set[int]:
        """The rows of a failed step that are retried (recomputed) once; the others fail.

        NOTE: one row's parameters or tokens must not fail its neighbours, and a failed
        step does not say which row raised. So a row fails only when it was alone in
        the step, or was a suspect already (it failed beside others before and was
        retried since, without them: it failed again, so it is to blame). Every other
        row of a failed multi-row step is retried and becomes a suspect, until it
        samples a token. Each failure fails a row or makes the non-suspect rows
        suspects, and suspects run one per step, so a persistent failure cannot loop:
        at worst every row ends, one suspect per failed step.
        """
        if len(ids) == 1:
            return set()
        return {seq_id for seq_id in ids if seq_id not in self._suspects}


def _device_sampled(output: StepOutput) -> SampledTokens:
    """Token ids a backend sampled on its device, with one host copy."""
    assert output.token_ids is not None
    columns = [output.token_ids.to(torch.float64).reshape(-1, 1)]
    if output.logprobs is not None:
        columns.append(output.logprobs.to(torch.float64).reshape(-1, 1))
    rows = torch.cat(columns, dim=1).tolist()  # the one device-to-host copy
    logprobs = [row[1] if len(row) > 1 else float("nan") for row in rows]
    return SampledTokens([int(row[0]) for row in rows], logprobs, [[] for _ in rows])


def _prompt_logprobs(logits: torch.Tensor, row: NewSequence) -> list[float]:
    """Logprob of each prompt token after the first, from the logits before it."""
    targets = torch.tensor(row.token_ids[1:], dtype=torch.int64, device=logits.device)
    logprobs = torch.log_softmax(logits[:-1].float(), dim=-1)  # [n-1, V]
    return logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
