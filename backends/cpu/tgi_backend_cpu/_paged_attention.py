"""The CPU's attention backend for `tgi.runner`: SDPA over a `KvPool`, with dense rows.

NOTE: a step writes its N new tokens into the pool with one `index_copy_` per layer (at
the slots `tgi.runner.build_step` computed). SDPA then needs each row's keys as one
padded `[R, KVH, L_max, D]` batch; on a CPU, copying them out of the scattered blocks
every layer of every step costs as much as the attention itself. So live sequences also
keep a dense copy (`DenseRows`: row r of `[R_cap, L_cap, KVH, D]` per layer), written
alongside the pool and read by SDPA in place:

- a decode step whose rows are dense rows 0..R-1 in order reads a strided view (no copy);
- rows in another order, or with holes, read all dense rows up to the highest one, with
  hole rows given a dummy query (cheap while at least half the rows take part); otherwise
  the step's rows are selected (one copy, as a prefill step of a few rows does);
- a sequence first seen with a cached prefix (start > 0) is filled from the pool once;
- when the dense copy would exceed its budget, the step gathers from the pool instead
  (one `index_select` per layer) and the step's rows leave the dense copy.

The mask is causal by absolute position (so chunked prefill, cached prefixes and T > 1
decode rows all work) and, per layer, limited to a sliding window. Padded keys are masked;
padded queries attend to key 0 only and their outputs are dropped.

With the compiled attention kernel (`_native`, bf16 and float32 models), every step skips SDPA and
the dense copy altogether: the kernel reads each row's keys in place through its block
table (`KernelMetadata`), and a row of several tokens (a prompt chunk, drafts) is one
query row per token, each seeing the keys up to its own position (causal by
construction; a 128-token prompt's attention takes about half of SDPA's time with a
mask).

A mixed step (contract v2: a new prompt's chunk next to decode rows) is still one forward
and one call of this op per layer, but its SDPA batch would pad every decode row to the
chunk's length: 32 decode rows beside a 128-token chunk computed 33 x 128 queries per
layer instead of 128 + 32 (`benchmarks/engine_step.py` timed such a step at 1322 ms
against 237 + 211 ms for the chunk and the decode rows apart, one run on 2 cores). So the SDPA
path splits such a step's attention in two groups, one-token rows and the others
(`SplitMetadata`), each planned as a step of its own; k/v are written to the pool once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import accumulate

import torch
import torch.nn.functional as F

from tgi.runner import KvPool, StepLayout, StepRows, build_step
from tgi_backend_cpu._layer_ops import CpuLayerOps
from tgi_backend_cpu._native import KERNEL_DTYPES, DecodeAttentionKernel

__all__ = [
    "CpuPagedAttention",
    "DenseRows",
    "KernelMetadata",
    "SplitMetadata",
    "StepMetadata",
    "plan_step",
]

# A chunk at least this long next to one-token rows gets its attention apart from theirs.
SPLIT_MIN_QUERIES = 8


@dataclass(frozen=True, slots=True)
class StepMetadata:
    """Index tensors of one step, shared by every layer."""

    num_rows: int  # R: rows of the SDPA batch (step rows, or dense rows with holes)
    max_queries: int  # T_max: longest row of new tokens
    max_keys: int  # L_max: longest row end (cached + new tokens)
    slots: torch.Tensor  # [N] pool slot of each new token
    query_index: torch.Tensor | None  # [N] flat token -> r * T_max + t; None: identity
    masks: dict[int | None, torch.Tensor | None]  # window -> [R, 1, T_max, L_max] bool
    # (True = attend), None where every key is visible
    key_slots: torch.Tensor | None = None  # gather path: [R * L_max] pool slot of key j
    dense_slots: torch.Tensor | None = None  # dense path: [N] dense slot of each new token
    dense_rows: torch.Tensor | None = None  # dense path: [R] rows to select; None: 0..R-1


@dataclass(frozen=True, slots=True)
class KernelMetadata:
    """A step of one-token rows for the compiled decode kernel: tables, not copies."""

    slots: torch.Tensor  # [R] pool slot of each row's new token
    tables: torch.Tensor  # [rows, max_blocks] the runner's block tables
    table_rows: torch.Tensor  # [R] each step row's row of `tables`
    seq_lens: torch.Tensor  # [R] keys of each row, its new one included
    max_len: int


def plan_kernel(layout: StepLayout) -> KernelMetadata:
    """`KernelMetadata` of any step: every token is a query row of its own that sees its
    sequence's keys up to its position, so a prompt chunk is causal by construction."""
    table_rows = layout.table_rows()
    if not layout.one_token:
        row_of, _ = layout.token_rows()
        table_rows = table_rows[row_of]
    return KernelMetadata(
        slots=layout.slots,
        tables=layout.tables.tensor,
        table_rows=table_rows,
        seq_lens=layout.positions + 1,
        max_len=layout.max_keys,
    )


