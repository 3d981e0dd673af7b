"""The router's scheduler: one loop that admits, prefills, decodes, samples and streams.

NOTE: all router state (waiting queue, running rows, cancellations) lives on the event
loop thread. Only backend calls and sampling run on the single engine thread, one
step at a time, so the backend never sees two calls at once (the contract's promise)
and HTTP handlers stay responsive while a forward runs. A step is:

    loop thread                         engine thread
    -----------                         -------------
    drop cancelled rows  ──plan──►      release(ended) ─ prefill(new) ─ sample
    admit waiting rows                  decode(running) ─ sample ─ kv_usage()
    apply tokens, stream  ◄─result──    (one device-to-host copy per forward)

Every sequence that reached the backend is released exactly once: when it finishes,
fails, or its client goes away. After each step the backend's live set (`KVUsage`) is
reconciled with the router's, so a backend's stray or lost sequence cannot leak KV or
static slots (`_reconcile`).

A paged backend's steps are planned by `PagedPolicy` (`_plan_paged`): chunks and decode
rows with block tables, preemptions (KV released, sampler state kept, back to the front
of the queue) and speculative drafts; see `tgi/router/policies/paged.py`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from tgi.backend.contract import Backend, Capabilities, KvLayout, KVUsage
from tgi.errors import BackendUnavailable, Overloaded
from tgi.metrics import Metrics
from tgi.router.engine import EngineStep, StepPlan, StepResult
from tgi.router.engine_thread import EngineThread
from tgi.router.policies import (
    Budget,
    Candidate,
    ContinuousPolicy,
    PagedPolicy,
    StaticSlotsPolicy,
)
from tgi.router.request import (
    ErrorEvent,
    FinalEvent,
    GeneratedToken,
    GenerationRequest,
    PrefillToken,
    TokenEvent,
)
from tgi.router.sequence import Sequence, TokenizerLike, top_tokens_of

__all__ = ["Event", "RequestHandle", "Router", "RouterLimits", "RouterStats"]

logger = logging.getLogger(__name__)

Event = TokenEvent | FinalEvent | ErrorEvent


class RequestHandle:
    """The client side of one request: iterate its events, or cancel it."""

    def __init__(self, sequence: Sequence, router: Router) -> None:
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
    """The router's share of the configuration."""

    max_batch_prefill_tokens: int
    max_batch_total_tokens: int
    max_batch_size: int | None
    max_concurrent_requests: int


@dataclass(frozen=True, slots=True)
class RouterStats:
    """A snapshot for /info and tests."""

    queue_size: int
    batch_size: int
    reserved_tokens: int
    kv: KVUsage


