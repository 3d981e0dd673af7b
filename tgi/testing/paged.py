"""Invariant checks for paged KV bookkeeping, for tests of the router and of backends.

`check_pool(policy)` (or `check_blocks(pool, tables, read_only)`) raises AssertionError
naming the first broken rule:

- every block is in exactly one state: free, evictable (cached, no owner) or owned;
- a block's reference count equals the number of block tables that hold it;
- a free block carries no prefix-cache key; an evictable one does;
- a block in two or more tables is shared read-only: cached, and inside the read-only
  prefix of every table holding it (no block has two writers, and no block is written
  by one sequence while another reads it);
- no table holds a block twice.

`check_drained(policy)`: after every request ended, no block is owned by anyone.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from tgi.router.paging import BlockPool

if TYPE_CHECKING:
    from tgi.backend.contract import Backend
    from tgi.metrics import Metrics
    from tgi.router.request import GenerationRequest
    from tgi.router.router import Router
    from tgi.sampling import SamplingParams

__all__ = ["check_blocks", "check_drained", "check_pool", "make_request", "paged_router"]


def check_blocks(
    pool: BlockPool,
    tables: Mapping[int, tuple[int, ...]],
    read_only: Mapping[int, int],
) -> None:
    """`tables`: seq_id -> block table; `read_only`: seq_id -> leading blocks it only reads."""
    owners: Counter[int] = Counter()
    for seq_id, table in tables.items():
        assert len(set(table)) == len(table), f"seq {seq_id} holds a block twice: {table}"
        owners.update(table)
    free, evictable = pool.free_blocks(), pool.evictable_blocks()
    assert not free & evictable, f"blocks both free and evictable: {sorted(free & evictable)}"
    assert pool.num_free == len(free), "the free list holds a block twice"
    for block in range(pool.num_blocks):
        ref = pool.ref_count(block)
        assert ref == owners[block], f"block {block}: ref count {ref}, owners {owners[block]}"
        if block in free:
            assert ref == 0 and not pool.is_cached(block), f"free block {block} is in use"
        elif block in evictable:
            assert ref == 0 and pool.is_cached(block), f"evictable block {block} is not cached"
        else:
            assert ref > 0, f"block {block} is neither free, evictable nor owned (leaked)"
    for seq_id, table in tables.items():
        for index, block in enumerate(table):
            if owners[block] > 1:
                assert pool.is_cached(block), f"block {block} shared but not a cached prefix"
                assert index < read_only.get(seq_id, 0), (
                    f"seq {seq_id} may write block {block} (index {index}) that others share"
                )


def check_pool(policy: object) -> None:
    """`check_blocks` over a `tgi.router.policies.PagedPolicy`."""
    from tgi.router.policies.paged import PagedPolicy

    assert isinstance(policy, PagedPolicy)
    check_blocks(policy.pool, policy.tables(), policy.shared_counts())


def check_drained(policy: object) -> None:
    """Every block free or evictable: nothing leaked after all requests ended."""
    from tgi.router.policies.paged import PagedPolicy

    assert isinstance(policy, PagedPolicy)
    check_pool(policy)
    assert not policy.tables(), f"sequences still hold blocks: {sorted(policy.tables())}"
    assert policy.pool.num_used == 0, f"{policy.pool.num_used} blocks still owned"


def paged_router(
    backend: Backend,
    tokenizer: Any,
    *,
    max_batch_prefill_tokens: int = 256,
    max_batch_size: int | None = None,
    speculate: int = 0,
    prefix_caching: bool = True,
    eos_token_ids: frozenset[int] = frozenset(),
    metrics: Metrics | None = None,
    max_batch_total_tokens: int | None = None,
    max_total_tokens: int | None = None,
    overlap: bool = False,
    keep_in_flight: bool | None = None,
) -> Router:
    """A `Router` with the paged policy over a warmed-up paged `backend`, with limits a
    test picks freely (a small prefill budget forces chunking, a small pool preemption).
    Its policy is `router.policy`, with the `StepConstraints` warmup reported.
    `max_total_tokens` (default: one block) is what warmup is told one sequence may
    reach; a real backend enforces it. `keep_in_flight` goes to the `EngineCore`
    (True: steps overlap even on a CPU)."""
    from tgi.backend.contract import Limits
    from tgi.metrics import Metrics
    from tgi.router.policies import PagedPolicy, PolicyLimits
    from tgi.router.router import Router, RouterLimits

    block_size = backend.capabilities.block_size or 1
    report = backend.warmup(
        Limits(
            max_input_tokens=(max_total_tokens or block_size + 1) - 1,
            max_total_tokens=max_total_tokens or block_size,
            max_batch_prefill_tokens=max_batch_prefill_tokens,
            max_batch_total_tokens=max_batch_total_tokens,
            max_batch_size=max_batch_size,
        )
    )
    num_blocks = report.kv.num_blocks or 0
    if max_batch_total_tokens is not None:
        num_blocks = min(num_blocks, max_batch_total_tokens // block_size)
    limits = PolicyLimits(
        max_batch_prefill_tokens=max_batch_prefill_tokens,
        max_batch_total_tokens=num_blocks * block_size,
        max_batch_size=max_batch_size,
        constraints=report.constraints,
    )
    policy = PagedPolicy.from_capabilities(
        backend.capabilities,
        limits,
        num_blocks=num_blocks,
        prefix_caching=prefix_caching,
        speculate=speculate,
    )
    from tgi.engine.local import LocalEngine

    return Router(
        LocalEngine(backend, keep_in_flight=keep_in_flight),
        tokenizer,
        limits=RouterLimits(max_concurrent_requests=1_000_000),
        policy=policy,
        eos_token_ids=eos_token_ids,
        metrics=metrics or Metrics(),
        initial_kv=backend.kv_usage(),
        overlap=overlap,
    )


def make_request(
    input_ids: Sequence[int],
    max_new_tokens: int,
    *,
    sampling: SamplingParams | None = None,
    stop_sequences: tuple[str, ...] = (),
    decoder_input_details: bool = False,
) -> GenerationRequest:
    """A validated-looking request from token ids (no tokenizer round trip)."""
    from tgi.router.request import GenerationRequest, StoppingParams
    from tgi.sampling import SamplingParams

    return GenerationRequest(
        inputs="",
        input_ids=tuple(input_ids),
        sampling=sampling or SamplingParams(),
        stopping=StoppingParams(max_new_tokens, stop_sequences),
        decoder_input_details=decoder_input_details,
    )
