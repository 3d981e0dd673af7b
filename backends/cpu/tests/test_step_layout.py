"""The step layout: `tgi.runner`'s persistent block tables and `build_step`, and the CPU
attention's SDPA metadata; each one-token fast path against the general path it
short-cuts."""

from __future__ import annotations

import random

import pytest
import torch
from tgi_backend_cpu import _paged_attention as cpu
from tgi_backend_cpu._paged_attention import StepMetadata, plan_step

from tgi.runner import BlockTables, StepLayout, StepRows, build_step
from tgi.runner import _layout as layout_module

BLOCK = 4


def _random_step(
    rng: random.Random, num_rows: int, equal: bool, tokens: int = 1
) -> tuple[StepRows, BlockTables]:
    """`num_rows` rows of `tokens` tokens each, tables of random blocks covering them."""
    tables = BlockTables(max_blocks=4, num_rows=2)  # small: rows and columns must grow
    rows = StepRows()
    start = rng.randrange(0, 40)
    for seq_id in range(num_rows):
        position = start if equal else rng.randrange(0, 40)
        blocks = rng.sample(range(200), (position + tokens - 1) // BLOCK + 1)
        tables.add(100 + seq_id, blocks[:2])
        tables.extend(100 + seq_id, blocks[2:])
        rows.append(100 + seq_id, position, [rng.randrange(1000) for _ in range(tokens)])
    return rows, tables


def _same_layout(a: StepLayout, b: StepLayout) -> None:
    assert (a.max_queries, a.max_keys, a.num_rows) == (b.max_queries, b.max_keys, b.num_rows)
    for name in ("input_ids", "positions", "slots"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for x, y in zip(a.token_rows(), b.token_rows(), strict=True):
        assert torch.equal(x, y)


def _same_metadata(a: StepMetadata, b: StepMetadata) -> None:
    assert (a.num_rows, a.max_queries, a.max_keys) == (b.num_rows, b.max_queries, b.max_keys)
    assert torch.equal(a.slots, b.slots)
    assert a.query_index is None and b.query_index is None
    assert a.dense_rows is None and b.dense_rows is None
    assert a.dense_slots is not None and b.dense_slots is not None
    assert torch.equal(a.dense_slots, b.dense_slots)
    assert a.masks.keys() == b.masks.keys()
    for window, mask in a.masks.items():
        other = b.masks[window]
        assert (mask is None) == (other is None), window
        if mask is not None and other is not None:
            assert torch.equal(mask, other), window


@pytest.mark.parametrize("seed", range(40))
def test_one_token_layout_matches_the_general_layout(seed: int) -> None:
    rng = random.Random(seed)
    rows, tables = _random_step(rng, rng.randrange(1, 6), equal=seed % 3 == 0)
    fast = layout_module._one_token_rows(rows, tables, BLOCK)
    general = layout_module._any_rows(rows, tables, BLOCK)
    _same_layout(fast, general)
    for i, (seq_id, position) in enumerate(zip(rows.seq_ids, rows.starts, strict=True)):
        table = tables.blocks(seq_id)
        assert int(fast.slots[i]) == table[position // BLOCK] * BLOCK + position % BLOCK


@pytest.mark.parametrize("seed", range(40))
def test_one_token_metadata_matches_the_general_metadata(seed: int) -> None:
    rng = random.Random(seed)
    rows, tables = _random_step(rng, rng.randrange(1, 6), equal=seed % 3 == 0)
    windows = rng.choice([(None,), (None, 8), (3, None, 50)])
    layout = build_step(rows, tables, BLOCK)
    dense = (list(range(layout.num_rows)), 64)
    fast = cpu._one_token_rows(layout, windows, dense[1])
    general = cpu._any_rows(layout, windows, dense)
    _same_metadata(fast, general)


def test_general_layout_of_mixed_rows() -> None:
    tables = BlockTables(max_blocks=2)
    tables.add(7, [5, 1])
    tables.add(8, [3])
    tables.extend(8, [9])
    rows = StepRows()
    rows.append(7, 3, [11, 12, 13])  # positions 3, 4, 5: blocks 5, 1, 1
    rows.append(8, 4, [14])  # position 4: block 9
    layout = build_step(rows, tables, BLOCK)
    assert not layout.one_token and (layout.max_queries, layout.max_keys) == (3, 6)
    assert layout.input_ids.tolist() == [11, 12, 13, 14]
    assert layout.positions.tolist() == [3, 4, 5, 4]
    assert layout.slots.tolist() == [5 * 4 + 3, 1 * 4 + 0, 1 * 4 + 1, 9 * 4 + 0]
    assert layout.block_table().tolist() == [[5, 1], [3, 9]]


def test_plan_step_takes_the_fast_path_only_where_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    taken: list[int] = []
    fast = cpu._one_token_rows
    monkeypatch.setattr(
        cpu,
        "_one_token_rows",
        lambda layout, *args: taken.append(layout.num_rows) or fast(layout, *args),
    )
    tables = BlockTables(max_blocks=4)
    tables.add(1, [0, 1])
    tables.add(2, [2, 3])
    rows = StepRows()
    rows.append(1, 5, [1])
    rows.append(2, 7, [2])
    layout = build_step(rows, tables, BLOCK)
    assert layout.one_token
    assert plan_step(layout, (None,), ([0, 1], 16)).key_slots is None
    # rows out of dense order, or no dense rows at all: the general path decides
    assert plan_step(layout, (None,), ([1, 0], 16)).query_index is not None
    assert plan_step(layout, (None,), None).key_slots is not None
    assert taken == [2]  # only the in-order dense step; a two-token row never takes it
    two = StepRows()
    two.append(1, 5, [1, 2])
    plan_step(build_step(two, tables, BLOCK), (None,), ([0], 16))
    assert taken == [2]


def test_block_tables_grow_by_appends_and_reuse_rows() -> None:
    tables = BlockTables(max_blocks=2, num_rows=1)
    tables.add(1, [4])
    tables.extend(1, [6, 8])  # past max_blocks: columns double
    tables.add(2, [9])  # past num_rows: rows double
    assert tables.blocks(1) == [4, 6, 8] and tables.blocks(2) == [9]
    tensor = tables.tensor
    assert tensor[tables.row(1), :3].tolist() == [4, 6, 8]
    assert tensor[tables.row(2), :1].tolist() == [9]
    row = tables.row(1)
    tables.remove(1)
    tables.remove(1)  # unknown ids are ignored
    assert 1 not in tables and len(tables) == 1
    tables.add(3, [2])
    assert tables.row(3) == row  # a freed row is reused
    assert tables.tensor[row, :1].tolist() == [2]
    with pytest.raises(KeyError):
        tables.extend(1, [5])


def test_a_one_token_step_never_reads_the_table_tensor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Steady-state decode: slots come from the per-sequence lists; no table is turned
    into a tensor, so the step's cost does not grow with the tables' length."""
    tables = BlockTables(max_blocks=128)
    rows = StepRows()
    for seq_id in range(8):
        tables.add(seq_id, list(range(seq_id * 128, (seq_id + 1) * 128)))
        rows.append(seq_id, 2000 + seq_id, [seq_id])
    read: list[int] = []
    real = BlockTables.tensor
    monkeypatch.setattr(
        BlockTables, "tensor", property(lambda self: read.append(1) or real.fget(self))
    )
    layout = build_step(rows, tables, 16)
    plan_step(layout, (None,), (list(range(8)), 2048))
    assert read == []
    assert layout.slots.tolist() == [
        (s * 128 + (2000 + s) // 16) * 16 + (2000 + s) % 16 for s in range(8)
    ]


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("dense", [True, False], ids=["dense", "gathered"])
def test_a_mixed_steps_split_attention_equals_the_padded_one(
    seed: int, dense: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One-token rows beside a long chunk attend apart (`SplitMetadata`); the outputs and
    the KV written are those of the one padded SDPA batch."""
    rng = random.Random(seed)
    tables = BlockTables(max_blocks=8, num_rows=4)
    rows = StepRows()
    kinds = [1] * rng.randrange(1, 5) + [rng.randrange(8, 20)] + [1] * rng.randrange(0, 3)
    free = rng.sample(range(64), 64)  # no two sequences share a block
    for seq_id, count in enumerate(kinds):
        start = rng.randrange(0, 12)
        num_blocks = (start + count - 1) // BLOCK + 1
        blocks, free = free[:num_blocks], free[num_blocks:]
        tables.add(seq_id, blocks)
        rows.append(seq_id, start, [rng.randrange(100) for _ in range(count)])
    layout = build_step(rows, tables, BLOCK)
    n, heads, kv_heads, dim = len(rows.token_ids), 4, 2, 8
    q, k, v = (torch.randn(n, h, dim) for h in (heads, kv_heads, kv_heads))
    windows = rng.choice([(None,), (6,)])

    def run(split: bool) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(cpu, "SPLIT_MIN_QUERIES", 8 if split else 10_000)
        torch.manual_seed(seed)
        pool = cpu.KvPool(1, 64, BLOCK, kv_heads, dim, torch.float32)
        pool.keys[0].normal_()  # cached prefixes: whatever the blocks already hold
        pool.values[0].normal_()
        rows_cache = cpu.DenseRows(pool, 64, 1 << 30) if dense else None
        attention = cpu.CpuPagedAttention(pool, windows, rows_cache)
        metadata = attention.plan(layout)
        assert isinstance(metadata, cpu.SplitMetadata) == split
        return attention(0, q, k, v, metadata), pool.keys[0].clone()

    split_out, split_keys = run(split=True)
    padded_out, padded_keys = run(split=False)
    torch.testing.assert_close(split_out, padded_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(split_keys, padded_keys)


def test_a_row_freed_and_reused_before_the_next_read_holds_only_its_new_table() -> None:
    tables = BlockTables(max_blocks=4, num_rows=1)
    tables.add(1, [5, 6, 7])
    tables.remove(1)
    tables.add(2, [9])  # the same row, before anything read the tensor
    row = tables.row(2)
    assert tables.tensor[row, 0].item() == 9
    tables.extend(2, [3])
    assert tables.tensor[row, :2].tolist() == [9, 3]


@pytest.mark.parametrize("seed", range(6))
def test_the_device_copy_of_the_tables_follows_every_change(seed: int) -> None:
    """`device_tensor` (a GPU's copy, mirrored on the CPU here) gets the same appends as
    the host tensor, through adds, extends, removals, reused rows and grown tables."""
    rng = random.Random(seed)
    tables = BlockTables(max_blocks=2, num_rows=1, mirror=True)
    assert tables.device_tensor is not tables.tensor
    live: dict[int, list[int]] = {}
    for step in range(60):
        action = rng.random()
        if action < 0.3 or not live:
            seq_id = step
            live[seq_id] = rng.sample(range(500), rng.randrange(1, 4))
            tables.add(seq_id, live[seq_id])
        elif action < 0.8:
            seq_id = rng.choice(list(live))
            more = rng.sample(range(500), rng.randrange(1, 3))
            live[seq_id].extend(more)
            tables.extend(seq_id, more)
        else:
            tables.remove(live.popitem()[0])
        if rng.random() < 0.5:  # reads come at random points between changes
            assert torch.equal(tables.device_tensor, tables.tensor)
            for seq_id, blocks in live.items():
                row = tables.device_tensor[tables.row(seq_id), : len(blocks)]
                assert row.tolist() == blocks
