"""The engine thread's sampler: cached per-row tensors, token histories, one host copy.

NOTE: `BatchSampler` is what a scheduler step calls once per forward. It rebuilds the
`SamplingBatch` (and the rows' history slots) only when the rows change, keeps the
histories the penalties and the watermark read up to date with device ops, and ends
with exactly one device-to-host copy: the chosen ids, their logprobs and any top-n
tokens packed into one float64 tensor and read with one `.tolist()` (float64 holds
every token id exactly).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from tgi.sampling.history import TokenHistory
from tgi.sampling.params import SamplingParams
from tgi.sampling.sampler import HistoryView, SamplingBatch, sample

__all__ = ["BatchSampler", "SampledTokens"]


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


class BatchSampler:
    """Samples the forwards of one engine; call it from that engine's thread only."""

    def __init__(self) -> None:
        self._cache: dict[str, _Cached] = {}  # per stream of forwards ("prefill", "decode")
        self._history = TokenHistory()

    def sample(
        self,
        stream: str,
        seq_ids: Sequence[int],
        params: Sequence[SamplingParams],
        steps: Sequence[int],
        logits: torch.Tensor,
        prompts: Sequence[Sequence[int]] | None = None,
    ) -> SampledTokens:
        """Choose the next token of every row of `logits` ([R, V]).

        `stream` names the cache ("prefill" or "decode"): the tensors built for a row set
        are reused while the next call of that stream has the same rows. `prompts`, given
        for a prefill, starts the history of each row that needs one. Mutates the
        histories (each row's chosen token is appended).
        """
        vocab, device = logits.shape[-1], logits.device
        if prompts is not None:
            for seq_id, row_params, prompt in zip(seq_ids, params, prompts, strict=True):
                if row_params.needs_history:
                    self._history.start(seq_id, prompt, vocab, device)
        key = (tuple(seq_ids), device, vocab)
        cached = self._cache.get(stream)
        if cached is None or cached.key != key:
            batch = SamplingBatch.build(params, vocab, device)
            slots = self._history.slots(seq_ids, vocab, device) if batch.any_history else None
            cached = _Cached(key, batch, slots)
            self._cache[stream] = cached
        history = None
        if cached.slots is not None:
            history = HistoryView(*self._history.view(cached.slots))
        step_tensor = torch.tensor(list(steps), dtype=torch.int64, device=device)
        out = sample(logits, cached.batch, step_tensor, history)
        if cached.slots is not None:
            self._history.append(cached.slots, out.token_ids)
        return _to_host(out.token_ids, out.logprobs, out.top_ids, out.top_logprobs, cached.batch)

    def release(self, seq_ids: Iterable[int]) -> None:
        """Forget the histories of sequences that ended."""
        self._history.release(seq_ids)

    @property
    def num_histories(self) -> int:
        return self._history.num_sequences


def _to_host(
    token_ids: torch.Tensor,
    logprobs: torch.Tensor,
    top_ids: torch.Tensor | None,
    top_logprobs: torch.Tensor | None,
    batch: SamplingBatch,
) -> SampledTokens:
    columns = [token_ids.to(torch.float64)[:, None], logprobs.to(torch.float64)[:, None]]
    if top_ids is not None and top_logprobs is not None:
        columns += [top_ids.to(torch.float64), top_logprobs.to(torch.float64)]
    rows = torch.cat(columns, dim=1).tolist()  # the one device-to-host copy of this forward
    width = batch.max_top_n
    top_tokens = [
        [(int(i), lp) for i, lp in zip(row[2 : 2 + n], row[2 + width : 2 + width + n], strict=True)]
        for row, n in zip(rows, batch.top_n, strict=True)
    ]
    return SampledTokens([int(row[0]) for row in rows], [row[1] for row in rows], top_tokens)