class Router:
    """Owns the queue and the running batch; drives the backend one step at a time."""

    def __init__(
        self,
        backend: Backend,
        tokenizer: TokenizerLike,
        *,
        limits: RouterLimits,
        policy: ContinuousPolicy | StaticSlotsPolicy | PagedPolicy,
        eos_token_ids: frozenset[int],
        metrics: Metrics,
        initial_kv: KVUsage,
        clock: Callable[[], float] = time.monotonic,
        engine_thread: EngineThread | None = None,  # the thread start-up loaded the backend on
    ) -> None:
        self._backend = backend
        self._tokenizer = tokenizer
        self._limits = limits
        self._policy = policy
        # Static-shape backends: the slot each running sequence owns (see policies/static.py).
        self._static = policy if isinstance(policy, StaticSlotsPolicy) else None
        # Paged backends: the router owns block tables (see policies/paged.py).
        self._paged = policy if isinstance(policy, PagedPolicy) else None
        self._to_forget: list[int] = []  # preempted, then cancelled: sampler state only
        self._eos_token_ids = eos_token_ids
        self._special_ids = frozenset(getattr(tokenizer, "all_special_ids", ()))
        self._metrics = metrics
        self._clock = clock
        self._seq_ids = itertools.count(1)
        self._waiting: deque[Sequence] = deque()
        self._running: dict[int, Sequence] = {}
        self._to_release: list[int] = []
        self._steps_since_prefill = 0
        self._wake = asyncio.Event()
        self._thread = engine_thread or EngineThread()
        self._engine = EngineStep(backend)
        self._kv = initial_kv
        self._task: asyncio.Task[None] | None = None
        self._healthy = True
        self._closing = False
        metrics.kv_capacity_tokens.set(initial_kv.capacity_tokens)

    # ---- lifecycle -------------------------------------------------------------

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="tgi-router")

    async def stop(self) -> None:
        """Fail what is left, release its KV, and stop the loop."""
        if self._task is not None:
            # Let the step in flight finish: cancelling it could drop planned releases.
            self._closing = True
            self._wake.set()
            await self._task
            self._task = None
        leftovers = list(self._waiting) + list(self._running.values())
        for sequence in leftovers:
            sequence.events.put_nowait(ErrorEvent("server is shutting down"))
        self._waiting.clear()
        ids = [*self._running, *self._take_release(), *self._to_forget]
        self._running.clear()
        if self._paged is not None:
            self._paged.free(ids)
        self._kv = await self._in_engine(self._engine.release, ids)
        self._thread.shutdown()

    # ---- requests ---------------------------------------------------------------

    def submit(self, request: GenerationRequest) -> RequestHandle:
        """Queue a validated request; raises `Overloaded` at max_concurrent_requests."""
        if len(self._waiting) + len(self._running) >= self._limits.max_concurrent_requests:
            self._metrics.request_failure.labels(err="overloaded").inc()
            raise Overloaded("Model is overloaded")
        sequence = Sequence.create(
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

    def cancel(self, sequence: Sequence) -> None:
        """Stop a request whose client went away; its KV is freed at the next step."""
        if sequence.done or sequence.cancelled:
            return
        sequence.cancelled = True
        if sequence in self._waiting:
            self._waiting.remove(sequence)
            self._metrics.queue_size.set(len(self._waiting))
            if sequence.tokens:  # preempted: its KV is gone, its sampler state is not
                self._to_forget.append(sequence.seq_id)
        logger.debug("request %d cancelled", sequence.seq_id)
        self._wake.set()

    def stats(self) -> RouterStats:
        if self._paged is not None:
            reserved = self._paged.pool.num_used * self._paged.block_size
        else:
            reserved = sum(seq.max_total_tokens for seq in self._running.values())
        return RouterStats(len(self._waiting), len(self._running), reserved, self._kv)

    @property
    def healthy(self) -> bool:
        return self._healthy

    async def check_health(self) -> None:
        """A real one-token forward on the engine thread; raises BackendUnavailable."""
        try:
            await self._in_engine(self._backend.health)
        except Exception as exc:
            self._healthy = False
            raise BackendUnavailable(f"backend health check failed: {exc}") from exc
        self._healthy = True

    # ---- the loop ---------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            if not (self._waiting or self._running or self._to_release or self._to_forget):
                self._wake.clear()
                await self._wake.wait()
                continue
            await self._step()

    async def _step(self) -> None:
        plan = self._plan()
        result: StepResult = await self._in_engine(self._engine.run, plan)
        self._kv = result.kv
        if self._paged is not None:
            self._paged.after_step(result.errors)
            if result.drafts_proposed:
                self._paged.gate.record(result.drafts_proposed, result.drafts_accepted)
                self._metrics.speculative_draft_tokens.inc(result.drafts_proposed)
                self._metrics.speculative_accepted_tokens.inc(result.drafts_accepted)
        self._apply(plan, result)
        self._reconcile(result.kv)
        if self._to_release:  # finished this step: free their KV now, not next step
            ids = self._take_release()
            self._kv = await self._in_engine(self._engine.release, ids)
        self._publish_gauges()

    def _plan(self) -> StepPlan:
        for seq_id, sequence in list(self._running.items()):
            if sequence.cancelled:
                del self._running[seq_id]
                self._to_release.append(seq_id)
                self._metrics.request_failure.labels(err="cancelled").inc()
        release = self._take_release()  # before admission: newcomers may take their slots
        if self._paged is not None:
            return self._plan_paged(self._paged, tuple(release))
        admitted = self._admit()
        now = self._clock()
        for sequence in admitted:
            sequence.scheduled_s = now
        decoding = [seq for seq in self._running.values()]
        for sequence in admitted:
            self._running[sequence.seq_id] = sequence
        self._steps_since_prefill = 0 if admitted else self._steps_since_prefill + 1
        if self._static is None:
            return StepPlan.build(release=tuple(release), prefill=admitted, decode=decoding)
        for sequence in admitted:
            self._static.slots.take(sequence.seq_id)
        return StepPlan.build(
            release=tuple(release),
            prefill=admitted,
            decode=decoding,
            # A prefill rewrites every slot's KV here: re-send each running history.
            rebuild=decoding if admitted and self._static.rebuild else (),
            slots=self._static.slots.assignment,
        )

    def _plan_paged(self, paged: PagedPolicy, release: tuple[int, ...]) -> StepPlan:
        """A paged step: work for every running row, preemptions, then admissions."""
        step = paged.schedule(
            list(self._running.values()),
            self._waiting,
            max_batch_prefill_tokens=self._limits.max_batch_prefill_tokens,
            max_batch_size=self._limits.max_batch_size,
        )
        for sequence in step.preempted:  # latest first, so the earliest ends up in front
            del self._running[sequence.seq_id]
            self._waiting.appendleft(sequence)
            logger.debug("request %d preempted: its KV will be recomputed", sequence.seq_id)
        if step.preempted:
            self._metrics.preemptions.inc(len(step.preempted))
        now = self._clock()
        for sequence in step.admitted:  # admission is FCFS: a prefix of the queue
            taken = self._waiting.popleft()
            assert taken is sequence, "paged admission must take the queue's head"
            if sequence.scheduled_s is None:
                sequence.scheduled_s = now
            self._running[sequence.seq_id] = sequence
        if step.queried_tokens:
            self._metrics.prefix_cache_queried_tokens.inc(step.queried_tokens)
            self._metrics.prefix_cache_hit_tokens.inc(step.hit_tokens)
        forget, self._to_forget = tuple(self._to_forget), []
        return StepPlan.paged(
            release=release,
            preempt=tuple(seq.seq_id for seq in step.preempted),
            forget=forget,
            prefill=step.prefill,
            decode=step.decode,
        )

    def _take_release(self) -> list[int]:
        """Hand over the ids whose KV is to be released; their slots become free."""
        ids, self._to_release = self._to_release, []
        if self._static is not None:
            self._static.slots.free(ids)
        if self._paged is not None:
            self._paged.free(ids)
        return ids

    def _reconcile(self, kv: KVUsage) -> None:
        """Make the backend's live set and the router's agree after every step.

        A sequence the backend holds but the router neither runs nor is releasing is a
        stray: it is released. A running sequence the backend no longer holds lost its
        KV: it fails with an error instead of decoding garbage. Slots follow the same
        rule, so neither KV nor slots can leak whatever a backend does.
        """
        live, pending = set(self._running), set(self._to_release)
        strays = sorted(kv.seq_ids - live - pending)
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
        if self._static is not None:
            leaked = self._static.slots.retain(set(self._running) | set(self._to_release))
            if leaked:
                logger.error("slots of sequences %s were still held; freed", leaked)

    def _admit(self) -> list[Sequence]:
        candidates = [
            Candidate(seq.seq_id, len(seq.request.input_ids), seq.max_total_tokens)
            for seq in self._waiting
        ]
        budget = Budget(
            running=len(self._running),
            reserved_tokens=sum(seq.max_total_tokens for seq in self._running.values()),
            max_batch_total_tokens=self._limits.max_batch_total_tokens,
            max_batch_prefill_tokens=self._limits.max_batch_prefill_tokens,
            max_batch_size=self._limits.max_batch_size,
            steps_since_prefill=self._steps_since_prefill,
        )
        policy = self._policy
        assert not isinstance(policy, PagedPolicy), "paged steps are planned by _plan_paged"
        chosen = set(policy.admit(candidates, budget).seq_ids)
        if not chosen:
            return []
        admitted = [seq for seq in self._waiting if seq.seq_id in chosen]
        self._waiting = deque(seq for seq in self._waiting if seq.seq_id not in chosen)
        return admitted

    def _apply(self, plan: StepPlan, result: StepResult) -> None:
        now = self._clock()
        for method, seconds in result.durations.items():
            self._metrics.batch_forward_duration.labels(method=method).observe(seconds)
        for seq_id, message in result.errors.items():
            sequence = self._running.pop(seq_id, None)
            if sequence is not None:
                self._healthy = False
                self._fail(sequence, message)
        for seq_id, token_id, logprob in result.tokens:
            sequence = self._running.get(seq_id)
            if sequence is None or sequence.cancelled:
                continue  # cancelled mid-step: its release is already planned
            if seq_id in result.prompt_logprobs:
                sequence.prefill = self._prefill_tokens(sequence, result.prompt_logprobs[seq_id])
            top = result.top_tokens.get(seq_id)
            self._advance(sequence, token_id, logprob, now, top)

    def _advance(
        self,
        sequence: Sequence,
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
        self, sequence: Sequence, logprobs: list[float]
    ) -> tuple[PrefillToken, ...]:
        ids = sequence.request.input_ids
        texts = [self._tokenizer.decode([token_id]) for token_id in ids]
        first = PrefillToken(ids[0], texts[0], None)
        pairs = zip(ids[1:], texts[1:], logprobs, strict=True)
        rest = (PrefillToken(token_id, text, logprob) for token_id, text, logprob in pairs)
        return (first, *rest)

    def _fail(self, sequence: Sequence, message: str) -> None:
        self._to_release.append(sequence.seq_id)
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
        if self._paged is not None:
            pool = self._paged.pool
            self._metrics.kv_blocks_used.set(pool.num_used)
            self._metrics.kv_blocks_free.set(pool.num_available)

    async def _in_engine(self, fn: Callable[..., object], *args: object):  # type: ignore[no-untyped-def]
        return await self._thread.run(fn, *args)


def joins_immediately(capabilities: Capabilities) -> bool:
    """Whether new rows can join without pausing the batch (see the continuous policy)."""
    return capabilities.chunked_prefill or capabilities.kv_layout is KvLayout.PER_ROW
