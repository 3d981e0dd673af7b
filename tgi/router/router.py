"""The router: one loop that plans each step, hands it to the engine, and streams results.

NOTE: all router state (waiting queue, running rows, cancellations) lives on the event
loop thread. The engine (backend + sampler, `tgi.engine.protocol.Engine`) is called
from its own thread, one call at a time, so the backend never sees two calls at once
(the contract's promise) and HTTP handlers stay responsive while a forward runs. The
engine runs on that thread (`LocalEngine`) or in a worker process the thread talks to
(`WorkerEngine`). A step is:

    loop thread                               engine (thread or worker process)
    -----------                               ---------------------------------
    drop cancelled rows, hand their ids ─┐
    policy.schedule(running, waiting)    ├─ StepPlan ─►  drop finished/preempted,
      (rows, admitted, preempted)        ┘               ONE forward, sample,
    apply tokens, stop, stream  ◄──────── StepResult ──  one host copy, kv_usage()

Every sequence that reached the backend is released exactly once: named in a plan's
`finished` (it ended, failed, or its client went away) or `preempted` (it comes back
later as a new sequence under the same id). A sequence that ends is handed to the next
plan; when nothing else runs, that plan holds only releases and goes at once. After
each step the backend's live set (`KVUsage`) is reconciled with the router's
(`_reconcile`), so a backend's stray or lost sequence cannot leak KV, slots or blocks.

What each step runs is the `SchedulingPolicy`'s decision alone (continuous, static
slots, paged: `tgi/router/policies/`); the router never asks which kind it has.

A worker that dies or hangs (`EngineDied`) took every sequence's KV with it: the
requests it was serving fail with a 503, the policy forgets its tables and prefix
cache, the worker restarts, and the queue is served again (`_recover`). More than
`max_restarts` restarts within `RESTART_WINDOW_S` and the router gives up (`fatal`).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from tgi.backend.contract import KVUsage, StepPlan
from tgi.engine.protocol import Engine, EngineDied, EngineStats, RestartImpossible
from tgi.engine.results import StepResult
from tgi.engine.thread import EngineThread
from tgi.errors import BackendUnavailable, Overloaded
from tgi.metrics import Metrics
from tgi.router.policies.base import Schedule, SchedulingPolicy
from tgi.router.request import (
    ErrorEvent,
    Event,
    FinalEvent,
    GeneratedToken,
    GenerationRequest,
    PrefillToken,
    TokenEvent,
)
from tgi.router.sequence import SequenceState, TokenizerLike, top_tokens_of

__all__ = ["RESTART_WINDOW_S", "RequestHandle", "Router", "RouterLimits", "RouterStats"]

logger = logging.getLogger(__name__)

RESTART_WINDOW_S = 600.0  # restarts older than this no longer count toward max_restarts
WATCH_S = 1.0  # how often an idle router checks that its engine still runs
RESTART_PAUSE_S = 1.0  # between failed restart attempts
_DRAIN_POLL_S = 0.05  # how often a draining router looks whether it is empty


class RequestHandle:
    """The client side of one request: iterate its events, or cancel it."""

    def __init__(self, sequence: SequenceState, router: Router) -> None:
        self._sequence = sequence
        self._router = router

    @property
    def seq_id(self) -> int:
        return self._sequence.seq_id

    async def events(self) -> AsyncIterator[Event]:
        """Yield events until the final one (or an error); cancels the request if the
        consumer stops early (a client that went away)."""
        finished = False
        try:
            while True:
                event = await self._sequence.events.get()
                yield event
                if not isinstance(event, TokenEvent):
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()

    def cancel(self) -> None:
        self._router.cancel(self._sequence)


@dataclass(frozen=True, slots=True, kw_only=True)
class RouterLimits:
    """The router's own share of the configuration (the policy has the budgets)."""

    max_concurrent_requests: int
    max_restarts: int = 3  # engine restarts within RESTART_WINDOW_S before giving up


