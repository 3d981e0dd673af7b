"""The backend contract (version 2): one `step(plan)` per forward, state that travels as changes.

NOTE: the contract speaks token ids and logits. Tokenizing, stopping and streaming stay
in the core; sampling too, unless a backend declares that it samples on its device.
One step plan carries only what changed since the previous step (vLLM v1's
`SchedulerOutput` is the model):

    StepPlan
      finished   ids whose KV and sampler state go, before the forward
      preempted  ids whose KV goes (the core keeps their sampler state; they come back
                 later as a NewSequence under the same id, recomputed from scratch)
      new        NewSequence: first chunk, full block table or slot, sampling, adapter
      running    RunningSequence: next chunk or a decode row, the blocks appended

The backend keeps each live sequence's state (its block table or slot, grown by
appends) and runs ONE forward over every new and running row of the plan, prefill
chunks and decode rows mixed. A backend whose graphs cannot mix them (static shapes)
splits the step inside itself; the core never sees it.

Every layout reads the same dataclasses:

- paged (CPU, CUDA, ROCm): `NewSequence.block_ids` + `RunningSequence.new_block_ids`;
- static slots (Neuron, Gaudi): `NewSequence.slot`; where `prefill_rebuilds_cache` is
  set, the backend re-writes every live slot itself when a new sequence arrives (it has
  seen every token it was fed), so the core never re-sends histories;
- one cache per sequence (the generic fallback): the seq_id is the key.

The core promises: calls come from one thread, never at once; every sequence that
reached the backend is named in `finished`, `preempted` or `release` exactly once per
admission; slots and blocks named in a plan are owned by that sequence alone (the
policy owns them; backends do not re-check them); token ids are in [0, vocab_size);
a sequence never grows past `Limits.max_total_tokens`.

Everything in a plan and in `KVUsage` is plain data (ints, strings, tuples, frozen
dataclasses): it can cross a process boundary through a typed encoder
(`tgi.backend.wire`). Only `StepOutput` and `FedTokens` hold tensors, and they never
leave the engine.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from tgi.sampling.params import SamplingParams

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONTRACT_VERSION",
    "Backend",
    "Batching",
    "Capabilities",
    "FedStepBackend",
    "FedTokens",
    "KVCapacity",
    "KVUsage",
    "KvLayout",
    "Limits",
    "NewSequence",
    "RunningSequence",
    "StepConstraints",
    "StepOutput",
    "StepPlan",
    "WarmupReport",
]

# The version of this contract. A plugin declares the one it implements (its module's
# `TGI_CONTRACT_VERSION`); the manager lists any other as broken instead of calling it.
CONTRACT_VERSION = 2


class Batching(str, Enum):
    """How the scheduler may change a running batch."""

    CONTINUOUS = "continuous"  # rows join and leave between any two steps
    STATIC = "static"  # a fixed number of slots, compiled shapes


class KvLayout(str, Enum):
    """How the backend stores KV; tells the policy which fields of a plan it fills."""

    PER_ROW = "per_row"  # one cache object per sequence (generic fallback)
    PAGED = "paged"  # fixed-size blocks addressed through block tables
    SLOTS = "slots"  # a [B, max_length] tensor; a sequence owns one slot


@dataclass(frozen=True, slots=True)
class Capabilities:
    """What a backend can do; fixed for its life. The policy is chosen from this."""

    batching: Batching
    kv_layout: KvLayout
    block_size: int | None = None  # paged: tokens per KV block
    static_batch_size: int | None = None  # static: B, the number of compiled slots
    static_max_length: int | None = None  # static: compiled sequence length
    prefill_rebuilds_cache: bool = False  # static: a new sequence rewrites every slot's KV
    speculation: bool = False  # decode rows may carry draft tokens after the fed one
    prefix_caching: bool = False  # a new sequence may start past a shared cached prefix
    chunked_prefill: bool = False  # a prompt may be computed over several steps
    prompt_logits: bool = False  # can return logits for every prompt position
    # The backend samples on its device and returns token ids instead of logits; it then
    # names the SamplingParams fields it honours, and validation refuses the others.
    samples_on_device: bool = False
    sampling_parameters: frozenset[str] = frozenset()
    max_top_k: int | None = None  # the device sampler's largest top_k (None: no bound)
    # `step(plan, fed)` takes decode rows' last tokens as a tensor on its device
    # (`FedTokens`): the engine may then start step N+1 before step N's sampled ids
    # reach the host (`tgi.engine.core`'s NOTE)
    fed_tokens: bool = False


@dataclass(frozen=True, slots=True)
class Limits:
    """The limits the scheduler will respect, resolved from the launcher flags."""

    max_input_tokens: int  # longest prompt, after truncation
    max_total_tokens: int  # prompt + generated tokens of ONE sequence
    max_batch_prefill_tokens: int  # prompt tokens computed in one step
    max_batch_total_tokens: int | None  # KV tokens across the batch; None: backend sizes it
    max_batch_size: int | None  # rows in one step; None: no cap beyond KV
    rank: int = 0  # tensor parallelism: this process's rank
    world_size: int = 1  # ... and how many ranks serve the model


@dataclass(frozen=True, slots=True)
class KVCapacity:
    """How much KV the backend can hold at once, as warmup measured it."""

    total_tokens: int  # tokens of KV across all live sequences (the pool's capacity)
    bytes_per_token: int  # KV bytes one token costs (all layers, keys and values)
    max_sequences: int | None = None  # live sequences at once (static slots), None: no cap
    block_size: int | None = None  # paged: tokens per block
    num_blocks: int | None = None  # paged: blocks in the pool


@dataclass(frozen=True, slots=True)
class StepConstraints:
    """The step shapes warmup found the backend can run; the policy enforces them.

    Hard constraints (a step outside them cannot run): `batch_buckets` (rows per
    forward, padded up to the next bucket; no step may have more rows than the largest)
    and `length_buckets` (a new sequence's first chunk, padded up to the next bucket; no
    chunk may be longer than the largest). Soft ones only shape admission's cost:
    `graph_batch_sizes` (batch sizes with captured graphs; a step is padded up to the
    next one inside the backend and runs eagerly above the largest).
    """

    batch_buckets: tuple[int, ...] = ()  # () when any number of rows runs
    length_buckets: tuple[int, ...] = ()  # () when any chunk length runs
    graph_batch_sizes: tuple[int, ...] = ()  # soft: padding hint
    max_adapters_per_step: int | None = None  # distinct LoRA adapters in one forward
    max_rows_per_step: int | None = None  # rows one forward can take
    max_tokens_per_step: int | None = None  # tokens one forward can take
    max_chunk_tokens: int | None = None  # hard: the longest chunk one row may bring
    # without a bucket to pad to (a context graph compiled for at most that many)

    def padded_rows(self, num_rows: int) -> int:
        """Rows the forward really computes for `num_rows` (bucket or captured graph)."""
        for sizes in (self.batch_buckets, self.graph_batch_sizes):
            for size in sizes:
                if size >= num_rows:
                    return size
        return num_rows

    def padded_length(self, num_tokens: int) -> int:
        """Tokens a new sequence's first chunk costs once padded to its bucket."""
        for size in self.length_buckets:
            if size >= num_tokens:
                return size
        return num_tokens

    def padded_cost(self, num_rows: int, num_tokens: int) -> int:
        """Token positions a forward of `num_rows` rows of `num_tokens` tokens computes."""
        return self.padded_rows(num_rows) * self.padded_length(num_tokens)

    @property
    def max_rows(self) -> int | None:
        """The most rows one step may hold (the largest batch bucket, or the cap)."""
        caps = [c for c in (self.max_rows_per_step, max(self.batch_buckets, default=0)) if c]
        return min(caps) if caps else None

    @property
    def max_chunk(self) -> int | None:
        """The longest chunk a row may bring: the largest length bucket, or the cap."""
        caps = [c for c in (self.max_chunk_tokens, max(self.length_buckets, default=0)) if c]
        return min(caps) if caps else None