@dataclass(frozen=True, slots=True)
class SplitMetadata:
    """A mixed step's SDPA attention as groups of rows, each with its own metadata."""

    slots: torch.Tensor  # [N] pool slot of each new token (written once, for all groups)
    parts: tuple[tuple[torch.Tensor, StepMetadata], ...]  # ([n] flat token index, metadata)


def plan_split(
    layout: StepLayout,
    windows: Sequence[int | None],
    dense: tuple[list[int], int] | None = None,
) -> StepMetadata | SplitMetadata:
    """`plan_step`, or one per group where one-token rows share the step with a chunk of
    at least SPLIT_MIN_QUERIES tokens (see the module NOTE)."""
    counts = layout.rows.counts
    if layout.one_token or 1 not in counts or max(counts) < SPLIT_MIN_QUERIES:
        return plan_step(layout, windows, dense)
    row_of, _ = layout.token_rows()
    single_token = torch.tensor(counts, dtype=torch.long)[row_of] == 1  # [N]
    firsts = list(accumulate(counts, initial=0))
    parts: list[tuple[torch.Tensor, StepMetadata]] = []
    for group, tokens in (
        ([i for i, n in enumerate(counts) if n == 1], single_token),
        ([i for i, n in enumerate(counts) if n != 1], ~single_token),
    ):
        sub = _sub_layout(layout, group, firsts)
        sub_dense = None if dense is None else ([dense[0][i] for i in group], dense[1])
        parts.append((tokens.nonzero().squeeze(1), plan_step(sub, windows, sub_dense)))
    return SplitMetadata(slots=layout.slots, parts=tuple(parts))


def _sub_layout(layout: StepLayout, group: Sequence[int], firsts: Sequence[int]) -> StepLayout:
    """The layout of some of `layout`'s rows, as if they were a step of their own
    (`firsts`: each row's first token in the flat step)."""
    rows = layout.rows
    sub = StepRows()
    for i in group:
        tokens = rows.token_ids[firsts[i] : firsts[i] + rows.counts[i]]
        sub.append(rows.seq_ids[i], rows.starts[i], tokens)
    return build_step(sub, layout.tables, layout.block_size)


def plan_step(
    layout: StepLayout,
    windows: Sequence[int | None],
    dense: tuple[list[int], int] | None = None,
) -> StepMetadata:
    """The SDPA metadata of `layout`. `dense`: (dense row of each step row, L_cap) to
    read keys from `DenseRows`; None gathers them from the pool."""
    if dense is not None and layout.one_token and dense[0] == list(range(layout.num_rows)):
        return _one_token_rows(layout, windows, dense[1])
    return _any_rows(layout, windows, dense)


def _one_token_rows(layout: StepLayout, windows: Sequence[int | None], cap: int) -> StepMetadata:
    """`plan_step` for the commonest step: one token per row, the rows in dense rows
    0..R-1 in order; a handful of small ops instead of the general path's two dozen."""
    starts = layout.rows.starts
    max_keys = layout.max_keys
    positions = layout.positions  # [R]
    full = min(starts) + 1 == max_keys
    return StepMetadata(
        num_rows=layout.num_rows,
        max_queries=1,
        max_keys=max_keys,
        slots=layout.slots,
        query_index=None,
        masks=_masks(positions[:, None], max_keys, windows, full=full),
        dense_slots=torch.arange(layout.num_rows) * cap + positions,
    )


