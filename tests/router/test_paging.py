"""The router's block pool, block tables and prefix-cache keys (pure Python)."""

from __future__ import annotations

import pytest

from tgi.router.paging import BlockPool, BlockTable, NoFreeBlocks, block_hashes
from tgi.router.paging.prefix import ROOT, chain
from tgi.testing.paged import check_blocks


def test_allocate_and_release_keep_ref_counts() -> None:
    pool = BlockPool(4, 2)
    a, b = pool.allocate(), pool.allocate()
    assert (a, b) == (0, 1) and pool.num_free == 2 and pool.num_used == 2
    assert pool.ref_count(a) == 1
    pool.release(a)
    assert pool.ref_count(a) == 0 and pool.num_free == 3
    with pytest.raises(ValueError, match="released more often"):
        pool.release(a)
    with pytest.raises(ValueError, match="only cached blocks"):
        pool.share(a)
    check_blocks(pool, {1: (b,)}, {})


def test_pool_runs_out_and_refuses() -> None:
    pool = BlockPool(2, 4)
    pool.allocate(), pool.allocate()
    with pytest.raises(NoFreeBlocks):
        pool.allocate()


def test_cached_blocks_survive_release_and_are_evicted_lru_only_when_needed() -> None:
    pool = BlockPool(3, 2)
    blocks = [pool.allocate() for _ in range(3)]
    keys = block_hashes([1, 2, 3, 4, 5, 6], 2)
    parents = [ROOT, *keys[:-1]]
    chunks = [(1, 2), (3, 4), (5, 6)]
    for block, key, parent, tokens in zip(blocks, keys, parents, chunks, strict=True):
        assert pool.register(block, key, parent, tokens)
    for block in (blocks[1], blocks[0], blocks[2]):  # released in this order: LRU 1, 0, 2
        pool.release(block)
    assert pool.num_free == 0 and pool.num_evictable == 3 and pool.num_available == 3
    assert pool.lookup(keys[0], ROOT, (1, 2)) == blocks[0]
    assert pool.lookup(keys[0], ROOT, (9, 9)) is None  # same key, other tokens: a miss
    pool.share(blocks[0])  # a hit revives it: no longer evictable
    assert pool.num_evictable == 2 and pool.ref_count(blocks[0]) == 1
    assert pool.allocate() == blocks[1]  # least recently used first
    assert pool.lookup(keys[1], keys[0], (3, 4)) is None  # evicted: its key is gone
    assert pool.evictions == 1
    check_blocks(pool, {7: (blocks[0],), 8: (blocks[1],)}, {7: 1})


def test_register_refuses_duplicates_and_unowned_blocks() -> None:
    pool = BlockPool(3, 2)
    a, b = pool.allocate(), pool.allocate()
    key = chain(ROOT, (1, 2))
    assert pool.register(a, key, ROOT, (1, 2))
    assert not pool.register(b, key, ROOT, (1, 2))  # computed twice: b stays private
    pool.release(b)
    assert b in pool.free_blocks()
    with pytest.raises(ValueError, match="not owned"):
        pool.register(b, chain(ROOT, (3, 4)), ROOT, (3, 4))


def test_block_hashes_chain_the_whole_prefix() -> None:
    first = block_hashes([1, 2, 3, 4, 5], 2)
    second = block_hashes([9, 9, 3, 4], 2)
    assert len(first) == 2 and len(second) == 2  # partial blocks are never keyed
    assert first[1] != second[1]  # same tokens in block 1, different prefix
    assert first == block_hashes([1, 2, 3, 4, 7], 2)
    assert block_hashes([1, 2, 3, 4], 2, limit=1) == first[:1]


def test_block_table_grows_lazily_and_frees_everything() -> None:
    pool = BlockPool(8, 4)
    table = BlockTable()
    assert table.blocks_needed(1, 4) == 1 and table.blocks_needed(0, 4) == 0
    table.grow(pool, 5)
    assert len(table.blocks) == 2 and table.capacity(4) == 8
    table.grow(pool, 8)
    assert len(table.blocks) == 2
    table.grow(pool, 9)
    assert len(table.blocks) == 3
    table.free(pool)
    assert pool.num_free == 8 and not table.blocks
    check_blocks(pool, {}, {})


def test_check_blocks_catches_a_block_with_two_writers() -> None:
    pool = BlockPool(2, 2)
    a = pool.allocate()
    pool.register(a, chain(ROOT, (1, 2)), ROOT, (1, 2))
    pool.share(a)
    check_blocks(pool, {1: (a,), 2: (a,)}, {1: 1, 2: 1})
    with pytest.raises(AssertionError, match="may write block"):
        check_blocks(pool, {1: (a,), 2: (a,)}, {1: 1, 2: 0})
    with pytest.raises(AssertionError, match="ref count"):
        check_blocks(pool, {1: (a,)}, {1: 1})