@dataclass(frozen=True, slots=True)
class WarmupReport:
    """What `warmup` measured and declares."""

    kv: KVCapacity
    constraints: StepConstraints = field(default_factory=StepConstraints)
    seconds: float = 0.0  # how long warmup took (every bucket walked once, graphs captured)


@dataclass(frozen=True, slots=True)
class KVUsage:
    """The backend's own account of its live KV, for metrics and reconciliation."""

    seq_ids: frozenset[int]  # sequences that hold KV now
    used_tokens: int  # tokens of KV held by those sequences
    capacity_tokens: int  # the capacity reported by warmup


@dataclass(frozen=True, slots=True)
class NewSequence:
    """A sequence the backend does not hold: its state starts with this step.

    A preempted sequence comes back as a NewSequence under its old id, with
    `prompt + generated[:-1]` as its tokens and `want_logits=False`: the token it had
    sampled last is fed by its next decode row, as if nothing had happened.
    """

    seq_id: int  # scheduler-assigned, unique for the life of the server
    token_ids: tuple[int, ...]  # the first chunk to compute, from `start_position` on
    start_position: int = 0  # tokens already in KV: a cached prefix shared via block_ids
    block_ids: tuple[int, ...] = ()  # paged: the block table, covering this chunk
    slot: int | None = None  # static slots: the slot this sequence owns until released
    want_logits: bool = True  # logits of the chunk's last position (False: more chunks
    # follow, or a resumed sequence)
    want_prompt_logits: bool = False  # also logits of every position of token_ids
    adapter_id: str | None = None  # LoRA adapter; None: the base model
    sampling: SamplingParams = field(default_factory=SamplingParams)  # how its tokens are chosen

    @property
    def input_ids(self) -> tuple[int, ...]:
        """The tokens the forward computes for this row."""
        return self.token_ids

    @property
    def num_logits(self) -> int:
        """Logits positions this row returns in `StepOutput.logits` (0 or 1)."""
        return 1 if self.want_logits else 0


