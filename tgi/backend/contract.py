"""The backend contract: what the router hands a backend each step and what it gets back.

NOTE: the contract speaks token ids and logits only. Tokenizing, sampling, stopping and
streaming stay in the core, so one contract covers three very different executors:

- paged continuous batching (CUDA, ROCm, CPU engine): rows carry `block_ids`;
- static slots with prefill-time KV rebuild (Neuron): rows carry `slot`, and the router
  re-sends the full history of every active slot when `prefill_rebuilds_cache` is set;
- bucketed static shapes (Gaudi): the router sizes batches to `batch_buckets`, the
  backend pads rows and lengths to its own buckets.

A backend keeps whatever KV state it wants, keyed by `seq_id`; the router promises to
call `release` for every sequence it ever prefilled, exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

__all__ = [
    "Backend",
    "Batching",
    "Capabilities",
    "DecodeBatch",
    "DecodeRow",
    "KVCapacity",
    "KVUsage",
    "KvLayout",
    "Limits",
    "PrefillBatch",
    "PrefillRow",
    "StepOutput",
]


class Batching(str, Enum):
    """How the router may change a running batch."""

    CONTINUOUS = "continuous"  # rows join and leave between any two decode steps
    STATIC = "static"  # a fixed number of slots, compiled shapes


class KvLayout(str, Enum):
    """How the backend stores KV; tells the router which fields of a row it reads."""

    PER_ROW = "per_row"  # one cache object per sequence (generic fallback)
    PAGED = "paged"  # fixed-size blocks addressed through `block_ids`
    SLOTS = "slots"  # a [B, max_length] tensor; rows address it through `slot`
    PADDED = "padded"  # one padded tensor re-built per batch (bucketed shapes)


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; the router picks its batching policy from this."""

    batching: Batching
    kv_layout: KvLayout
    block_size: int | None = None  # paged: tokens per KV block
    static_batch_size: int | None = None  # static: B, the number of compiled slots
    static_max_length: int | None = None  # static: compiled sequence length
    prefill_rebuilds_cache: bool = False  # static: a prefill rewrites every slot's KV
    batch_buckets: tuple[int, ...] = ()  # bucketed shapes: allowed batch sizes, () when free
    length_buckets: tuple[int, ...] = ()  # bucketed shapes: allowed lengths, () when free
    speculation: bool = False  # decode accepts draft tokens after the last sampled one
    prefix_caching: bool = False  # prefill may start past a cached prompt prefix
    chunked_prefill: bool = False  # a prompt may be prefilled over several steps
    prompt_logits: bool = False  # prefill can return logits for every prompt position


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits the router will respect, resolved from the launcher flags."""

    max_input_tokens: int  # longest prompt, after truncation
    max_total_tokens: int  # prompt + generated tokens of one sequence
    max_batch_prefill_tokens: int  # prompt tokens in one prefill step
    max_batch_total_tokens: int | None  # KV tokens across the batch; None: backend sizes it
    max_batch_size: int | None  # rows in one batch; None: no cap beyond KV


@dataclass(frozen=True, slots=True)
class KVCapacity:
    """What `warmup` measured: how much KV the backend can hold at once."""

    max_total_tokens: int  # tokens of KV across all live sequences
    bytes_per_token: int  # KV bytes one token costs (all layers, keys and values)
    max_sequences: int | None = None  # live sequences at once (static slots), None: no cap
    block_size: int | None = None  # paged: tokens per block
    num_blocks: int | None = None  # paged: blocks in the pool


@dataclass(frozen=True, slots=True)
class KVUsage:
    """The backend's own account of its live KV, for metrics and reconciliation."""

    seq_ids: frozenset[int]  # sequences that hold KV now
    used_tokens: int  # tokens of KV held by those sequences
    capacity_tokens: int  # the capacity reported by warmup


@dataclass(frozen=True, slots=True)
class PrefillRow:
    """One sequence to write into KV during a prefill step."""

    seq_id: int  # router-assigned, unique for the life of the server
    token_ids: tuple[int, ...]  # tokens to run now; they start at `start_position`
    start_position: int = 0  # tokens of this sequence already in KV (cached prefix, chunk)
    slot: int | None = None  # static layouts: the slot this sequence owns
    block_ids: tuple[int, ...] = ()  # paged layout: the sequence's whole block table
    want_logits: bool = True  # False for a non-final chunk or a static rebuild row
    want_prompt_logits: bool = False  # also return logits for every position of token_ids


@dataclass(frozen=True, slots=True)
class PrefillBatch:
    """Sequences to prefill together. Rows are new unless the policy says rebuild."""

    rows: tuple[PrefillRow, ...]


@dataclass(frozen=True, slots=True)
class DecodeRow:
    """One running sequence to advance by one step."""

    seq_id: int
    token_ids: tuple[int, ...]  # the last sampled token, then any speculated drafts
    position: int  # position of token_ids[0]; equals the tokens already in KV
    slot: int | None = None  # static layouts
    block_ids: tuple[int, ...] = ()  # paged layout


@dataclass(frozen=True, slots=True)
class DecodeBatch:
    """All running sequences of one decode step; every row has the same len(token_ids)."""

    rows: tuple[DecodeRow, ...]


@dataclass(slots=True)
class StepOutput:
    """Logits of one step, on the backend's device; the core samples from them."""

    seq_ids: tuple[int, ...]  # rows that asked for logits, in request order
    logits: torch.Tensor  # [R, T, V]: T = 1 for prefill, 1 + drafts for decode
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [n, V]


@runtime_checkable
class Backend(Protocol):
    """What every backend implements. Calls come from one router thread, never at once.

    Lifecycle: `warmup` once, then any interleaving of `prefill`, `decode` and
    `release`; `health` may be called between steps; `close` once at shutdown.
    """

    @property
    def capabilities(self) -> Capabilities:
        """Fixed for the life of the backend."""
        ...

    def warmup(self, limits: Limits) -> KVCapacity:
        """Run the largest shapes the limits allow once; return the KV that fits.

        Raises `tgi.errors.BackendError` when even one sequence of `max_total_tokens`
        cannot fit, naming the setting to change.
        """
        ...

    def prefill(self, batch: PrefillBatch) -> StepOutput:
        """Write each row's tokens into KV; return logits of each row's last position."""
        ...

    def decode(self, batch: DecodeBatch) -> StepOutput:
        """Advance each row; return logits for each of its `token_ids` positions."""
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the KV of ended sequences. Unknown ids are ignored."""
        ...

    def kv_usage(self) -> KVUsage:
        """The backend's own count of live sequences and KV tokens."""
        ...

    def health(self) -> None:
        """Run a real one-token forward; raise when the device cannot serve."""
        ...

    def close(self) -> None:
        """Free device memory; no call follows."""
        ...