def _any_rows(
    layout: StepLayout,
    windows: Sequence[int | None],
    dense: tuple[list[int], int] | None,
) -> StepMetadata:
    """`plan_step` for any mix of rows: chunks, drafts, holes, the gather path."""
    counts = layout.rows.counts
    row_of, t_of = layout.token_rows()
    positions = layout.positions
    num_steps, max_queries, max_keys = layout.num_rows, layout.max_queries, layout.max_keys
    # Which SDPA batch row each step row uses (see the module NOTE).
    batch_row = list(range(num_steps))
    num_rows, dense_rows, dense_slots = num_steps, None, None
    if dense is not None:
        rows_in_dense, cap = dense
        dense_t = torch.tensor(rows_in_dense, dtype=torch.long)
        dense_slots = dense_t[row_of] * cap + positions
        high = max(rows_in_dense) + 1
        if rows_in_dense == batch_row:
            pass
        elif 2 * num_steps >= high and min(counts) == max_queries:
            batch_row, num_rows = rows_in_dense, high
        else:
            dense_rows = dense_t
    batch_t = torch.tensor(batch_row, dtype=torch.long)
    query_index = batch_t[row_of] * max_queries + t_of  # [N]
    query_pos = torch.zeros(num_rows * max_queries, dtype=torch.long)
    query_pos[query_index] = positions
    query_pos = query_pos.view(num_rows, max_queries)  # padding and holes: position 0
    # One token per row, every row ending at L_max: every key is visible, no mask needed.
    ends = [start + n for start, n in zip(layout.rows.starts, counts, strict=True)]
    full = max_queries == 1 and min(ends) == max_keys and num_rows == num_steps
    identity = batch_row == list(range(num_steps)) and min(counts) == max_queries
    key_slots = None
    if dense is None:
        size = layout.block_size
        key_pos = torch.arange(max_keys)  # [L_max]
        table = layout.block_table()  # [R, blocks]
        key_slots = (table[:, key_pos // size] * size + key_pos % size).reshape(-1)
    return StepMetadata(
        num_rows=num_rows,
        max_queries=max_queries,
        max_keys=max_keys,
        slots=layout.slots,
        query_index=None if identity else query_index,
        masks=_masks(query_pos, max_keys, windows, full),
        key_slots=key_slots,
        dense_slots=dense_slots,
        dense_rows=dense_rows,
    )


def _masks(
    query_pos: torch.Tensor, max_keys: int, windows: Sequence[int | None], full: bool
) -> dict[int | None, torch.Tensor | None]:
    """Per window: [R, 1, T, L] bool (True = attend) from query positions [R, T]; None
    where `full` (every row sees all L keys) and the window does not cut in."""
    key_pos = torch.arange(max_keys)  # [L]
    masks: dict[int | None, torch.Tensor | None] = {}
    for window in set(windows):
        if full and (window is None or window >= max_keys):
            masks[window] = None
            continue
        causal = key_pos[None, None, :] <= query_pos[:, :, None]  # [R, T, L]
        if window is not None:
            causal = causal & (key_pos > query_pos[:, :, None] - window)
        masks[window] = causal[:, None]
    return masks


class DenseRows:
    """A dense copy of live sequences' KV, one row per sequence, for SDPA to read in place.

    Row r of layer l holds positions 0..n-1 of its sequence, where n is what the runner
    says the sequence holds; `assign` makes a step's rows present (filling a cached prefix
    from the pool) or answers None when they would not fit the byte budget.
    """

    def __init__(self, pool: KvPool, max_length: int, budget_bytes: int) -> None:
        self.pool = pool
        self.max_length = max_length
        self.budget_bytes = budget_bytes
        self.rows: dict[int, int] = {}  # seq_id -> dense row
        self.capacity_rows = self.capacity_length = 0
        self.keys: list[torch.Tensor] = []  # per layer [R_cap * L_cap, KVH, D]
        self.values: list[torch.Tensor] = []

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.rows.pop(seq_id, None)

    def assign(self, layout: StepLayout) -> tuple[list[int], int] | None:
        """Dense rows of the step's sequences and L_cap, or None (then they leave)."""
        seq_ids, starts = layout.rows.seq_ids, layout.rows.starts
        rows = self.rows
        fresh = [i for i, seq_id in enumerate(seq_ids) if seq_id not in rows]
        if not fresh and layout.max_keys <= self.capacity_length:  # steady-state decode
            return [rows[seq_id] for seq_id in seq_ids], self.capacity_length
        used = set(rows.values())
        free = (r for r in range(len(used) + len(fresh)) if r not in used)
        new_rows = {seq_ids[i]: next(free) for i in fresh}
        num_rows = max([*rows.values(), *new_rows.values()], default=-1) + 1
        if not self._fit(num_rows, layout.max_keys):
            self.release(seq_ids)
            return None
        rows.update(new_rows)
        for i in fresh:
            if starts[i] > 0:  # a cached prefix or an earlier chunk: copy it once
                self._fill(new_rows[seq_ids[i]], layout.tables.blocks(seq_ids[i]), starts[i])
        return [rows[seq_id] for seq_id in seq_ids], self.capacity_length

    def _fit(self, num_rows: int, length: int) -> bool:
        if num_rows <= self.capacity_rows and length <= self.capacity_length:
            return True
        new_rows = max(num_rows, min(2 * self.capacity_rows, num_rows + 8))
        new_length = min(max(length, 2 * self.capacity_length, 64), self.max_length)
        new_length = max(new_length, length)
        per_token = sum(t.element_size() * t[0].numel() for t in self.pool.keys) * 2
        if new_rows * new_length * per_token > self.budget_bytes:
            # the tightest growth (never a shrink: live rows are copied over) before giving up
            new_rows = max(num_rows, self.capacity_rows)
            new_length = max(length, self.capacity_length)
            if new_rows * new_length * per_token > self.budget_bytes:
                return False
        self._grow(new_rows, new_length)
        return True

    def _grow(self, num_rows: int, length: int) -> None:
        old_rows, old_length = self.capacity_rows, self.capacity_length
        for tensors, pool_tensors in ((self.keys, self.pool.keys), (self.values, self.pool.values)):
            for layer, pool_tensor in enumerate(pool_tensors):
                shape = (num_rows, length, *pool_tensor.shape[1:])
                grown = torch.zeros(shape, dtype=pool_tensor.dtype)
                if old_rows:
                    old = tensors[layer].view(old_rows, old_length, *pool_tensor.shape[1:])
                    grown[:old_rows, :old_length] = old
                    tensors[layer] = grown.view(num_rows * length, *pool_tensor.shape[1:])
                else:
                    tensors.append(grown.view(num_rows * length, *pool_tensor.shape[1:]))
        self.capacity_rows, self.capacity_length = num_rows, length

    def _fill(self, dense_row: int, block_ids: Sequence[int], num_tokens: int) -> None:
        source = self.pool.slots(block_ids, num_tokens)  # [num_tokens]
        first = dense_row * self.capacity_length
        for dense, pooled in ((self.keys, self.pool.keys), (self.values, self.pool.values)):
            for layer, pool_tensor in enumerate(pooled):
                dense[layer][first : first + num_tokens] = pool_tensor.index_select(0, source)


class CpuPagedAttention:
    """`tgi.runner.AttentionBackend` on the CPU: one SDPA call per layer over a `KvPool`."""

    def __init__(
        self,
        pool: KvPool,
        layer_windows: Sequence[int | None],
        dense: DenseRows | None = None,
        kernel: DecodeAttentionKernel | None = None,
        layer_ops: CpuLayerOps | None = None,
    ) -> None:
        """`kernel`: every step's attention runs it (bf16 and float32 pools); `dense` is
        then not read.
        `layer_ops`: its `write_kv` stores each step's k/v (one call, not two copies)."""
        if kernel is not None and pool.dtype not in KERNEL_DTYPES:
            raise ValueError(f"the decode kernel reads bf16 or float32 KV, not {pool.dtype}")
        self.pool = pool
        self.kernel = kernel
        self.layer_ops = layer_ops
        self.dense = dense if kernel is None else None
        self.layer_windows = tuple(layer_windows)
        self._capacity = 0  # slots the gather buffers hold
        self._buf_k = self._buf_v = torch.empty(0)

    def plan(self, layout: StepLayout) -> StepMetadata | KernelMetadata | SplitMetadata:
        """The compiled kernel's metadata for any step; without it, dense rows for the
        step's sequences (where they fit) and SDPA's (per group of rows for a mixed step)."""
        if self.kernel is not None:
            return plan_kernel(layout)
        dense = self.dense.assign(layout) if self.dense is not None else None
        return plan_split(layout, self.layer_windows, dense)

    def release(self, seq_ids: Sequence[int]) -> None:
        if self.dense is not None:
            self.dense.release(seq_ids)

    def __call__(
        self,
        layer_index: int,
        q: torch.Tensor,  # [N, H, D]
        k: torch.Tensor,  # [N, KVH, D]
        v: torch.Tensor,
        metadata: StepMetadata | KernelMetadata | SplitMetadata,
    ) -> torch.Tensor:  # [N, H, D]
        pool = self.pool
        pool_k, pool_v = pool.keys[layer_index], pool.values[layer_index]
        k, v = k.to(pool.dtype), v.to(pool.dtype)  # no copy when the dtypes agree
        if self.layer_ops is not None:
            self.layer_ops.write_kv(k, v, pool_k, pool_v, metadata.slots)
        else:
            pool_k.index_copy_(0, metadata.slots, k)
            pool_v.index_copy_(0, metadata.slots, v)
        if isinstance(metadata, SplitMetadata):
            out = torch.empty_like(q)
            for index, part in metadata.parts:
                # k/v are only read again where the dense rows take a copy of them
                if part.dense_slots is not None:
                    k_part, v_part = k.index_select(0, index), v.index_select(0, index)
                else:
                    k_part, v_part = k, v
                q_part = q.index_select(0, index)
                out.index_copy_(0, index, self._attend(layer_index, q_part, k_part, v_part, part))
            return out
        return self._attend(layer_index, q, k, v, metadata)

    def _attend(
        self,
        layer_index: int,
        q: torch.Tensor,  # [n, H, D]
        k: torch.Tensor,  # [n, KVH, D], already in the pool
        v: torch.Tensor,
        metadata: StepMetadata | KernelMetadata,
    ) -> torch.Tensor:  # [n, H, D]
        pool_k, pool_v = self.pool.keys[layer_index], self.pool.values[layer_index]
        if isinstance(metadata, KernelMetadata):
            assert self.kernel is not None  # only planned with a kernel
            return self.kernel(
                q,
                pool_k,
                pool_v,
                metadata.tables,
                metadata.table_rows,
                metadata.seq_lens,
                block_size=self.pool.block_size,
                scale=q.shape[-1] ** -0.5,
                window=self.layer_windows[layer_index],
                max_len=metadata.max_len,
            )
        if metadata.dense_slots is not None and self.dense is not None:
            key, value = self._dense_kv(layer_index, k, v, metadata)
        else:
            key, value = self._gathered_kv(pool_k, pool_v, metadata)
        rows, queries = metadata.num_rows, metadata.max_queries
        num_heads, head_dim = q.shape[1], q.shape[2]
        key, value = key.transpose(1, 2).to(q.dtype), value.transpose(1, 2).to(q.dtype)
        mask = metadata.masks[self.layer_windows[layer_index]]  # [R, 1, T, L] or None
        if queries == 1 and metadata.query_index is None:
            # One query per row (decode): each KV head's G query heads become G queries of
            # plain multi-head attention, [R, KVH, G, D]. Same math as enable_gqa (summed in
            # another order), and the CPU kernel runs it faster (SmolLM2 shapes, bf16, 256
            # keys: 19 vs 23 us).
            num_kv_heads = key.shape[1]
            query = q.view(rows, num_kv_heads, num_heads // num_kv_heads, head_dim)
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask)
            return out.reshape(rows, num_heads, head_dim)
        if metadata.query_index is not None:
            padded = q.new_zeros((rows * queries, num_heads, head_dim))
            q = padded.index_copy_(0, metadata.query_index, q)
        query = q.view(rows, queries, num_heads, head_dim).transpose(1, 2)  # [R, H, T, D]
        out = F.scaled_dot_product_attention(
            query, key, value, attn_mask=mask, enable_gqa=True
        )  # [R, H, T, D]
        out = out.transpose(1, 2).reshape(rows * queries, num_heads, head_dim)
        if metadata.query_index is not None:
            out = out.index_select(0, metadata.query_index)
        return out

    def _dense_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, metadata: StepMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[R, L_max, KVH, D] keys and values read from the dense rows."""
        dense = self.dense
        assert dense is not None and metadata.dense_slots is not None  # checked by the caller
        keys, values = dense.keys[layer], dense.values[layer]
        keys.index_copy_(0, metadata.dense_slots, k)
        values.index_copy_(0, metadata.dense_slots, v)
        shape = (dense.capacity_rows, dense.capacity_length, *k.shape[1:])
        length = metadata.max_keys
        keys, values = keys.view(shape)[:, :length], values.view(shape)[:, :length]
        if metadata.dense_rows is not None:
            rows = metadata.dense_rows
            return keys.index_select(0, rows), values.index_select(0, rows)
        return keys[: metadata.num_rows], values[: metadata.num_rows]

    def _gathered_kv(
        self, pool_k: torch.Tensor, pool_v: torch.Tensor, metadata: StepMetadata
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[R, L_max, KVH, D] keys and values gathered from the pool's blocks."""
        assert metadata.key_slots is not None  # plan_step sets it whenever dense is off
        shape = (metadata.num_rows, metadata.max_keys, *pool_k.shape[1:])
        needed = shape[0] * shape[1]
        if self._capacity < needed:
            self._capacity = max(needed, 2 * self._capacity)
            full = (self._capacity, *pool_k.shape[1:])
            self._buf_k = torch.empty(full, dtype=pool_k.dtype)
            self._buf_v = torch.empty(full, dtype=pool_k.dtype)
        # index_select into a reused buffer: a fresh tensor per layer costs page faults
        buf_k, buf_v = self._buf_k[:needed], self._buf_v[:needed]
        torch.index_select(pool_k, 0, metadata.key_slots, out=buf_k)
        torch.index_select(pool_v, 0, metadata.key_slots, out=buf_v)
        return buf_k.view(shape), buf_v.view(shape)
