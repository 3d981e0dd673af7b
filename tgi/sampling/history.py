"""Token histories on the device, for the processors that read them (penalties, watermark).

NOTE: only sequences whose parameters need their history get a slot, so plain requests
cost nothing. A slot holds the sequence's token counts (prompt + generated), its length
and its last token, in device tensors that grow by doubling:

    counts  [S, V] float32   how often each token id occurs in the sequence
    lengths [S]    float32   prompt + generated tokens so far
    last    [S]    int64     the newest token (the watermark's split key)

Slot 0 is a sink: rows without history point at it, so every update is one batched
`index_put_` over the whole batch, with no Python loop and no host sync per step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

__all__ = ["TokenHistory"]

_SINK = 0


class TokenHistory:
    """Per-sequence token counts; used from the engine thread only."""

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # [S, V]
        self._lengths: torch.Tensor | None = None  # [S]
        self._last: torch.Tensor | None = None  # [S]
        self._slot_of: dict[int, int] = {}  # seq_id -> slot
        self._free: list[int] = []

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self._slot_of

    @property
    def num_sequences(self) -> int:
        return len(self._slot_of)

    def start(
        self, seq_id: int, token_ids: Sequence[int], vocab_size: int, device: torch.device
    ) -> None:
        """(Re)start `seq_id`'s history from its prompt (a host-to-device copy, once)."""
        slot = self._slot_of.get(seq_id)
        if slot is None:
            slot = self._allocate(vocab_size, device)
            self._slot_of[seq_id] = slot
        counts, lengths, last = self._tensors()
        ids = torch.tensor(list(token_ids), dtype=torch.int64, device=device)  # [L]
        counts[slot].zero_()
        counts[slot].index_add_(0, ids, torch.ones(ids.shape, dtype=counts.dtype, device=device))
        lengths[slot] = float(len(token_ids))
        last[slot] = ids[-1]

    def slots(self, seq_ids: Sequence[int], vocab_size: int, device: torch.device) -> torch.Tensor:
        """The slot of each row ([B] int64); the sink for rows without history."""
        self._ensure(vocab_size, device)
        return torch.tensor(
            [self._slot_of.get(seq_id, _SINK) for seq_id in seq_ids],
            dtype=torch.int64,
            device=device,
        )

    def view(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(counts [B, V], lengths [B], last token [B]) of each row, copied out."""
        counts, lengths, last = self._tensors()
        return counts[slots], lengths[slots], last[slots]

    def append(self, slots: torch.Tensor, token_ids: torch.Tensor) -> None:
        """Record each row's newly sampled token (device ops only)."""
        if self._counts is None:
            return
        counts, lengths, last = self._tensors()
        ones = torch.ones(slots.shape, dtype=counts.dtype, device=counts.device)
        counts.index_put_((slots, token_ids), ones, accumulate=True)
        lengths.index_add_(0, slots, ones)
        last[slots] = token_ids  # several rows may write the sink: it is never read

    def release(self, seq_ids: Iterable[int]) -> None:
        for seq_id in seq_ids:
            slot = self._slot_of.pop(seq_id, None)
            if slot is not None:
                self._free.append(slot)

    def _tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self._counts is None or self._lengths is None or self._last is None:
            raise RuntimeError("no token history was started")
        return self._counts, self._lengths, self._last

    def _ensure(self, vocab_size: int, device: torch.device) -> None:
        """Create the tensors (the sink row only) on first use, or for another vocab."""
        if self._counts is None or self._counts.shape[1] != vocab_size:
            self._counts = torch.zeros(1, vocab_size, device=device)
            self._lengths = torch.ones(1, device=device)  # never 0: frequency divides by it
            self._last = torch.zeros(1, dtype=torch.int64, device=device)
            self._slot_of.clear()
            self._free = []

    def _allocate(self, vocab_size: int, device: torch.device) -> int:
        self._ensure(vocab_size, device)
        if self._free:
            return self._free.pop()
        counts, lengths, last = self._tensors()
        used = counts.shape[0]
        self._counts = torch.cat([counts, torch.zeros_like(counts)])
        self._lengths = torch.cat([lengths, torch.ones_like(lengths)])
        self._last = torch.cat([last, torch.zeros_like(last)])
        self._free = list(range(used * 2 - 1, used, -1))
        return used