@dataclass(frozen=True, slots=True)
class RunningSequence:
    """A sequence the backend holds: what it computes this step, and what changed.

    A decode row (`decode=True`) first computes `last_token`, the token sampled for it
    at its previous step, then its drafts (`token_ids`); it returns logits for every one
    of those positions. A chunk row (`decode=False`) computes `token_ids`, the next chunk
    of its prompt, and returns the last position's logits when `want_logits`.

    `start_position` is where the step's first token goes: the tokens already in KV.
    It is below the backend's own count after rejected drafts (their KV is junk the step
    overwrites). `last_token` is None only in a plan the scheduler made before it knew
    the token (overlapped planning); the engine fills it in before the backend sees it.
    """

    seq_id: int
    start_position: int  # tokens of this sequence in KV before this step
    token_ids: tuple[int, ...] = ()  # chunk row: the next chunk; decode row: its drafts
    decode: bool = False  # feed `last_token` first, return logits of every position
    last_token: int | None = None  # decode: the token sampled at the previous step
    new_block_ids: tuple[int, ...] = ()  # paged: blocks appended to its table this step
    want_logits: bool = True  # chunk rows: logits of the last position

    @property
    def input_ids(self) -> tuple[int, ...]:
        """The tokens the forward computes for this row."""
        if not self.decode:
            return self.token_ids
        if self.last_token is None:
            raise ValueError(f"decode row of seq {self.seq_id} reached a backend without a token")
        return (self.last_token, *self.token_ids)

    @property
    def num_logits(self) -> int:
        """Logits positions this row returns: every position of a decode row."""
        if self.decode:
            return 1 + len(self.token_ids)
        return 1 if self.want_logits else 0


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One step: the changes since the previous one, then the rows of one forward.

    Rows are in forward order: `new` first, then `running`. A plan with no rows only
    releases. A sequence appears in at most one of `new` and `running`.
    """

    new: tuple[NewSequence, ...] = ()
    running: tuple[RunningSequence, ...] = ()
    finished: tuple[int, ...] = ()  # ended: free KV (and the core's sampler state) first
    preempted: tuple[int, ...] = ()  # free KV now; the sequence returns as a NewSequence
    forgotten: tuple[int, ...] = ()  # preempted ones that ended: core sampler state only
    step_index: int = 0  # counts the scheduler's steps, for logs and traces

    @property
    def rows(self) -> tuple[NewSequence | RunningSequence, ...]:
        """Every row of the forward, in order."""
        return (*self.new, *self.running)

    @property
    def logits_rows(self) -> tuple[NewSequence | RunningSequence, ...]:
        """The rows that return logits, in the order `StepOutput` lists them."""
        return tuple(row for row in self.rows if row.num_logits)

    @property
    def num_tokens(self) -> int:
        """Tokens the forward computes."""
        return sum(
            len(row.token_ids) + int(isinstance(row, RunningSequence) and row.decode)
            for row in self.rows
        )


@dataclass(slots=True)
class StepOutput:
    """One forward's result, on the backend's device; the core samples from it.

    `seq_ids` are the rows of `plan.logits_rows`, in order. `logits` is [R, T, V] with
    T the largest `num_logits` of the step; row r's positions past its own `num_logits`
    are padding. A backend that samples on its device (`samples_on_device`) returns
    `token_ids` [R] (and `logprobs` [R] when it has them) and may leave `logits` None.
    """

    seq_ids: tuple[int, ...]
    logits: torch.Tensor | None  # [R, T, V]
    prompt_logits: dict[int, torch.Tensor] = field(default_factory=dict)  # seq_id -> [n, V]
    token_ids: torch.Tensor | None = None  # [R] sampled on the device
    logprobs: torch.Tensor | None = None  # [R] their logprobs, when the device has them


@dataclass(frozen=True, slots=True)
class FedTokens:
    """Decode rows' last tokens still on the backend's device: sampled at the step
    before, not yet copied to the host. Only the engine makes these, and only for a
    backend whose capabilities say `fed_tokens`; it never crosses a process.

    A decode row of the plan whose `last_token` is None feeds `ids[rows[seq_id]]`.
    """

    ids: torch.Tensor  # [K] int64 on the backend's device
    rows: Mapping[int, int]  # seq_id -> index into `ids`


@runtime_checkable
class Backend(Protocol):
    """What every backend implements. Calls come from one thread, never at once.

    Lifecycle: `warmup` once, then any number of `step`s; `release` may be called
    between steps (shutdown, a failed step); `health` between steps; `close` once.
    """

    @property
    def capabilities(self) -> Capabilities:
        """Fixed for the life of the backend."""
        ...

    def warmup(self, limits: Limits) -> WarmupReport:
        """Run the largest shapes the limits allow once; return the KV that fits and the
        step shapes the backend can run.

        Raises `tgi.errors.BackendError` when even one sequence of `max_total_tokens`
        cannot fit, naming the setting to change.
        """
        ...

    def step(self, plan: StepPlan) -> StepOutput:
        """Drop `finished` and `preempted`, take in `new`, then one forward over the
        plan's rows; logits for `plan.logits_rows`, in order.

        Raises `tgi.errors.BackendError` when the forward fails; the core then fails
        the step's rows and releases them. A backend whose capabilities say
        `fed_tokens` takes `step(plan, fed)` too (`FedStepBackend`).
        """
        ...

    def release(self, seq_ids: Sequence[int]) -> None:
        """Free the KV of sequences outside a step. Unknown ids are ignored."""
        ...

    def kv_usage(self) -> KVUsage:
        """The backend's own count of live sequences and KV tokens."""
        ...

    def health(self) -> None:
        """Run a real one-token forward that changes no sequence; raise when it fails."""
        ...

    def close(self) -> None:
        """Free device memory; no call follows."""
        ...


@runtime_checkable
class FedStepBackend(Backend, Protocol):
    """A backend whose capabilities say `fed_tokens`: its step also takes `FedTokens`."""

    def step(self, plan: StepPlan, fed: FedTokens | None = None) -> StepOutput:
        """`Backend.step`, where a decode row whose `last_token` is None feeds its
        token from `fed` (on the device) instead."""
        ...
