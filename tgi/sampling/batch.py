"""The engine thread's sampler: cached per-row tensors, token histories, one host copy.

NOTE: `BatchSampler` is what a scheduler step calls once per forward. It rebuilds the
`SamplingBatch` (and the rows' history slots) only when the rows change, keeps the
histories the penalties and the watermark read up to date with device ops, and ends
with exactly one device-to-host copy: the chosen ids, their logprobs and any top-n
tokens packed into one float64 tensor and read with one `.tolist()` (float64 holds
every token id exactly). `sample_on_device` stops before that copy ends: its
`PendingTokens` holds the ids on the device (what the engine feeds the next forward
from) while the copy, non-blocking into pinned memory on an accelerator, runs; `wait`
ends it.

Grammar rows (`SamplingParams.grammar`, a `GrammarSpec`) get a matcher per sequence,
created at the row's first sample from the spec compiled through the sampler's
`GrammarCompiler` (the LRU validation filled: a hit in the same process), advanced
with every token it samples (from the host copy, so no extra sync) and dropped only on
`release`, so a sequence paused and resumed keeps its place in the grammar. Each
forward has llguidance fill one `[G, ceil(V/32)]` int32 bitmask for the G grammar rows
on the host, moves it to the logits' device once (a host-to-device copy: the forward's
one device-to-host copy stays the only one), and masks those rows' scores with one
batched op; other rows are untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tgi.sampling.grammar import GrammarCompiler, GrammarMask, advance, grammar_bitmask
from tgi.sampling.history import TokenHistory
from tgi.sampling.params import SamplingParams
from tgi.sampling.sampler import HistoryView, SampleOutput, SamplingBatch, sample

__all__ = ["BatchSampler", "PendingTokens", "SampledTokens"]


@dataclass(frozen=True, slots=True)
class SampledTokens:
    """One forward's choices, on the host, in row order."""

    token_ids: list[int]
    logprobs: list[float]
    top_tokens: list[list[tuple[int, float]]]  # per row: (id, logprob), best first; [] if not asked


@dataclass(frozen=True, slots=True)
class _Cached:
    key: tuple[object, ...]  # (seq_ids, device, vocab)
    batch: SamplingBatch
    slots: torch.Tensor | None  # [B] history slot per row, None when no row reads history
    grammar_rows: tuple[int, ...] = ()  # indices of the rows with a grammar
    grammar_index: torch.Tensor | None = None  # the same, [G] on the device; None: all rows


class BatchSampler:
    """Samples the forwards of one engine; call it from that engine's thread only.

    `grammars` compiles the rows' `GrammarSpec`s: the validator's compiler where both
    live in one process (so each spec is a cache hit), one for the same tokenizer
    elsewhere. Without it a row with a grammar is refused with `ValueError`.
    """

    def __init__(self, grammars: GrammarCompiler | None = None) -> None:
        self._grammars = grammars
        self._cache: dict[str, _Cached] = {}  # per stream of forwards ("prefill", "decode")
        self._history = TokenHistory()
        self._matchers: dict[int, Any] = {}  # seq_id -> llguidance.LLMatcher of its grammar
        self._unfinished: PendingTokens | None = None  # the last sample, until waited for

    def sample(
        self,
        stream: str,
        seq_ids: Sequence[int],
        params: Sequence[SamplingParams],
        steps: Sequence[int],
        logits: torch.Tensor,
        prompts: Sequence[Sequence[int] | None] | None = None,
    ) -> SampledTokens:
        """Choose the next token of every row of `logits` ([R, V]), on the host.

        `stream` names the cache ("prefill" or "decode"): the tensors built for a row set
        are reused while the next call of that stream has the same rows. `prompts`, given
        for a row's first sample (None for the others), starts the history of each row
        that needs one. Mutates the
        histories (each row's chosen token is appended).
        """
        return self.sample_on_device(stream, seq_ids, params, steps, logits, prompts).wait()

    def sample_on_device(
        self,
        stream: str,
        seq_ids: Sequence[int],
        params: Sequence[SamplingParams],
        steps: Sequence[int],
        logits: torch.Tensor,
        prompts: Sequence[Sequence[int] | None] | None = None,
    ) -> PendingTokens:
        """`sample`, up to the host copy: the choices stay on the logits' device, their
        copy to the host is started (non-blocking where the device allows), and
        `PendingTokens.wait` ends it. The next sample must wait until then: grammar
        rows advance their matchers from the host copy."""
        if self._unfinished is not None and not self._unfinished.done:
            raise RuntimeError("the previous sample's tokens were not waited for")
        vocab, device = logits.shape[-1], logits.device
        if prompts is not None:
            for seq_id, row_params, prompt in zip(seq_ids, params, prompts, strict=True):
                if prompt is not None and row_params.needs_history:
                    self._history.start(seq_id, prompt, vocab, device)
        key = (tuple(seq_ids), device, vocab)
        cached = self._cache.get(stream)
        if cached is None or cached.key != key:
            batch = SamplingBatch.build(params, vocab, device)
            slots = self._history.slots(seq_ids, vocab, device) if batch.any_history else None
            rows = tuple(i for i, row_params in enumerate(params) if row_params.grammar is not None)
            index = None
            if rows and len(rows) < len(params):
                index = torch.tensor(rows, dtype=torch.int64, device=device)
            cached = _Cached(key, batch, slots, rows, index)
            self._cache[stream] = cached
        history = None
        if cached.slots is not None:
            history = HistoryView(*self._history.view(cached.slots))
        matchers, mask = self._grammar_mask(cached, seq_ids, params, vocab, device)
        step_tensor = torch.tensor(list(steps), dtype=torch.int64, device=device)
        out = sample(logits, cached.batch, step_tensor, history, mask)
        if cached.slots is not None:
            self._history.append(cached.slots, out.token_ids)
        pending = PendingTokens(out, cached.batch, matchers, cached.grammar_rows)
        self._unfinished = pending
        return pending

    def _grammar_mask(
        self,
        cached: _Cached,
        seq_ids: Sequence[int],
        params: Sequence[SamplingParams],
        vocab: int,
        device: torch.device,
    ) -> tuple[list[Any], GrammarMask | None]:
        """The grammar rows' matchers (started at a row's first sample) and their token
        masks on `device`; ([], None) when no row has a grammar."""
        rows = cached.grammar_rows
        if not rows:
            return [], None
        grammars = self._grammars
        if grammars is None:
            raise ValueError(
                f"seq {seq_ids[rows[0]]} has a grammar, but this BatchSampler has no "
                "GrammarCompiler: build it with BatchSampler(grammars=...)"
            )
        matchers = []
        for row in rows:
            matcher = self._matchers.get(seq_ids[row])
            if matcher is None:
                spec = params[row].grammar
                if spec is None:
                    raise ValueError("row parameters changed under a cached batch")
                # once per sequence: an LRU hit where validation compiled it
                matcher = self._matchers[seq_ids[row]] = grammars.compile_spec(spec).new_matcher()
            matchers.append(matcher)
        bitmask = grammar_bitmask(matchers, grammars.mask_words, vocab)  # [G, ceil(V/32)], host
        mask = GrammarMask.from_bitmask(bitmask.to(device), vocab, cached.grammar_index)
        return matchers, mask

    def release(self, seq_ids: Iterable[int]) -> None:
        """Forget the histories and grammar states of sequences that ended."""
        seq_ids = list(seq_ids)
        self._history.release(seq_ids)
        for seq_id in seq_ids:
            self._matchers.pop(seq_id, None)

    @property
    def num_histories(self) -> int:
        return self._history.num_sequences

    @property
    def num_matchers(self) -> int:
        """Sequences holding grammar state (for tests and leak checks)."""
        return len(self._matchers)


