"""Stop criteria of one sequence: EOS, length and stop sequences, as TGI applies them."""

from __future__ import annotations

from tgi.router.request import FinishReason, StoppingParams

__all__ = ["StopChecker"]

# Generated text kept for matching stop sequences; TGI keeps the same amount.
_TAIL_CHARS = 300


class StopChecker:
    """Decides after each token whether the sequence is finished, and why."""

    __slots__ = ("_eos_ids", "_generated", "_params", "_tail")

    def __init__(self, params: StoppingParams, eos_token_ids: frozenset[int]) -> None:
        self._params = params
        self._eos_ids = frozenset() if params.ignore_eos else eos_token_ids
        self._generated = 0
        self._tail = ""

    def check(self, token_id: int, text: str) -> FinishReason | None:
        """Record one token and its text delta; return why to stop, or None."""
        self._generated += 1
        if token_id in self._eos_ids:
            return FinishReason.EOS_TOKEN
        if self._params.stop_sequences and text:
            self._tail = (self._tail + text)[-_TAIL_CHARS:]
            if any(self._tail.endswith(stop) for stop in self._params.stop_sequences):
                return FinishReason.STOP_SEQUENCE
        if self._generated >= self._params.max_new_tokens:
            return FinishReason.LENGTH
        return None
