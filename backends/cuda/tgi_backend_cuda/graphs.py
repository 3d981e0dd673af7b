"""Decode steps as captured graphs: TGI's `--cuda-graphs` batch sizes, padded up.

NOTE: a decode step of R rows (one token each, no logits index) runs as the graph of
the smallest captured size B >= R; larger or mixed steps run eagerly. A graph replays
fixed launches over fixed buffers, so every input lives in static tensors of the
largest size, and a step copies its own into the first R entries:

    rows 0..R-1   the step's tokens, positions, slots, seq_lens, block tables
    rows R..B-1   padding: token 0 at position 0, written to the pool's scratch block
                  (one block past what the policy owns), seq_len 1, table [scratch]

so padding rows compute garbage that nothing reads, and never touch a live block.
The attention reads lengths from `seq_lens` on the device and bounds its loops by the
captured `max_seq_len` (`--max-total-tokens`), so one graph serves every length.

On a CPU (the backend's test mode) nothing is captured: the same static buffers and
padding run eagerly, so the padding path is what the tests check.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgi.errors import ConfigError
from tgi.models.attention import AttentionOp
from tgi.runner import ModelForward
from tgi_backend_cuda.attention import KernelAttention, PagedMetadata

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_GRAPH_SIZES", "GraphedForward", "graph_size_for", "parse_graph_sizes"]

# TGI's default: 1, 2, 4, 8, then steps of 8 up to 128 (more than that costs memory)
DEFAULT_GRAPH_SIZES: tuple[int, ...] = (
    1,
    2,
    4,
    8,
    16,
    24,
    32,
    40,
    48,
    56,
    64,
    72,
    80,
    88,
    96,
    104,
    112,
    120,
    128,
)


def parse_graph_sizes(text: str | None, max_batch_size: int | None = None) -> tuple[int, ...]:
    """`--cuda-graphs` ("1,2,4,8", "0" or "" for none, None for the default), sorted,
    without sizes above `max_batch_size` (no step has more rows)."""
    if text is None:
        sizes = DEFAULT_GRAPH_SIZES
    else:
        try:
            sizes = tuple(int(part) for part in text.replace(" ", "").split(",") if part)
        except ValueError:
            raise ConfigError(
                f"cuda_graphs={text!r}: expected comma-separated batch sizes, or 0 for none"
            ) from None
        if any(size < 0 for size in sizes):
            raise ConfigError(f"cuda_graphs={text!r}: batch sizes must be positive")
        sizes = tuple(size for size in sizes if size > 0)
    if max_batch_size is not None:
        kept = tuple(size for size in sizes if size <= max_batch_size)
        # one size at or above the cap still covers every step
        above = [size for size in sizes if size > max_batch_size]
        sizes = kept + ((min(above),) if above and (not kept or kept[-1] < max_batch_size) else ())
    return tuple(sorted(set(sizes)))


def graph_size_for(num_rows: int, sizes: Sequence[int]) -> int | None:
    """The smallest captured size holding `num_rows` rows; None above the largest."""
    for size in sizes:
        if size >= num_rows:
            return size
    return None


@dataclass(slots=True)
class _Static:
    """The fixed buffers every graph reads, sized for the largest graph."""

    input_ids: torch.Tensor  # [B_max]
    positions: torch.Tensor  # [B_max]
    slots: torch.Tensor  # [B_max]
    query_start: torch.Tensor  # [B_max + 1] int32: 0, 1, 2, ... (one query a row)
    seq_lens: torch.Tensor  # [B_max] int32
    block_tables: torch.Tensor  # [B_max, blocks of the longest sequence]


class GraphedForward:
    """A `ModelForward` that replays captured decode graphs where a step fits one."""

    def __init__(
        self,
        forward: ModelForward,
        attention: KernelAttention,
        sizes: Sequence[int],
        max_seq_len: int,
        *,
        label: str = "CUDA graphs",
    ) -> None:
        self.forward = forward
        self.attention = attention
        self.sizes = tuple(sorted(sizes))
        self.max_seq_len = max_seq_len
        pool = attention.pool
        self.scratch_block = pool.num_blocks - 1  # the device allocated one past the policy's
        device = pool.keys[0].device
        largest = self.sizes[-1]
        blocks = -(-max_seq_len // pool.block_size)
        self.static = _Static(
            input_ids=torch.zeros(largest, dtype=torch.long, device=device),
            positions=torch.zeros(largest, dtype=torch.long, device=device),
            slots=torch.zeros(largest, dtype=torch.long, device=device),
            query_start=torch.arange(largest + 1, dtype=torch.int32, device=device),
            seq_lens=torch.ones(largest, dtype=torch.int32, device=device),
            block_tables=torch.full(
                (largest, blocks), self.scratch_block, dtype=torch.long, device=device
            ),
        )
        self.capture = device.type == "cuda"
        self.graphs: dict[int, torch.cuda.CUDAGraph | None] = {}
        # every graph writes its logits here: one [B_max, V] buffer, not one per size
        self.logits: torch.Tensor | None = None
        self.replays = 0  # steps that ran as a graph (or its CPU stand-in)
        self._capture_all(label)

    def metadata(self, size: int) -> PagedMetadata:
        """The static metadata of a `size`-row graph."""
        static = self.static
        return PagedMetadata(
            num_rows=size,
            slots=static.slots[:size],
            query_start=static.query_start[: size + 1],
            seq_lens=static.seq_lens[:size],
            block_tables=static.block_tables[:size],
            max_query_len=1,
            max_seq_len=self.max_seq_len,
        )

    def _pad(self, num_rows: int, size: int) -> None:
        """Rows num_rows..size-1 become padding (see the module NOTE)."""
        static, block_size = self.static, self.attention.pool.block_size
        static.input_ids[num_rows:size].zero_()
        static.positions[num_rows:size].zero_()
        static.slots[num_rows:size].fill_(self.scratch_block * block_size)
        static.seq_lens[num_rows:size].fill_(1)
        static.block_tables[num_rows:size, 0].fill_(self.scratch_block)

    def _capture_all(self, label: str) -> None:
        """Warm each size eagerly (kernels compile outside capture), then capture it;
        largest first so the smaller graphs reuse its memory pool."""
        started = time.perf_counter()
        device = self.static.slots.device
        pool_handle = torch.cuda.graph_pool_handle() if self.capture else None
        total = len(self.sizes)
        for done, size in enumerate(reversed(self.sizes), 1):
            self._pad(0, size)
            args = (self.static.input_ids[:size], self.static.positions[:size])
            metadata = self.metadata(size)
            with torch.inference_mode():
                warm = self.forward(*args, self.attention, metadata)
                if self.logits is None:
                    largest = (self.sizes[-1], warm.shape[-1])
                    self.logits = torch.empty(largest, dtype=warm.dtype, device=device)
                if not self.capture:
                    self.graphs[size] = None
                else:
                    torch.cuda.synchronize(device)
                    graph = torch.cuda.CUDAGraph()
                    with torch.cuda.graph(graph, pool=pool_handle):
                        self.logits[:size].copy_(self.forward(*args, self.attention, metadata))
                    self.graphs[size] = graph
            bar = "#" * (20 * done // total)
            logger.info(
                "%s [%-20s] %d/%d (batch %d) %.1f s",
                label if self.capture else f"{label} (not captured on {self.static.slots.device})",
                bar,
                done,
                total,
                size,
                time.perf_counter() - started,
            )

    def __call__(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        attention: AttentionOp,
        metadata: PagedMetadata | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        size = None
        if (
            attention is self.attention
            and logits_index is None
            and metadata is not None
            and metadata.max_query_len == 1
        ):
            size = graph_size_for(metadata.num_rows, self.sizes)
        if size is None or metadata is None:
            return self.forward(input_ids, positions, attention, metadata, logits_index)
        rows = metadata.num_rows
        static = self.static
        static.input_ids[:rows].copy_(input_ids)
        static.positions[:rows].copy_(positions)
        static.slots[:rows].copy_(metadata.slots)
        static.seq_lens[:rows].copy_(metadata.seq_lens)
        width = metadata.block_tables.shape[1]
        static.block_tables[:rows, :width].copy_(metadata.block_tables)
        self._pad(rows, size)
        self.replays += 1
        graph = self.graphs[size]
        if graph is None:  # the CPU stand-in: same buffers, eager
            with torch.inference_mode():
                output = self.forward(
                    static.input_ids[:size],
                    static.positions[:size],
                    self.attention,
                    self.metadata(size),
                )
            return output[:rows]
        graph.replay()
        assert self.logits is not None  # made before the first capture
        return self.logits[:rows].clone()  # the next replay overwrites the buffer
