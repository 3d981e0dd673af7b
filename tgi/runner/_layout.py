"""The device-neutral layout of one step: tokens, positions and pool slots of every row.

NOTE: every row of a step (first chunks, later chunks, decode rows with drafts) is
flattened into one batch of N tokens, rows in plan order:

    rows      seq 4: chunk of 3 at 16    seq 9: decode + 1 draft at 40    seq 2: decode at 7
    tokens    [a b c | d e | f]          N = 6, R = 3
    row_of    [0 0 0   1 1   2]          t_of [0 1 2  0 1  0]
    positions [16 17 18  40 41  7]       slots: table[row, pos // bs] * bs + pos % bs

Host work per step is O(rows) Python plus O(tokens) tensor ops; block tables are read
from the runner's persistent `BlockTables`, never rebuilt from a whole table. A step
whose rows each bring one token (the commonest: decode) takes a short path of three
small tensors built from plain lists.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from tgi.runner._kv import BlockTables

__all__ = ["StepLayout", "StepRows", "build_step"]


@dataclass(slots=True)
class StepRows:
    """A step's rows in forward order, as parallel lists (no object per row)."""

    seq_ids: list[int] = field(default_factory=list)  # [R]
    starts: list[int] = field(default_factory=list)  # [R] tokens of the row already in KV
    counts: list[int] = field(default_factory=list)  # [R] tokens the row computes
    token_ids: list[int] = field(default_factory=list)  # [N] every row's tokens, flattened

    def append(self, seq_id: int, start: int, token_ids: Sequence[int]) -> None:
        self.seq_ids.append(seq_id)
        self.starts.append(start)
        self.counts.append(len(token_ids))
        self.token_ids.extend(token_ids)


@dataclass(slots=True)
class StepLayout:
    """What every attention backend reads to plan a step: built once, shared by layers."""

    rows: StepRows
    tables: BlockTables  # each row's block table: `blocks(seq_id)`, `tensor`
    block_size: int
    one_token: bool  # every row computes one token: token i is row i at offset 0
    max_queries: int  # T_max: the longest row
    max_keys: int  # L_max: the largest start + count
    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N] absolute position of each token in its sequence
    slots: torch.Tensor  # [N] pool slot each token's k/v goes to
    row_of: torch.Tensor | None = None  # [N] row of each token; None: one_token
    t_of: torch.Tensor | None = None  # [N] offset of each token within its row

    @property
    def num_rows(self) -> int:
        return len(self.rows.seq_ids)

    def token_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row_of [N], t_of [N]), made on demand for a one-token step."""
        if self.row_of is not None and self.t_of is not None:
            return self.row_of, self.t_of
        num_rows = self.num_rows
        return torch.arange(num_rows), torch.zeros(num_rows, dtype=torch.long)

    def table_rows(self) -> torch.Tensor:
        """[R] row of `tables.tensor` holding each step row's table."""
        return torch.tensor([self.tables.row(s) for s in self.rows.seq_ids], dtype=torch.long)

    def block_table(self) -> torch.Tensor:
        """[R, ceil(L_max / block_size)] the step rows' block tables (columns past a
        row's own table hold stale ids: read only what its length covers)."""
        num_blocks = -(-self.max_keys // self.block_size)
        tensor = self.tables.tensor
        if num_blocks > tensor.shape[1]:  # only a table past its own length reads that far
            raise IndexError(f"a row reads {num_blocks} blocks; tables hold {tensor.shape[1]}")
        return tensor[self.table_rows(), :num_blocks]


def build_step(rows: StepRows, tables: BlockTables, block_size: int) -> StepLayout:
    """The layout of `rows`, whose tables `tables` holds; O(rows) Python, O(tokens) ops."""
    if len(rows.token_ids) == len(rows.seq_ids):
        return _one_token_rows(rows, tables, block_size)
    return _any_rows(rows, tables, block_size)


def _one_token_rows(rows: StepRows, tables: BlockTables, block_size: int) -> StepLayout:
    """`build_step` for the commonest step: one token per row. Plain lists and three small
    tensors instead of the general path's dozen ops, which a one-stream decode pays per
    token."""
    starts = rows.starts
    slots = [
        tables.blocks(seq_id)[p // block_size] * block_size + p % block_size
        for seq_id, p in zip(rows.seq_ids, starts, strict=True)
    ]
    return StepLayout(
        rows=rows,
        tables=tables,
        block_size=block_size,
        one_token=True,
        max_queries=1,
        max_keys=max(starts) + 1,
        input_ids=torch.tensor(rows.token_ids, dtype=torch.long),
        positions=torch.tensor(starts, dtype=torch.long),
        slots=torch.tensor(slots, dtype=torch.long),
    )


def _any_rows(rows: StepRows, tables: BlockTables, block_size: int) -> StepLayout:
    """`build_step` for any mix of rows: chunks, drafts, one-token rows."""
    counts = rows.counts
    num_rows, num_tokens = len(counts), len(rows.token_ids)
    counts_t = torch.tensor(counts, dtype=torch.long)
    row_of = torch.arange(num_rows).repeat_interleave(counts_t, output_size=num_tokens)  # [N]
    first = torch.cumsum(counts_t, 0) - counts_t  # [R] flat index of each row's first token
    t_of = torch.arange(num_tokens) - first[row_of]  # [N]
    positions = torch.tensor(rows.starts, dtype=torch.long)[row_of] + t_of
    table_rows = torch.tensor([tables.row(s) for s in rows.seq_ids], dtype=torch.long)
    blocks = tables.tensor[table_rows[row_of], positions // block_size]  # [N]
    return StepLayout(
        rows=rows,
        tables=tables,
        block_size=block_size,
        one_token=num_rows == num_tokens,
        max_queries=max(counts),
        max_keys=max(s + n for s, n in zip(rows.starts, counts, strict=True)),
        input_ids=torch.tensor(rows.token_ids, dtype=torch.long),
        positions=positions,
        slots=blocks * block_size + positions % block_size,
        row_of=row_of,
        t_of=t_of,
    )
