"""Tensor parallelism: one model over several ranks (`--num-shard N`).

- `env`: torch.distributed's standard variables (a job torchrun launched);
- `sharding`: which slice of each tensor a rank holds, and whether a model splits;
- `group`: `ShardGroup`, the collectives over torch.distributed (gloo, NCCL);
- `ranks`: rank 0 repeats every backend call to the other ranks (`LeaderBackend`),
  which run it on their slice (`follow`).

A worker process joins the group before its backend is created and publishes it here;
a backend that declares `parallelism="ranks"` picks it up with `rank_group()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tgi.parallel.group import ShardGroup

__all__ = ["joined_group", "rank_group", "set_rank_group"]

_GROUP: ShardGroup | None = None


def set_rank_group(group: ShardGroup | None) -> None:
    """Publish the group this process's worker joined (None: leave it)."""
    global _GROUP
    _GROUP = group


def rank_group() -> ShardGroup | None:
    """The rank group this process belongs to; None when it serves alone."""
    return _GROUP


def joined_group(world_size: int) -> ShardGroup | None:
    """For a backend's create hook: None for one rank, else the group of `world_size`
    ranks its worker joined; BackendError when there is none of that size."""
    if world_size == 1:
        return None
    if _GROUP is None or _GROUP.world_size != world_size:
        from tgi.errors import BackendError

        raise BackendError(f"rank of {world_size} created outside a rank group (tgi.parallel)")
    return _GROUP
