"""How a Llama-family model splits over N ranks: which heads, columns and vocabulary rows
each rank holds, and whether the model splits at all.

NOTE: Megatron-style tensor parallelism, two all-reduces per layer:

    qkv_proj, gate_up_proj   column-parallel: rank r holds its heads' q/k/v rows and its
                             slice of the gate and of the up rows; no communication
    o_proj, down_proj        row-parallel: rank r holds the matching input columns; the
                             partial sums are all-reduced (bias added on rank 0 only)
    embed_tokens, lm_head    vocabulary-parallel: rank r holds rows [r*Vr, (r+1)*Vr) of a
                             vocabulary padded to N*Vr; lookups are all-reduced, logits
                             all-gathered for the sampler

KV heads follow the query heads they serve: with KVH >= N each rank holds KVH/N of them;
with KVH < N (N a multiple of KVH) each holds the one its query heads use, replicated on
N/KVH ranks. A rank's KV pool holds only its own heads.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from tgi.errors import ConfigError

if TYPE_CHECKING:
    from tgi.models.llama import LlamaSpec

__all__ = ["ShardPlan", "check_shardable", "plan_shard"]


@dataclass(frozen=True, slots=True)
class ShardPlan:
    """Rank `rank` of `world_size`: what slice of each tensor it loads."""

    rank: int
    world_size: int
    heads: tuple[int, int]  # query heads [start, stop)
    kv_heads: tuple[int, int]  # KV heads [start, stop)
    intermediate: tuple[int, int]  # MLP columns [start, stop)
    vocab: tuple[int, int]  # vocabulary rows [start, stop) of the padded vocabulary
    vocab_size: int  # the real vocabulary, for trimming gathered logits

    def local_spec(self, spec: LlamaSpec) -> LlamaSpec:
        """The shape this rank's modules have: its heads, its MLP columns."""
        return replace(
            spec,
            num_heads=self.heads[1] - self.heads[0],
            num_kv_heads=self.kv_heads[1] - self.kv_heads[0],
            intermediate_size=self.intermediate[1] - self.intermediate[0],
        )


def check_shardable(spec: LlamaSpec, world_size: int, *, quantize: str | None = None) -> None:
    """ConfigError naming the divisibility `world_size` breaks, before any weight loads."""
    if world_size < 1:
        raise ConfigError(f"--num-shard must be positive, got {world_size}")
    problems = []
    if spec.num_heads % world_size:
        problems.append(f"{spec.num_heads} attention heads % {world_size} shards != 0")
    kvh = spec.num_kv_heads
    if kvh % world_size and world_size % kvh:
        problems.append(
            f"{kvh} KV heads and {world_size} shards: one must divide the other "
            "(KV heads are split, or replicated when there are fewer than shards)"
        )
    if spec.intermediate_size % world_size:
        problems.append(f"intermediate size {spec.intermediate_size} % {world_size} shards != 0")
    if quantize == "int4":
        from tgi.models.quantize import INT4_GROUP_SIZE

        for name, columns in (
            ("attention output", spec.num_heads * spec.head_dim // world_size),
            ("MLP", spec.intermediate_size // world_size),
        ):
            if world_size > 1 and columns % INT4_GROUP_SIZE:
                problems.append(
                    f"int4 groups of {INT4_GROUP_SIZE}: each shard's {name} slice of "
                    f"{columns} columns does not end on a group boundary"
                )
    if problems:
        raise ConfigError(
            f"{spec.architecture} does not split over --num-shard {world_size}: "
            + "; ".join(problems)
            + ". Choose a shard count that divides them"
        )


def plan_shard(spec: LlamaSpec, rank: int, world_size: int) -> ShardPlan:
    """Rank `rank`'s slices; `check_shardable` must have passed."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    heads = spec.num_heads // world_size
    kvh = spec.num_kv_heads
    if kvh >= world_size:
        per_rank = kvh // world_size
        kv_heads = (rank * per_rank, (rank + 1) * per_rank)
    else:  # replicated: the KV head this rank's query heads read
        kv_head = rank * kvh // world_size
        kv_heads = (kv_head, kv_head + 1)
    columns = spec.intermediate_size // world_size
    vocab = -(-spec.vocab_size // world_size)
    return ShardPlan(
        rank=rank,
        world_size=world_size,
        heads=(rank * heads, (rank + 1) * heads),
        kv_heads=kv_heads,
        intermediate=(rank * columns, (rank + 1) * columns),
        vocab=(rank * vocab, (rank + 1) * vocab),
        vocab_size=spec.vocab_size,
    )
