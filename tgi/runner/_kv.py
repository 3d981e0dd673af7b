"""The paged KV pool and the block tables the runner keeps for each live sequence.

NOTE: addressing. The policy owns which block belongs to whom; the runner only keeps each
sequence's table (given whole once, then grown by appends) and turns positions into flat
pool slots. The pool of a layer is `[num_blocks * block_size, kv_heads, head_dim]`, so a
token at position p of a sequence with block table `bt` lives at slot
`bt[p // block_size] * block_size + p % block_size`:

    block table [7, 2, 9]          block_size 4, position 9 -> block 2 (id 9), offset 1
    pool slots  ... | 8  9 10 11 | ... | 28 29 30 31 | ... | 36 37 38 39 |
                      block 2            block 7             block 9 -> slot 37
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BlockTables", "KvPool"]


class KvPool:
    """Keys and values of every layer: `[num_blocks * block_size, kv_heads, head_dim]` each.

    Zero-filled once, so slots never written (padding reads) hold finite values; the
    runner never clears a block afterwards (shared prefix blocks must survive).
    """

    def __init__(
        self,
        num_layers: int,
        num_blocks: int,
        block_size: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str | None = None,
    ) -> None:
        shape = (num_blocks * block_size, num_kv_heads, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.dtype = num_blocks, block_size, dtype

    def slots(self, block_ids: Sequence[int], num_tokens: int) -> torch.Tensor:
        """[num_tokens] pool slots of positions 0..num_tokens-1 of a block table."""
        device = self.keys[0].device if self.keys else None
        pos = torch.arange(num_tokens, device=device)
        table = torch.tensor(list(block_ids), dtype=torch.long, device=device)
        return table[pos // self.block_size] * self.block_size + pos % self.block_size


class BlockTables:
    """Each live sequence's block table, kept across steps and grown by appends.

    NOTE: two views of the same tables, both updated in O(blocks appended), never
    rebuilt from a whole table:

    - `blocks(seq_id)`: a Python list, appended in place; host-side slot arithmetic of
      a few rows (the one-token layout) reads it;
    - `tensor`: `[rows, max_blocks]` long, a sequence owns row `row(seq_id)` from `add` to
      `remove`; kernels and the general layout index it. Appends are queued and written
      with one `index_put_` when the tensor is next read, so steps that never read it
      (the CPU's dense decode) pay only the list appends.

    - `device_tensor`: the same tensor on an accelerator (`device`), for its kernels; the
      queued appends reach it with the host's, so a step copies only the block ids
      appended since the last one, never a whole table.

    A freed row keeps its old ids until reused; readers only look at the columns a
    sequence's length covers. Rows and columns double when they run out.
    """

    def __init__(
        self,
        max_blocks: int,
        num_rows: int = 64,
        device: torch.device | str | None = None,
        *,
        mirror: bool | None = None,
    ) -> None:
        """`device`: where kernels read the tables; `mirror`: keep a second copy there
        (None: wherever `device` is not the CPU; True on the CPU tests the mirror)."""
        self._tensor = torch.zeros((max(num_rows, 1), max(max_blocks, 1)), dtype=torch.long)
        self._device = torch.device(device) if device is not None else torch.device("cpu")
        if mirror is None:
            mirror = self._device.type != "cpu"
        # the device's copy; None where `tensor` is the one kernels read
        self._mirror = self._tensor.to(self._device, copy=True) if mirror else None
        self._lists: dict[int, list[int]] = {}  # seq_id -> its block ids
        self._rows: dict[int, int] = {}  # seq_id -> its row of the tensor
        self._free_rows = list(range(self._tensor.shape[0] - 1, -1, -1))
        # (row, col) -> block id, written at the next read; a dict, so a row freed and
        # reused before then keeps only its new owner's ids (no index written twice)
        self._pending: dict[tuple[int, int], int] = {}

    def __contains__(self, seq_id: object) -> bool:
        return seq_id in self._lists

    def __len__(self) -> int:
        return len(self._lists)

    def add(self, seq_id: int, block_ids: Sequence[int]) -> None:
        """Start `seq_id`'s table with `block_ids` (replacing any it had)."""
        self.remove(seq_id)
        if not self._free_rows:
            self._grow(rows=2 * self._tensor.shape[0])
        self._rows[seq_id] = self._free_rows.pop()
        self._lists[seq_id] = []
        self.extend(seq_id, block_ids)

    def extend(self, seq_id: int, block_ids: Sequence[int]) -> None:
        """Append `block_ids` to `seq_id`'s table; KeyError when it holds none."""
        table = self._lists[seq_id]
        first = len(table)
        table.extend(block_ids)
        row = self._rows[seq_id]
        self._pending.update(((row, col), block) for col, block in enumerate(block_ids, first))

    def remove(self, seq_id: int) -> None:
        """Forget `seq_id`'s table; unknown ids are ignored."""
        if self._lists.pop(seq_id, None) is not None:
            self._free_rows.append(self._rows.pop(seq_id))

    def blocks(self, seq_id: int) -> list[int]:
        """`seq_id`'s block ids (the runner's own list: read it, do not change it)."""
        return self._lists[seq_id]

    def row(self, seq_id: int) -> int:
        """`seq_id`'s row of `tensor`."""
        return self._rows[seq_id]

    @property
    def tensor(self) -> torch.Tensor:
        """[rows, max_blocks] block ids, row `row(seq_id)` for each live sequence."""
        self._flush()
        return self._tensor

    @property
    def device_tensor(self) -> torch.Tensor:
        """`tensor` on the tables' device (the same tensor on the CPU)."""
        self._flush()
        return self._mirror if self._mirror is not None else self._tensor

    def _flush(self) -> None:
        """Write the queued appends: one `index_put_` here, one on the device."""
        if not self._pending:
            return
        # [n, 3] (row, col, block id): one tensor, so the device gets one copy
        writes = torch.tensor(
            [(row, col, block) for (row, col), block in self._pending.items()], dtype=torch.long
        )
        self._pending = {}
        widest = int(writes[:, 1].max())
        if widest >= self._tensor.shape[1]:
            self._grow(cols=max(2 * self._tensor.shape[1], widest + 1))
        self._tensor.index_put_((writes[:, 0], writes[:, 1]), writes[:, 2])
        if self._mirror is not None:
            if self._device.type == "cuda":  # pinned: the copy does not wait for the GPU
                writes = writes.pin_memory()
            on_device = writes.to(self._device, non_blocking=True)
            self._mirror.index_put_((on_device[:, 0], on_device[:, 1]), on_device[:, 2])

    def _grow(self, rows: int | None = None, cols: int | None = None) -> None:
        old_rows, old_cols = self._tensor.shape
        new_rows, new_cols = rows or old_rows, cols or old_cols
        grown = self._tensor.new_zeros((new_rows, new_cols))
        grown[:old_rows, :old_cols] = self._tensor
        self._tensor = grown
        if self._mirror is not None:
            mirror = self._mirror.new_zeros((new_rows, new_cols))
            mirror[:old_rows, :old_cols] = self._mirror
            self._mirror = mirror
        self._free_rows[:0] = range(new_rows - 1, old_rows - 1, -1)
