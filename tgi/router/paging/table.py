"""One sequence's block table: the blocks holding its positions, in order."""

from __future__ import annotations

from dataclasses import dataclass, field

from tgi.router.paging.pool import BlockPool

__all__ = ["BlockTable"]


@dataclass(slots=True)
class BlockTable:
    """Position `p` lives in `blocks[p // block_size]`. The first `num_shared` blocks
    came from the prefix cache (read-only); the rest this sequence allocated."""

    blocks: list[int] = field(default_factory=list)
    num_shared: int = 0

    def capacity(self, block_size: int) -> int:
        return len(self.blocks) * block_size

    def blocks_needed(self, num_tokens: int, block_size: int) -> int:
        """New blocks to cover `num_tokens` positions."""
        return max(0, -(-num_tokens // block_size) - len(self.blocks))

    def grow(self, pool: BlockPool, num_tokens: int) -> None:
        """Allocate blocks until `num_tokens` positions are covered (NoFreeBlocks if not)."""
        for _ in range(self.blocks_needed(num_tokens, pool.block_size)):
            self.blocks.append(pool.allocate())

    def free(self, pool: BlockPool) -> None:
        """Give every block back (shared ones drop a reference; cached ones stay cached)."""
        for block in reversed(self.blocks):  # tail first: the LRU evicts suffixes first
            pool.release(block)
        self.blocks.clear()
        self.num_shared = 0