@dataclass(slots=True)
class _Submitted:
    """A plan handed to the engine: its `submit` call's future, when the engine thread
    began it, and its `collect` call's future once that is queued too."""

    future: asyncio.Future[None] | None = None
    started: float = 0.0  # perf_counter: the step's round trip runs from here to its result
    collected: asyncio.Future[StepResult] | None = None


@dataclass(frozen=True, slots=True)
class RouterStats:
    """A snapshot for /info and tests."""

    queue_size: int
    batch_size: int
    reserved_tokens: int  # KV tokens the running batch holds or is promised
    kv: KVUsage


class Router:
    """Owns the queue and the running batch; drives the engine one step at a time."""

    def __init__(
        self,
        engine: Engine,
        tokenizer: TokenizerLike,
        *,
        limits: RouterLimits,
        policy: SchedulingPolicy,
        eos_token_ids: frozenset[int],
        metrics: Metrics,
        initial_kv: KVUsage,
        clock: Callable[[], float] = time.monotonic,
        engine_thread: EngineThread | None = None,  # the thread start-up used for the engine
        overlap: bool = False,  # plan step N+1 while step N runs (see `_run`)
    ) -> None:
        self._engine = engine
        self._tokenizer = tokenizer
        self._limits = limits
        self._policy = policy
        self._eos_token_ids = eos_token_ids
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self._metrics = metrics
        self._clock = clock
        self._seq_ids = itertools.count(1)
        self._step_index = itertools.count(1)
        self._waiting: deque[SequenceState] = deque()
        self._running: dict[int, SequenceState] = {}
        self._to_release: list[int] = []  # ended: named in the next plan's `finished`
        self._to_forget: list[int] = []  # preempted, then ended: sampler state only
        self._releasing: set[int] = set()  # named in plans still in flight
        # Retried after a failed multi-row step, until they get a token: at most one of
        # them may run at a time (`_admissible`; the engine blames one that fails again).
        self._suspects: set[int] = set()
        self._overlap = overlap
        self.overlapped_steps = 0  # steps planned while the previous one ran
        # the engine kept its last step in flight past `submit` (an accelerator): a plan
        # made ahead is then submitted before the step before is collected
        self._engine_keeps_steps = False
        self._wake = asyncio.Event()
        self._thread = engine_thread or EngineThread()
        self._kv = initial_kv
        self._task: asyncio.Task[None] | None = None
        self._healthy = True
        self._closing = False
        self._restarting = False
        self._draining = False  # shutting down: no new requests, the running ones finish
        self._restarted_at: deque[float] = deque()  # clock() of each restart in the window
        self.restarts = 0  # engine restarts so far
        self.fatal: str | None = None  # why the router gave up on the engine, if it did
        self.on_fatal: Callable[[str], None] | None = None  # e.g. stop the HTTP server
        # each step the engine ran, with its round trip in seconds (e.g. a trace span)
        self.on_step: Callable[[StepPlan, float], None] | None = None
        metrics.kv_capacity_tokens.set(initial_kv.capacity_tokens)
        metrics.engine_healthy.set(1)
        metrics.set_engine_details(engine.description.details)

    @property
    def policy(self) -> SchedulingPolicy:
        return self._policy

    @property
    def engine(self) -> Engine:
        return self._engine

    async def engine_stats(self) -> EngineStats:
        """What the engine holds per sequence (asked on the engine thread)."""
        stats: EngineStats = await self._in_engine(self._engine.stats)
        self._metrics.engine_tracked_sequences.set(stats.num_tracked)
        return stats

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._guarded(), name="tgi-router")

    async def _guarded(self) -> None:
        """`_run`, and if it ever raises, no request is left waiting for it."""
        try:
            await self._run()
        except Exception as exc:
            logger.exception("the router loop failed")
            self._give_up(f"the router loop failed: {exc}")

    async def drain(self, timeout_s: float) -> int:
        """Shut down gently: refuse new requests (503, and /health fails), let the
        running and queued ones finish for up to `timeout_s`, then end what is left
        with an error event (a stream ends with it, not cut). Returns how many were
        ended so."""
        self._draining = True
        self._healthy = False
        self._metrics.engine_healthy.set(0)
        deadline = self._clock() + timeout_s
        logger.info(
            "draining %d running and %d queued requests (up to %.0f s)",
            len(self._running),
            len(self._waiting),
            timeout_s,
        )
        while (self._running or self._waiting) and self._clock() < deadline:
            await asyncio.sleep(_DRAIN_POLL_S)
        left = [seq for seq in [*self._waiting, *self._running.values()] if not seq.done]
        for sequence in left:
            self.cancel(sequence)  # its KV is released at the next step
            sequence.done = True
            sequence.events.put_nowait(
                ErrorEvent(
                    f"the server shut down before the request finished ({timeout_s:.0f} s "
                    "drain timeout)",
                    error_type="unhealthy",
                )
            )
        if left:
            logger.warning("shutdown: %d requests did not finish in time", len(left))
        return len(left)

    async def stop(self) -> None:
        """Fail what is left, release its KV, and stop the loop."""
        try:
            if self._task is not None:
                # Let the step in flight finish: cancelling it could drop planned releases.
                self._closing = True
                self._wake.set()
                await self._task
                self._task = None
            leftovers = list(self._waiting) + list(self._running.values())
            for sequence in leftovers:
                if not sequence.done:
                    sequence.events.put_nowait(ErrorEvent("server is shutting down"))
            self._waiting.clear()
            ids = [*self._running, *self._take_release(), *self._to_forget]
            self._running.clear()
            self._policy.free(ids)
            try:
                self._kv = await self._in_engine(self._engine.release, ids)
            except Exception:  # a dead engine holds nothing; a failing one is closed next
                logger.exception("releasing %d sequences at shutdown failed", len(ids))
        finally:
            try:
                await self._in_engine(self._engine.close)
            finally:
                self._thread.shutdown()

    # ---- requests ---------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a validated request; raises `Overloaded` at max_concurrent_requests and
        `BackendUnavailable` once the router gave up on its engine or is draining."""
        if self.fatal is not None:
            raise BackendUnavailable(self.fatal)
        if self._draining or self._closing:
            raise BackendUnavailable("the server is shutting down")
        if len(self._waiting) + len(self._running) >= self._limits.max_concurrent_requests:
            self._metrics.request_failure.labels(err="overloaded").inc()
            raise Overloaded("Model is overloaded")
        sequence = SequenceState.create(
            seq_id=next(self._seq_ids),
            request=request,
            tokenizer=self._tokenizer,
            eos_token_ids=self._eos_token_ids,
            arrival_s=self._clock(),
        )
        self._waiting.append(sequence)
        self._metrics.request_input_length.observe(len(request.input_ids))
        self._metrics.queue_size.set(len(self._waiting))
        self._wake.set()
        logger.debug(
            "request %d queued: %d input tokens, max_new_tokens %d",
            sequence.seq_id,
            len(request.input_ids),
            request.stopping.max_new_tokens,
        )
        return RequestHandle(sequence, self)

    def cancel(self, sequence: SequenceState) -> None:
        """Stop a request whose client went away; its KV is freed at the next step."""
        if sequence.done or sequence.cancelled:
            return
        sequence.cancelled = True
        if sequence in self._waiting:
            self._waiting.remove(sequence)
            self._metrics.queue_size.set(len(self._waiting))
            if sequence.admitted_step:  # preempted: its KV is gone, the engine's state not
                self._to_forget.append(sequence.seq_id)
        logger.debug("request %d cancelled", sequence.seq_id)
        self._wake.set()

    def stats(self) -> RouterStats:
        reserved = self._policy.reserved_tokens(list(self._running.values()))
        return RouterStats(len(self._waiting), len(self._running), reserved, self._kv)

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def check_health(self) -> None:
        """A real one-token forward on the engine thread; raises BackendUnavailable."""
        if self._draining:
            raise BackendUnavailable("the server is shutting down")
        if self._restarting or self.fatal is not None:
            raise BackendUnavailable(self.fatal or "the engine worker is restarting")
        try:
            await self._in_engine(self._engine.health)
        except Exception as exc:
            self._healthy = False
            raise BackendUnavailable(f"backend health check failed: {exc}") from exc
        self._healthy = not self._draining  # a drain may have begun while it ran

    # ---- the loop ---------------------------------------------------------------

    def _has_work(self) -> bool:
        return bool(self._waiting or self._running or self._to_release or self._to_forget)

    async def _run(self) -> None:
        in_flight: deque[tuple[StepPlan, _Submitted]] = deque()
        while in_flight or not self._closing:
            if not in_flight:
                if not self._has_work():
                    if self._closing:
                        break
                    await self._idle()
                    continue
                in_flight.append(self._launch(self._plan()))
            if self._overlap and len(in_flight) == 1 and self._may_plan_ahead():
                plan = self._plan()  # step N+1, while step N runs
                if plan.rows or plan.finished or plan.preempted or plan.forgotten:
                    if not self._engine_keeps_steps:
                        # N's result first: N+1's forward would only delay it
                        self._collect(in_flight[0][1])
                    in_flight.append(self._launch(plan))
                    self.overlapped_steps += 1
            plan, future = in_flight.popleft()
            try:
                result = await self._result(plan, future)
            except EngineDied as exc:
                for _, later in in_flight:  # they fail the same way, at once
                    if later.future is not None:
                        await asyncio.gather(later.future, return_exceptions=True)
                in_flight.clear()
                await self._recover(exc)
                continue
            self._finish(plan, result)

    async def _idle(self) -> None:
        """Wait for work, checking every WATCH_S that the engine still runs: a worker
        that dies while nothing is asked of it is restarted before the next request."""
        self._wake.clear()
        try:
            await asyncio.wait_for(self._wake.wait(), timeout=WATCH_S)
        except asyncio.TimeoutError:  # not the builtin TimeoutError before Python 3.11
            gone = self._engine.exited()
            if gone is not None:
                await self._recover(EngineDied(gone))

    def _may_plan_ahead(self) -> bool:
        """Whether there is work and the policy says the next step needs no result of
        the one in flight."""
        if self._closing or not self._has_work():
            return False
        return self._policy.may_plan_ahead(
            [seq for seq in self._running.values() if seq.needs_rows]
        )

    async def _step(self) -> None:
        """One step, planned and applied in turn (what `_run` does without overlap)."""
        plan, future = self._launch(self._plan())
        try:
            result = await self._result(plan, future)
        except EngineDied as exc:
            await self._recover(exc)
            return
        self._finish(plan, result)

    async def _result(self, plan: StepPlan, submitted: _Submitted) -> StepResult:
        """The step's result; an engine that raised fails the step's rows, not the loop.
        `EngineDied` passes: the engine is gone, not only this step."""
        try:
            assert submitted.future is not None
            await submitted.future
            # queued behind any plan submitted meanwhile (planned ahead): the engine may
            # run that one's forward while this one's tokens land
            result = await self._collect(submitted)
        except EngineDied:
            if submitted.collected is not None:  # queued already: it fails the same way
                await asyncio.gather(submitted.collected, return_exceptions=True)
            raise
        except Exception as exc:
            logger.exception("step %d: the engine failed", plan.step_index)
            if submitted.collected is not None:  # queued already: nothing more to read
                await asyncio.gather(submitted.collected, return_exceptions=True)
            message = f"Request failed during generation: {exc}"
            errors = {row.seq_id: message for row in plan.rows}
            return StepResult(errors=errors, kv=self._kv, step_index=plan.step_index)
        self._engine_keeps_steps = result.kept_in_flight
        round_trip_s = time.perf_counter() - submitted.started
        self._metrics.engine_step_overhead.observe(max(round_trip_s - result.engine_s, 0.0))
        if self.on_step is not None:
            self.on_step(plan, round_trip_s)
        return result

    def _collect(self, submitted: _Submitted) -> asyncio.Future[StepResult]:
        """Queue the `collect` of a submitted step on the engine thread, once."""
        if submitted.collected is None:
            submitted.collected = self._thread.submit(self._engine.collect)
        return submitted.collected

    def _launch(self, plan: StepPlan) -> tuple[StepPlan, _Submitted]:
        """Hand `plan` to the engine thread; its token-bringing rows are now in flight."""
        for row in plan.logits_rows:
            sequence = self._running.get(row.seq_id)
            if sequence is not None:
                sequence.in_flight += 1
        self._releasing.update(plan.finished)
        self._releasing.update(plan.preempted)
        submitted = _Submitted()
        submitted.future = self._thread.submit(self._timed_submit, plan, submitted)
        return plan, submitted

    def _timed_submit(self, plan: StepPlan, submitted: _Submitted) -> None:
        """`Engine.submit` on the engine thread; the step's round trip starts here."""
        submitted.started = time.perf_counter()
        self._engine.submit(plan)

    def _finish(self, plan: StepPlan, result: StepResult) -> None:
        """Apply one step's result: tokens, stops, errors, reconciliation, gauges."""
        self._kv = result.kv
        self._releasing.difference_update(plan.finished)
        self._releasing.difference_update(plan.preempted)
        for row in plan.logits_rows:
            sequence = self._running.get(row.seq_id)
            if sequence is not None and sequence.in_flight:
                sequence.in_flight -= 1
        self._policy.after_step(plan, result)
        if result.drafts_proposed:
            self._metrics.speculative_draft_tokens.inc(result.drafts_proposed)
            self._metrics.speculative_accepted_tokens.inc(result.drafts_accepted)
        self._apply(result)
        self._reconcile(result.kv, plan.step_index)
        self._publish_gauges()

    def _plan(self) -> StepPlan:
        for seq_id, sequence in list(self._running.items()):
            if sequence.cancelled:
                del self._running[seq_id]
                self._to_release.append(seq_id)
                self._metrics.request_failure.labels(err="cancelled").inc()
        finished = self._take_release()  # before scheduling: newcomers may take their room
        # Every running sequence holds KV; those whose last token is already in flight
        # (`needs_rows` False) get no row from the policy.
        schedule = self._policy.schedule(list(self._running.values()), self._admissible())
        step_index = next(self._step_index)
        self._move(schedule, step_index)
        forgotten, self._to_forget = tuple(self._to_forget), []
        return StepPlan(
            new=tuple(schedule.new),
            running=tuple(schedule.running),
            finished=tuple(finished),
            preempted=tuple(sequence.seq_id for sequence in schedule.preempted),
            forgotten=forgotten,
            step_index=step_index,
        )

    def _admissible(self) -> Sequence[SequenceState]:
        """The waiting queue as far as the policy may admit from it this step: all of
        it, unless it holds suspects (rows retried after a failed step, see
        `EngineCore._blame`). Then it ends before the first suspect while another one
        runs, else before the second: a suspect never shares a step with another
        suspect, so the one that fails again is the one to blame, and the innocent rows
        of a failed step run without their offender."""
        if not self._suspects:
            return self._waiting
        live = {*self._running, *(sequence.seq_id for sequence in self._waiting)}
        self._suspects &= live  # ended (cancelled, failed) while suspected
        suspect_runs = any(seq_id in self._suspects for seq_id in self._running)
        for index, sequence in enumerate(self._waiting):
            if sequence.seq_id in self._suspects:
                if suspect_runs:
                    return list(itertools.islice(self._waiting, index))
                suspect_runs = True
        return self._waiting

    def _move(self, schedule: Schedule, step_index: int) -> None:
        """Preempted sequences go back to the front of the queue, admitted ones run."""
        for sequence in schedule.preempted:  # latest first, so the earliest ends up in front
            del self._running[sequence.seq_id]
            self._waiting.appendleft(sequence)
            logger.debug("request %d preempted: its KV will be recomputed", sequence.seq_id)
        if schedule.preempted:
            self._metrics.preemptions.inc(len(schedule.preempted))
        now = self._clock()
        for sequence in schedule.admitted:  # admission is FCFS: a prefix of the queue
            taken = self._waiting.popleft()
            if taken is not sequence:
                raise RuntimeError("a policy admitted a request that is not the queue's head")
            if sequence.scheduled_s is None:
                sequence.scheduled_s = now
            sequence.admitted_step = step_index
            self._running[sequence.seq_id] = sequence
        if schedule.queried_tokens:
            self._metrics.prefix_cache_queried_tokens.inc(schedule.queried_tokens)
            self._metrics.prefix_cache_hit_tokens.inc(schedule.hit_tokens)

    async def _recover(self, died: Exception) -> None:
        """The engine died with every sequence's KV: fail the requests it was serving
        (503), forget what the policy handed out, restart it, and serve the queue again.
        Gives up (`fatal`) after `max_restarts` restarts within RESTART_WINDOW_S."""
        self._healthy = False
        self._restarting = True
        self._metrics.engine_healthy.set(0)
        message = f"Request failed during generation: the engine failed ({died}); retry later"
        running = [seq for seq in self._running.values() if not seq.cancelled]
        self._running.clear()
        queued: deque[SequenceState] = deque()
        for sequence in self._waiting:
            if sequence.tokens:  # a preempted request that streamed already: in flight
                running.append(sequence)
            else:  # not started, or preempted before its first token: served afresh
                sequence.admitted_step = 0
                sequence.in_flight = 0
                queued.append(sequence)
        self._waiting = queued
        for sequence in running:
            self._fail_unavailable(sequence, message)
        self._to_release.clear()
        self._to_forget.clear()
        self._releasing.clear()
        self._suspects.clear()  # the new engine suspects no one either
        self._policy.reset()
        logger.error(
            "%s; %d requests failed with 503, %d queued wait for a restart",
            died,
            len(running),
            len(queued),
        )
        while True:
            if self._closing or self._draining:  # shutting down: no new worker for it
                for sequence in self._waiting:
                    self._fail_unavailable(sequence, message)
                self._waiting.clear()
                return
            now = self._clock()
            while self._restarted_at and now - self._restarted_at[0] > RESTART_WINDOW_S:
                self._restarted_at.popleft()
            if len(self._restarted_at) >= self._limits.max_restarts:
                self._give_up(
                    f"the engine failed after {len(self._restarted_at)} restarts within "
                    f"{RESTART_WINDOW_S:.0f} s (--max-engine-restarts "
                    f"{self._limits.max_restarts}); last failure: {died}"
                )
                return
            self._restarted_at.append(now)
            try:
                report = await self._in_engine(self._engine.restart)
            except RestartImpossible as exc:  # nothing to retry: fail what waits, stop
                self._give_up(str(exc))
                return
            except Exception as exc:
                logger.error("restarting the engine failed: %s", exc)
                died = exc
                await asyncio.sleep(RESTART_PAUSE_S)  # a device may need a moment to free
                continue
            break
        self._kv = KVUsage(frozenset(), 0, report.kv.total_tokens)
        self._restarting = False
        self._healthy = not self._draining
        self.restarts += 1
        self._metrics.engine_restarts.inc()
        self._metrics.engine_healthy.set(1)
        self._metrics.set_engine_details(self._engine.description.details)
        self._publish_gauges()
        logger.warning(
            "engine restarted (pid %d); serving %d queued requests",
            self._engine.description.pid,
            len(self._waiting),
        )

    def _give_up(self, reason: str) -> None:
        """No engine any more: fail everything queued or running, stop the loop, tell
        the server."""
        self.fatal = reason
        self._healthy = False
        self._metrics.engine_healthy.set(0)
        logger.critical("giving up: %s", reason)
        for sequence in [*self._waiting, *self._running.values()]:
            if not sequence.done:
                self._fail_unavailable(sequence, f"Request failed: {reason}")
        self._waiting.clear()
        self._closing = True
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _fail_unavailable(self, sequence: SequenceState, message: str) -> None:
        """End a request the engine can no longer serve (TGI's 503, `unhealthy`)."""
        sequence.done = True
        sequence.events.put_nowait(ErrorEvent(message, error_type="unhealthy"))
        self._metrics.request_failure.labels(err="unhealthy").inc()

    def _requeue(self, sequences: list[SequenceState]) -> None:
        """Sequences whose KV a failed step dropped go back to the front of the queue,
        in admission order, to be recomputed as after a preemption, as suspects (see
        `_admissible`); those whose client left are only forgotten, and those the
        backend could not recompute in one piece fail."""
        if not sequences:
            return
        self._policy.free([sequence.seq_id for sequence in sequences])
        requeued = []
        for sequence in sequences:
            sequence.in_flight = 0
            if sequence.cancelled:
                self._to_forget.append(sequence.seq_id)
                self._metrics.request_failure.labels(err="cancelled").inc()
            elif not self._policy.can_recompute(sequence):
                self._fail(
                    sequence,
                    "Request failed during generation: a failed step dropped its KV and its "
                    f"{sequence.num_computed} tokens are more than the backend can recompute",
                )
            else:
                requeued.append(sequence)
                self._suspects.add(sequence.seq_id)  # as the engine does: see _admissible
        for sequence in reversed(requeued):
            self._waiting.appendleft(sequence)
        if requeued:
            self._metrics.preemptions.inc(len(requeued))
            logger.warning(
                "a failed step dropped the KV of %d running requests; they will be recomputed",
                len(requeued),
            )

    def _take_release(self) -> list[int]:
        """Hand over the ids whose KV is to be released; what they owned becomes free."""
        ids, self._to_release = self._to_release, []
        self._policy.free(ids)
        return ids

    def _reconcile(self, kv: KVUsage, step_index: int) -> None:
        """Make the backend's live set and the router's agree after every step.

        A sequence the backend holds but the router neither runs nor is releasing is a
        stray: it is released. A running sequence the backend no longer holds lost its
        KV: it fails with an error instead of decoding garbage. What the policy owns
        follows the same rule, so neither KV nor slots nor blocks can leak. `kv` is as of
        step `step_index`: sequences admitted by a later plan still in flight are not
        expected in it yet, and those a later plan releases still are.
        """
        live = {seq_id for seq_id, seq in self._running.items() if seq.admitted_step <= step_index}
        pending = set(self._to_release) | self._releasing | set(self._running)
        strays = sorted(kv.seq_ids - pending)
        if strays:
            logger.warning("backend holds KV of sequences %s the router has ended", strays)
            self._to_release.extend(strays)
        for seq_id in sorted(live - kv.seq_ids):
            sequence = self._running.pop(seq_id)
            if sequence.cancelled:  # its client is gone: nothing to tell, just let go
                self._to_release.append(seq_id)
                self._metrics.request_failure.labels(err="cancelled").inc()
                continue
            logger.error("backend lost the KV of running sequence %d", seq_id)
            self._healthy = False
            self._fail(
                sequence,
                f"Request failed during generation: the backend lost the state of request "
                f"{seq_id} (its KV cache is no longer live)",
            )
        leaked = self._policy.retain(set(self._running) | set(self._to_release))
        if leaked:
            logger.error("slots or blocks of sequences %s were still held; freed", leaked)

    def _apply(self, result: StepResult) -> None:
        now = self._clock()
        for phase, seconds in result.durations.items():
            self._metrics.batch_forward_duration.labels(method=phase).observe(seconds)
        for seq_id, message in result.errors.items():
            sequence = self._running.pop(seq_id, None)
            if sequence is not None:
                self._healthy = False
                self._fail(sequence, message)
        self._requeue([self._running.pop(i) for i in result.recompute if i in self._running])
        for seq_id, token_id, logprob in result.tokens:
            sequence = self._running.get(seq_id)
            if sequence is None or sequence.cancelled:
                continue  # ended earlier in this step, or its client went away
            self._suspects.discard(seq_id)  # it ran: the engine cleared it too
            if seq_id in result.prompt_logprobs and not sequence.tokens:
                sequence.prefill = self._prefill_tokens(sequence, result.prompt_logprobs[seq_id])
            top = result.top_tokens.get(seq_id)
            self._advance(sequence, token_id, logprob, now, top)

    def _advance(
        self,
        sequence: SequenceState,
        token_id: int,
        logprob: float,
        now: float,
        top_pairs: list[tuple[int, float]] | None = None,
    ) -> None:
        text = sequence.detokenizer.push(token_id)
        token = GeneratedToken(token_id, text, logprob, token_id in self._special_ids)
        top = top_tokens_of(self._tokenizer, self._special_ids, top_pairs) if top_pairs else ()
        sequence.record(token, top)
        reason = sequence.stop.check(token_id, text)
        index = len(sequence.tokens)
        if reason is None:
            sequence.events.put_nowait(TokenEvent(index=index, token=token, top_tokens=top))
            return
        del self._running[sequence.seq_id]
        self._to_release.append(sequence.seq_id)
        sequence.done = True
        event = sequence.final_event(self._tokenizer, reason, now)
        sequence.events.put_nowait(event)
        self._record_success(event, now - sequence.arrival_s)

    def _prefill_tokens(
        self, sequence: SequenceState, logprobs: list[float]
    ) -> tuple[PrefillToken, ...]:
        ids = sequence.request.input_ids
        texts = [self._tokenizer.decode([token_id]) for token_id in ids]
        first = PrefillToken(ids[0], texts[0], None)
        pairs = zip(ids[1:], texts[1:], logprobs, strict=True)
        rest = (PrefillToken(token_id, text, logprob) for token_id, text, logprob in pairs)
        return (first, *rest)

    def _fail(self, sequence: SequenceState, message: str) -> None:
        """End a sequence whose KV the backend no longer holds (its step failed, or it
        was lost): free what the policy gave it, drop the engine's sampler state."""
        self._policy.free([sequence.seq_id])
        self._to_forget.append(sequence.seq_id)
        self._suspects.discard(sequence.seq_id)
        sequence.done = True
        sequence.events.put_nowait(ErrorEvent(message))
        self._metrics.request_failure.labels(err="generation").inc()

    def _record_success(self, event: FinalEvent, total_s: float) -> None:
        m = self._metrics
        m.request_success.inc()
        m.request_duration.observe(total_s)
        m.request_queue_duration.observe(event.queued_s)
        m.request_inference_duration.observe(event.inference_s)
        m.request_generated_tokens.observe(event.generated_tokens)
        if event.generated_tokens:
            m.request_mean_time_per_token_duration.observe(
                event.inference_s / event.generated_tokens
            )

    def _publish_gauges(self) -> None:
        stats = self.stats()
        self._metrics.queue_size.set(stats.queue_size)
        self._metrics.batch_current_size.set(stats.batch_size)
        self._metrics.batch_current_max_tokens.set(stats.reserved_tokens)
        self._metrics.kv_used_tokens.set(stats.kv.used_tokens)
        blocks = self._policy.block_usage()
        if blocks is not None:
            self._metrics.kv_blocks_used.set(blocks[0])
            self._metrics.kv_blocks_free.set(blocks[1])

    async def _in_engine(self, fn: Callable[..., Any], *args: object) -> Any:
        return await self._thread.run(fn, *args)
