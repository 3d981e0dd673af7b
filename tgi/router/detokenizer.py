"""Incremental detokenization that never emits half a UTF-8 character.

NOTE: decoding one token alone loses context (SentencePiece's leading spaces, byte
fallback pieces that only form a character together). Each step decodes a small
window before the new tokens (`prefix_offset`..`read_offset`) and the window plus the
new tokens, and emits the difference; while the text ends in U+FFFD (an incomplete
character) it emits nothing and keeps the tokens for the next step.
"""

from __future__ import annotations

from typing import Protocol

__all__ = ["IncrementalDetokenizer", "TextDecoder"]

# Tokens of prompt context kept before the first generated token.
_CONTEXT_TOKENS = 5


class TextDecoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str: ...


class IncrementalDetokenizer:
    """Turns one sequence's tokens into text deltas, one call per generated token."""

    __slots__ = ("_ids", "_prefix_offset", "_read_offset", "_tokenizer")

    def __init__(self, tokenizer: TextDecoder, prompt_ids: tuple[int, ...]) -> None:
        self._tokenizer = tokenizer
        self._ids = list(prompt_ids[-_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)
        self._prefix_offset = 0

    def push(self, token_id: int) -> str:
        """Add a token; return the text it completes ("" while a character is pending)."""
        self._ids.append(token_id)
        window = self._ids[self._prefix_offset :]
        prefix_text = self._tokenizer.decode(
            self._ids[self._prefix_offset : self._read_offset], skip_special_tokens=False
        )
        full_text = self._tokenizer.decode(window, skip_special_tokens=False)
        if len(full_text) <= len(prefix_text) or full_text.endswith("\ufffd"):
            return ""
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        # Keep the window short: drop tokens the next decode no longer needs.
        if self._prefix_offset > _CONTEXT_TOKENS:
            del self._ids[: self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return full_text[len(prefix_text) :]
