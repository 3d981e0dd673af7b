"""The engine core: one backend and the sampler, step plans in, `StepResult`s out.

NOTE: this is the hot path. A step is

    finished/forgotten -> sampler state dropped     (the backend drops KV in `step`)
    new rows           -> sampling params recorded  (kept across preemption)
    decode rows        -> `last_token` filled in where the plan left it None
    backend.step(plan) -> ONE forward, logits [R, T, V] (or token ids sampled on device)
    sample             -> position 0 of every logits row in one batched call, then the
                          draft positions of speculative rows in a second one
    StepResult         -> plain data for the router (one device-to-host copy per call)

`run(plan)` does all of it in turn. `submit(plan)` + `collect()` let steps overlap on a
device: a step's sampled ids stay on the device while their host copy runs, and when
the next plan arrives before they land (the router planned ahead), its forward starts
first, feeding its decode rows from those ids (`FedTokens`, for backends that declare
`fed_tokens`); the step before lands while it runs:

    submit(N)    forward N, sample N on the device, start N's copy     N in flight
    submit(N+1)  forward N+1 (fed from N's ids), land N, sample N+1    N+1 in flight
    collect()    N's result                                            (N+1 still flying)

A step lands before `submit` returns where its tokens are not in transit (a CPU: the
next forward would only delay its result; `keep_in_flight=True` overrides that for
tests), and where the next step cannot use it that way: speculative rows (acceptance
is decided on the host), prompt logprobs (read from this forward's logits, which the
next may overwrite), a backend that samples on its device or takes no fed tokens, and
a plan that ends or restarts one of its rows. Results come back in step order,
whatever lands when.

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
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

import torch

from tgi.backend.contract import (
    Backend,
    FedStepBackend,
    FedTokens,
    KVUsage,
    NewSequence,
    RunningSequence,
    StepOutput,
    StepPlan,
)
from tgi.engine.protocol import EngineStats
from tgi.engine.results import StepResult
from tgi.sampling import BatchSampler, PendingTokens, SampledTokens, SamplingParams

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


@dataclass(slots=True)
class _InFlight:
    """A step whose forward ran and whose sampled tokens are on their way to the host."""

    plan: StepPlan
    rows: tuple[NewSequence | RunningSequence, ...]  # its logits rows
    tracked: list[_Tracked]  # theirs, in row order
    output: StepOutput  # read only while nothing ran since (`_keeps_flying`)
    result: StepResult
    forward_s: float
    tokens: PendingTokens | SampledTokens  # Sampled: the backend's own, on the host
    index: dict[int, int]  # seq_id -> its row in `tokens`


class EngineCore:
    """Runs step plans against one backend; called from one thread only."""

    def __init__(
        self,
        backend: Backend,
        grammars: GrammarCompiler | None = None,
        *,
        keep_in_flight: bool | None = None,
    ) -> None:
        """`keep_in_flight`: None keeps a step in flight only while its tokens are in
        transit from an accelerator; True keeps it wherever the module NOTE allows (so
        tests exercise the overlap on a CPU), False never."""
        self._backend = backend
        self._keep_in_flight = keep_in_flight
        self._sampler = BatchSampler(grammars=grammars)  # compiles new rows' grammar specs
        self._tracked: dict[int, _Tracked] = {}
        # Released by a failed step: a plan made before the failure was known (planned
        # ahead) may still name them in `finished`; the backend must not hear it twice.
        self._released: set[int] = set()
        # Retried after a failed multi-row step, until they sample a token: one that
        # fails again is to blame (`_blame`).
        self._suspects: set[int] = set()
        self._feeds = backend.capabilities.fed_tokens  # its step takes `FedTokens`
        self._in_flight: _InFlight | None = None  # the step whose tokens have not landed
        self._ready: deque[StepResult] = deque()  # landed, not yet collected; step order

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
        """Free sequences outside a step (shutdown, reconciliation); a step in flight
        lands first (its result waits for `collect`)."""
        self._land()
        ids = list(seq_ids)
        self._backend.release(ids)
        self._forget(ids)
        self._suspects.difference_update(ids)
        return self._backend.kv_usage()

    def run(self, plan: StepPlan) -> StepResult:
        """One step, start to end; a backend failure fails the step's rows, never the
        engine. Not while `submit`ted steps are still to be collected."""
        if self._in_flight is not None or self._ready:
            raise RuntimeError("run() while submitted steps are not collected")
        self.submit(plan)
        return self.collect()

    def submit(self, plan: StepPlan) -> None:
        """Start a step; its result comes from `collect`, in step order. The step before,
        if still in flight, lands meanwhile (see the module NOTE)."""
        began = time.perf_counter()
        flight = self._in_flight
        landed_s = 0.0
        if flight is not None and not self._may_overlap(flight, plan):
            landed_s += self._land()
            flight = None
        result = StepResult(step_index=plan.step_index)
        if self._released and (plan.finished or plan.preempted):
            plan = self._without_released(plan)
        self._forget(plan.finished)
        self._forget(plan.forgotten)
        if self._suspects:
            self._suspects.difference_update((*plan.finished, *plan.forgotten))
        self._released.difference_update(plan.forgotten)
        plan, fed = self._prepare(plan, flight)
        if not plan.new and not plan.running:
            landed_s += self._land()
            if plan.finished or plan.preempted:
                try:
                    self._backend.step(plan)  # releases only
                except Exception:  # the ids are gone from the router; reconciliation retries
                    logger.exception("releasing %d sequences failed", len(plan.finished))
            self._done(result, time.perf_counter() - began - landed_s)
            return
        rows = plan.logits_rows
        started = time.perf_counter()
        try:
            if fed is not None:
                output = cast(FedStepBackend, self._backend).step(plan, fed)
            else:
                output = self._backend.step(plan)
            self._check(rows, output)
        except Exception as exc:  # a backend failure fails these rows, not the server
            landed_s += self._land()  # the step before's tokens are good: they go first
            if flight is not None and (flight.result.errors or flight.result.recompute):
                plan = self._without_rows(plan, set(flight.index))  # dealt with already
            self._fail(plan, exc, result)
            self._done(result, time.perf_counter() - began - landed_s)
            return
        forward_s = time.perf_counter() - started
        result.kv = self._backend.kv_usage()  # as of this step, whatever lands later
        if flight is not None:
            # while this forward runs on a device, the step before lands
            landed_s += self._land()
            if flight.result.errors or flight.result.recompute:
                # Its failure dealt with its rows. This step's others did nothing wrong,
                # but the forward they shared fed on those tokens: all are recomputed.
                plan = self._without_rows(plan, set(flight.index))
                failed = RuntimeError(f"step {flight.plan.step_index} before it failed")
                self._fail(plan, failed, result, blame=False)
                self._done(result, time.perf_counter() - began - landed_s)
                return
        try:
            tokens = self._sample_on_device(rows, output)
        except Exception as exc:
            self._fail(plan, exc, result)
            self._done(result, time.perf_counter() - began - landed_s)
            return
        result.engine_s = time.perf_counter() - began - landed_s
        index = {row.seq_id: i for i, row in enumerate(rows)}
        tracked = [self._tracked[row.seq_id] for row in rows]
        self._in_flight = _InFlight(plan, rows, tracked, output, result, forward_s, tokens, index)
        if self._keeps_flying(self._in_flight):
            result.kept_in_flight = True
        else:
            self._land()

    def _done(self, result: StepResult, engine_s: float) -> None:
        """A step that ends within its `submit` (releases only, or failed): its result,
        with the KV usage as it is now, waits for `collect`."""
        result.kv = self._backend.kv_usage()
        result.engine_s = engine_s
        self._ready.append(result)

    def collect(self) -> StepResult:
        """The oldest submitted step's result; lands the step in flight if it is that one."""
        if not self._ready:
            self._land()
        if not self._ready:
            raise RuntimeError("collect() without a submitted step")
        return self._ready.popleft()

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

    def _may_overlap(self, flight: _InFlight, plan: StepPlan) -> bool:
        """Whether `plan` may run before `flight` lands: it neither ends, restarts nor
        re-admits one of its rows, and any row of it that runs on feeds its token from
        the device (a backend that takes `FedTokens`)."""
        flying = flight.index
        if any(
            seq_id in flying for seq_id in (*plan.finished, *plan.preempted, *plan.forgotten)
        ) or any(new.seq_id in flying for new in plan.new):
            return False
        return all(
            self._feeds and row.decode and row.last_token is None
            for row in plan.running
            if row.seq_id in flying
        )

    def _keeps_flying(self, flight: _InFlight) -> bool:
        """Whether `flight` may stay in flight while the next step runs: the backend
        takes `FedTokens`, its tokens are still on their way from the device (on a CPU
        the next forward would only delay this result), and nothing of it is read from
        its logits after sampling (no drafts, no prompt logprobs)."""
        tokens = flight.tokens
        if not self._feeds or self._keep_in_flight is False:
            return False  # the next forward could not feed on them: nothing to overlap
        if not isinstance(tokens, PendingTokens):
            return False
        if self._keep_in_flight is None and not tokens.in_transit:
            return False
        return not flight.output.prompt_logits and all(row.num_logits == 1 for row in flight.rows)

    def _prepare(
        self, plan: StepPlan, flight: _InFlight | None
    ) -> tuple[StepPlan, FedTokens | None]:
        """Record new sequences; fill in decode rows' `last_token` where the plan could
        not, from the host, or from the device (`FedTokens`) for rows of `flight`."""
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
        fed_rows: dict[int, int] = {}
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
                if flight is not None and row.seq_id in flight.index:
                    fed_rows[row.seq_id] = flight.index[row.seq_id]
                else:
                    row = dataclasses.replace(row, last_token=tracked.last_token)
                    changed = True
            running.append(row)
        if changed:
            plan = dataclasses.replace(plan, running=tuple(running))
        if not fed_rows:
            return plan, None
        assert flight is not None and isinstance(flight.tokens, PendingTokens)
        return plan, FedTokens(flight.tokens.token_ids, fed_rows)

    @staticmethod
    def _without_rows(plan: StepPlan, seq_ids: set[int]) -> StepPlan:
        """`plan` without the running rows of `seq_ids` (whose step before failed)."""
        return dataclasses.replace(
            plan, running=tuple(row for row in plan.running if row.seq_id not in seq_ids)
        )

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

    def _sample_on_device(
        self, rows: tuple[NewSequence | RunningSequence, ...], output: StepOutput
    ) -> PendingTokens | SampledTokens:
        """Position 0 of every row, sampled where the logits are (the backend's own
        choices when it sampled them)."""
        if output.logits is None:
            return _device_sampled(output)
        tracked = [self._tracked[row.seq_id] for row in rows]
        prompts = [t.fed if t.num_sampled == 0 else None for t in tracked]
        return self._sampler.sample_on_device(
            "step",
            [row.seq_id for row in rows],
            [t.sampling for t in tracked],
            [t.num_sampled for t in tracked],
            output.logits[:, 0],  # [R, V]: the next token of every row
            prompts if any(p is not None for p in prompts) else None,
        )

    def _land(self) -> float:
        """End the step in flight, if any: its tokens reach the host and its result
        joins `_ready`. Returns the seconds it took."""
        flight = self._in_flight
        if flight is None:
            return 0.0
        self._in_flight = None
        began = time.perf_counter()
        result = flight.result
        try:
            self._finish(flight)
        except Exception as exc:  # its rows fail; nothing of them was told the router
            result.tokens.clear()
            result.top_tokens.clear()
            result.prompt_logprobs.clear()
            self._fail(flight.plan, exc, result)
            result.kv = self._backend.kv_usage()
        else:
            # TGI's `method` label: "prefill" for a step that computes prompt tokens
            plan = flight.plan
            prefills = plan.new or any(not row.decode for row in plan.running)
            result.durations["prefill" if prefills else "decode"] = flight.forward_s
        spent = time.perf_counter() - began
        result.engine_s += spent
        self._ready.append(result)
        return spent

    def _finish(self, flight: _InFlight) -> None:
        """The landed tokens into the step's result; the engine's memory of its rows."""
        rows, tracked, output, result = flight.rows, flight.tracked, flight.output, flight.result
        tokens = flight.tokens
        first = tokens.wait() if isinstance(tokens, PendingTokens) else tokens
        accepted = [
            [(token, logprob)]
            for token, logprob in zip(first.token_ids, first.logprobs, strict=True)
        ]
        drafted = [i for i, row in enumerate(rows) if row.num_logits > 1]
        if drafted and output.logits is not None:
            self._verify(rows, tracked, output.logits, drafted, accepted, result)
        for seq_id, logits in output.prompt_logits.items():
            new = next(r for r in flight.plan.new if r.seq_id == seq_id)
            result.prompt_logprobs[seq_id] = _prompt_logprobs(logits, new)
        for row, top in zip(rows, first.top_tokens, strict=True):
            if top:
                result.top_tokens[row.seq_id] = top
        # Last, once nothing of the step can fail any more: what the engine remembers.
        for row, state, step_tokens in zip(rows, tracked, accepted, strict=True):
            state.num_sampled += len(step_tokens)
            state.last_token = step_tokens[-1][0]
            state.fed = None
            self._suspects.discard(row.seq_id)  # it ran: no longer under suspicion
            result.tokens.extend((row.seq_id, token, logprob) for token, logprob in step_tokens)

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

    def _fail(
        self, plan: StepPlan, exc: Exception, result: StepResult, *, blame: bool = True
    ) -> None:
        """The forward failed: every row's KV is undefined and is dropped (released).

        Which rows get the error and which are recomputed is `_blame`'s rule. A
        recomputed row that generated already keeps its sampler state (held=False until
        it comes back new); one that sampled nothing starts afresh. The router then
        admits at most one suspect per step (`Router._admissible`), so a recomputed row
        runs without the others it failed beside. With `blame` False (the step failed
        because the one before it did) every row is recomputed and none is suspected."""
        ids = [row.seq_id for row in plan.rows]
        logger.exception("step %d failed for %d rows", plan.step_index, len(ids))
        retried = self._blame(ids) if blame else set(ids)
        # The step may have failed before it dropped its finished and preempted ones.
        dropped = [*ids, *plan.finished, *plan.preempted]
        try:
            self._backend.release(dropped)
        except Exception:  # nothing more to do for them; reconciliation reports strays
            logger.exception("releasing the rows of failed step %d failed", plan.step_index)
        self._released.update(ids)
        tracked = self._tracked
        self._forget(
            [i for i in ids if i not in retried or i not in tracked or not tracked[i].num_sampled]
        )
        for seq_id in retried:
            if seq_id in tracked:
                tracked[seq_id].held = False
        if blame:
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
