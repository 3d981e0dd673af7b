"""torch.distributed's standard variables: is this process one rank of a job someone else
launched (torchrun, a job scheduler), and which one?

No torch import here: the config reads it before anything loads.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass

__all__ = ["DISTRIBUTED_VARIABLES", "RankEnvironment", "free_port", "rank_environment"]

DISTRIBUTED_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True, slots=True)
class RankEnvironment:
    """This process's place in a job launched from outside (torchrun sets all of it)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def rank_environment(environ: Mapping[str, str]) -> RankEnvironment | None:
    """The job this process belongs to, or None when the variables are not all set.

    Raises ValueError naming a variable that is set but not a number.
    """
    if not all(environ.get(name) for name in DISTRIBUTED_VARIABLES):
        return None
    numbers = {}
    for name in ("RANK", "WORLD_SIZE", "MASTER_PORT", "LOCAL_RANK"):
        raw = environ.get(name) or ("0" if name == "LOCAL_RANK" else "")
        try:
            numbers[name] = int(raw)
        except ValueError:
            raise ValueError(f"{name}={raw!r} is not an integer") from None
    if not 0 <= numbers["RANK"] < numbers["WORLD_SIZE"]:
        raise ValueError(f"RANK={numbers['RANK']} is outside WORLD_SIZE={numbers['WORLD_SIZE']}")
    return RankEnvironment(
        rank=numbers["RANK"],
        world_size=numbers["WORLD_SIZE"],
        local_rank=numbers["LOCAL_RANK"],
        master_addr=environ["MASTER_ADDR"],
        master_port=numbers["MASTER_PORT"],
    )


def free_port() -> int:
    """A loopback TCP port nobody listens on right now (rank 0's rendezvous)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])
