"""Chained hashes of block-aligned token chunks, the prefix cache's keys.

NOTE: a full block is keyed by `hash((parent_hash, its token ids))`, so a key names the
whole prefix up to and including that block, not only its own tokens: two prompts share
block i only if they agree on every token before it. Python's tuple hash of ints is
deterministic (no PYTHONHASHSEED), 64-bit; the pool also keeps each cached block's token
ids and parent key and compares them on lookup, so a hash collision cannot hand out
wrong KV (it only costs a miss).
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["ROOT", "block_hashes", "chain"]

ROOT = 0  # the parent key of a sequence's first block


def chain(parent: int, tokens: tuple[int, ...]) -> int:
    """The key of a full block whose prefix before it has key `parent`."""
    return hash((parent, tokens))


def block_hashes(tokens: Sequence[int], block_size: int, limit: int | None = None) -> list[int]:
    """Keys of the full blocks of `tokens` (at most `limit` of them), in order."""
    count = len(tokens) // block_size
    if limit is not None:
        count = min(count, limit)
    keys: list[int] = []
    parent = ROOT
    for index in range(count):
        parent = chain(parent, tuple(tokens[index * block_size : (index + 1) * block_size]))
        keys.append(parent)
    return keys
