"""A fixed pool of KV blocks: free list, reference counts and the prefix cache's LRU.

NOTE: the states of a block, each O(1) to enter and leave:

    free       on the free list, content meaningless            ref == 0, no key
    owned      in one or more block tables                       ref >= 1
    cached     ref == 0 but keyed by a prefix hash; its content  in the LRU
               is still valid and a new sequence may take it
               (ref 0 -> 1) instead of recomputing it

`allocate` takes from the free list first and evicts the least recently used cached
block only when the free list is empty, so cached prefixes live as long as possible.
A block is keyed (`register`) only once it is full and its KV has been written; a keyed
block is never written again while keyed (sequences write only past their shared
prefix), so sharing it is safe. A block that gets a key while owned keeps its key; when
its last owner lets go it moves to the LRU instead of the free list.
"""

from __future__ import annotations

from collections import OrderedDict, deque

__all__ = ["BlockPool", "NoFreeBlocks"]


class NoFreeBlocks(RuntimeError):
    """Raised by `allocate` when every block is owned (nothing free, nothing evictable)."""


class BlockPool:
    """Blocks `0 .. num_blocks-1` of `block_size` token slots each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"a block pool needs positive sizes, got {num_blocks}x{block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._ref = [0] * num_blocks
        self._key_of: list[int | None] = [None] * num_blocks
        # key -> (block, parent key, token ids): the cache's index, owned or not
        self._cached: dict[int, tuple[int, int, tuple[int, ...]]] = {}
        self._lru: OrderedDict[int, None] = OrderedDict()  # cached blocks with ref 0
        self.evictions = 0

    # ---- counts ----------------------------------------------------------------

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_evictable(self) -> int:
        return len(self._lru)

    @property
    def num_available(self) -> int:
        """Blocks `allocate` can hand out now: free plus evictable."""
        return len(self._free) + len(self._lru)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_available

    def ref_count(self, block: int) -> int:
        return self._ref[block]

    def is_cached(self, block: int) -> bool:
        return self._key_of[block] is not None

    def free_blocks(self) -> frozenset[int]:
        return frozenset(self._free)

    def evictable_blocks(self) -> frozenset[int]:
        return frozenset(self._lru)

    # ---- ownership -------------------------------------------------------------

    def allocate(self) -> int:
        """A block for one new owner (ref 1); evicts the LRU cached block if needed."""
        if self._free:
            block = self._free.popleft()
        elif self._lru:
            block, _ = self._lru.popitem(last=False)
            self._forget(block)
            self.evictions += 1
        else:
            raise NoFreeBlocks(f"all {self.num_blocks} KV blocks are in use")
        self._ref[block] = 1
        return block

    def share(self, block: int) -> None:
        """One more owner of a cached block (a prefix-cache hit)."""
        if self._ref[block] == 0:
            if self._key_of[block] is None:
                raise ValueError(f"block {block} is free; only cached blocks can be shared")
            del self._lru[block]
        self._ref[block] += 1

    def release(self, block: int) -> None:
        """One owner fewer; at zero a cached block joins the LRU, any other is freed."""
        ref = self._ref[block]
        if ref <= 0:
            raise ValueError(f"block {block} released more often than it was taken")
        self._ref[block] = ref - 1
        if ref > 1:
            return
        if self._key_of[block] is not None:
            self._lru[block] = None  # most recently used end
        else:
            self._free.append(block)

    # ---- the prefix cache --------------------------------------------------------

    def lookup(self, key: int, parent: int, tokens: tuple[int, ...]) -> int | None:
        """The cached block holding `tokens` after the prefix `parent`, if any."""
        entry = self._cached.get(key)
        if entry is None or entry[1] != parent or entry[2] != tokens:
            return None
        return entry[0]

    def register(self, block: int, key: int, parent: int, tokens: tuple[int, ...]) -> bool:
        """Key an owned, full, written block; False when the key has a block already
        (the same prefix computed twice at once: the second copy stays private)."""
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is not owned; only written blocks can be keyed")
        if key in self._cached or self._key_of[block] is not None:
            return False
        self._cached[key] = (block, parent, tokens)
        self._key_of[block] = key
        return True

    def _forget(self, block: int) -> None:
        key = self._key_of[block]
        if key is not None:
            del self._cached[key]
            self._key_of[block] = None
