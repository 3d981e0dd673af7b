"""N-gram speculation: draft tokens from a sequence's own history, and when to use them.

NOTE: `propose` looks for the most recent earlier occurrence of the sequence's last n
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

from collections.abc import Sequence
from dataclasses import dataclass

from tgi.sampling.params import SamplingParams

__all__ = ["SpeculationGate", "propose", "speculable"]


def speculable(params: SamplingParams) -> bool:
    """Whether drafts for a row with these parameters keep its output exact."""
    return not params.needs_history and params.top_n_tokens == 0 and params.grammar is None


def propose(
    history: Sequence[int],
    max_drafts: int,
    *,
    max_ngram: int = 3,
    min_ngram: int = 1,
    window: int = 2048,
) -> tuple[int, ...]:
    """Up to `max_drafts` tokens that followed the latest earlier match of the history's
    last n tokens; longer n first. Searches the last `window` tokens only."""
    if max_drafts <= 0:
        return ()
    length = len(history)
    start = max(0, length - window)
    for n in range(max_ngram, min_ngram - 1, -1):
        if length <= n:
            continue
        tail = list(history[length - n :])
        # the most recent earlier occurrence: candidate ends before the tail itself
        for end in range(length - 1, start + n - 1, -1):
            if history[end - 1] != tail[-1] or list(history[end - n : end]) != tail:
                continue
            drafts = tuple(history[end : min(end + max_drafts, length)])
            if drafts:
                return drafts
    return ()


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
