"""N-gram speculation: draft tokens from a sequence's own history, and when to use them.

NOTE: `NgramIndex` finds the most recent earlier occurrence of the sequence's last n
tokens (n = `max_ngram` down to `min_ngram`) and proposes the tokens that followed it.
It costs no model: repetitive text (code, lists, quoting the prompt) gets drafts that a
verifier forward accepts several at a time; elsewhere the proposal is usually empty.

Exactness: a draft is verified by sampling each position from the logits the backend
returned for the same history, with the same step index the token would have had
without speculation (the noise is counter-based on `(seed, step, token id)`), and
accepted only while it equals what was sampled. That is identical to decoding one token
at a time exactly when sampling a row reads nothing but its logits and its step index,
so rows whose sampling reads their history (repetition/frequency penalty, watermark),
that return top-n tokens, or that carry a grammar are never given drafts
(`speculable`).

When it pays (`SpeculationGate`): a verifier forward costs about T tokens of compute per
row, which a large batch cannot absorb for free, and rejected drafts are pure cost. So
drafts are proposed only while the decode batch has at most `max_batch_size` rows and
the measured acceptance rate (accepted / proposed drafts, exponentially averaged) stays
at or above `min_acceptance`; below it speculation pauses for `cooldown_steps` steps and
then probes again with a fresh average.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from tgi.sampling.params import SamplingParams

__all__ = ["NgramIndex", "SpeculationGate", "propose", "speculable"]


def speculable(params: SamplingParams) -> bool:
    """Whether drafts for a row with these parameters keep its output exact."""
    return not params.needs_history and params.top_n_tokens == 0 and params.grammar is None


class NgramIndex:
    """A history's tokens with, for each n, where its tail n-gram last occurred before.

    Kept up to date token by token (`extend`), so proposing drafts each step costs a
    few dict lookups per row instead of a scan of the whole history.
    """

    def __init__(self, *, max_ngram: int = 3, min_ngram: int = 1) -> None:
        self.tokens: list[int] = []
        self._sizes = range(max_ngram, min_ngram - 1, -1)  # longest first
        self._last_end: dict[tuple[int, ...], int] = {}  # n-gram -> end of latest
        self._match: dict[int, int] = {}  # n -> end of the tail's earlier occurrence

    def extend(self, tokens: Iterable[int]) -> None:
        for token in tokens:
            self.tokens.append(token)
            end = len(self.tokens)
            for n in self._sizes:
                if end < n:
                    continue
                gram = tuple(self.tokens[end - n :])
                earlier = self._last_end.get(gram)
                if earlier is None:
                    self._match.pop(n, None)
                else:
                    self._match[n] = earlier
                self._last_end[gram] = end

    def propose(self, max_drafts: int) -> tuple[int, ...]:
        """Up to `max_drafts` tokens that followed the latest earlier occurrence of the
        tail's n-gram; longer n first."""
        if max_drafts <= 0:
            return ()
        for n in self._sizes:
            end = self._match.get(n)
            if end is not None:
                return tuple(self.tokens[end : end + max_drafts])
        return ()


def propose(
    history: Sequence[int], max_drafts: int, *, max_ngram: int = 3, min_ngram: int = 1
) -> tuple[int, ...]:
    """`NgramIndex.propose` for a whole history at once."""
    index = NgramIndex(max_ngram=max_ngram, min_ngram=min_ngram)
    index.extend(history)
    return index.propose(max_drafts)


@dataclass(slots=True)
class SpeculationGate:
    """Decides each step whether drafting is worth it; fed with each step's counts."""

    max_batch_size: int = 32
    min_acceptance: float = 0.3
    cooldown_steps: int = 64
    smoothing: float = 0.1  # weight of the newest step in the acceptance average
    acceptance: float = 1.0  # optimistic start: speculate until measured otherwise
    _paused_for: int = 0

    def open(self, batch_size: int) -> bool:
        """Whether to propose drafts for a decode batch of `batch_size` rows."""
        if self._paused_for > 0:
            self._paused_for -= 1
            if self._paused_for == 0:
                self.acceptance = 1.0  # probe again from scratch
            return False
        return batch_size <= self.max_batch_size

    def record(self, proposed: int, accepted: int) -> None:
        """One step's draft counts; pauses speculation when acceptance falls too low."""
        if proposed <= 0:
            return
        rate = accepted / proposed
        self.acceptance += self.smoothing * (rate - self.acceptance)
        if self.acceptance < self.min_acceptance:
            self._paused_for = self.cooldown_steps