class PendingTokens:
    """One forward's choices: on their device at once (`token_ids`, which the next
    forward may feed), on the host after `wait` (one copy for ids, logprobs and top-n)."""

    def __init__(
        self,
        out: SampleOutput,
        batch: SamplingBatch,
        matchers: list[Any],
        grammar_rows: tuple[int, ...],
    ) -> None:
        self.token_ids = out.token_ids  # [R] int64, on the logits' device
        self._batch = batch
        self._matchers = matchers
        self._grammar_rows = grammar_rows
        columns = [
            out.token_ids.to(torch.float64)[:, None],
            out.logprobs.to(torch.float64)[:, None],
        ]
        if out.top_ids is not None and out.top_logprobs is not None:
            columns += [out.top_ids.to(torch.float64), out.top_logprobs.to(torch.float64)]
        # float64 holds every token id exactly: one tensor, one device-to-host copy
        self._host, self._copied = _start_host_copy(torch.cat(columns, dim=1))
        self._sampled: SampledTokens | None = None
        self._failed: Exception | None = None  # the copy's error, once `wait` saw it

    @property
    def in_transit(self) -> bool:
        """Whether the host copy runs while the host goes on (a non-blocking copy from
        an accelerator); on a CPU there is nothing to wait for but the copy itself."""
        return self._copied is not None and not self.done

    @property
    def done(self) -> bool:
        """Waited for: landed, or failed to."""
        return self._sampled is not None or self._failed is not None

    def wait(self) -> SampledTokens:
        """The choices on the host (the copy's end), each grammar row's matcher advanced
        by its token. Idempotent."""
        if self._sampled is not None:
            return self._sampled
        if self._failed is not None:
            raise self._failed
        try:
            if self._copied is not None:
                self._copied.synchronize()
            rows = self._host.tolist()  # on a CPU, the copy itself
        except Exception as exc:  # done, failed: the sampler may take the next forward
            self._failed = exc
            raise
        width = self._batch.max_top_n
        top_tokens = [
            [
                (int(i), lp)
                for i, lp in zip(row[2 : 2 + n], row[2 + width : 2 + width + n], strict=True)
            ]
            for row, n in zip(rows, self._batch.top_n, strict=True)
        ]
        sampled = SampledTokens([int(row[0]) for row in rows], [row[1] for row in rows], top_tokens)
        if self._matchers:
            advance(self._matchers, [sampled.token_ids[row] for row in self._grammar_rows])
        self._sampled = sampled
        return sampled


def _start_host_copy(packed: torch.Tensor) -> tuple[torch.Tensor, Any]:
    """Start copying `packed` to the host: (the host tensor, an event to wait on).

    On an accelerator, a non-blocking copy into pinned memory, waited for through a
    device-neutral `torch.Event`; on a CPU, or an accelerator without events or pinned
    memory, the tensor itself, which `tolist` copies (blocking) when asked."""
    if packed.device.type == "cpu":
        return packed, None
    try:
        host = torch.empty(packed.shape, dtype=packed.dtype, pin_memory=True)
        copied = torch.Event(device=packed.device)
    except (RuntimeError, ValueError, TypeError):  # no pinned memory or events there
        return packed, None
    host.copy_(packed, non_blocking=True)
    copied.record()
    return host, copied
