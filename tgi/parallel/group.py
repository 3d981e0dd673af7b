"""`ShardGroup`: the collectives a sharded model and its ranks need, over torch.distributed.

NOTE: no home-made transport. The ranks of one model form one torch.distributed process
group: gloo on CPUs, NCCL on NVIDIA GPUs, RCCL (spelled "nccl") on AMD GPUs. Rank 0 hosts
the rendezvous at MASTER_ADDR:MASTER_PORT. A collective that fails (a peer exited, its
socket closed) raises `PeerLost` and marks the group broken: a rank that lost a peer
cannot take part in another collective, so its process must exit and the whole set of
ranks be started again. The group's timeout is long on purpose: ranks wait in a
broadcast while the server is idle, and a hung rank is found by the front process's
step deadline, not by a collective's timer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import timedelta

import torch
import torch.distributed as dist

from tgi.errors import BackendUnavailable

__all__ = ["IDLE_TIMEOUT", "PeerLost", "ShardGroup"]

logger = logging.getLogger(__name__)

IDLE_TIMEOUT = timedelta(days=30)  # longest a rank waits for the next call (see NOTE)


class PeerLost(BackendUnavailable):
    """A collective failed: another rank is gone. This rank's process must end."""


class ShardGroup:
    """This process's rank in the group of ranks serving one model."""

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        self.rank = rank
        self.world_size = world_size
        self.device = device  # where collectives' tensors live (CPU for gloo)
        self.broken: str | None = None  # why the group can no longer be used

    @classmethod
    def join(
        cls,
        rank: int,
        world_size: int,
        *,
        device: torch.device | None = None,
        timeout: timedelta = IDLE_TIMEOUT,
    ) -> ShardGroup:
        """Form the default process group from the environment (MASTER_ADDR,
        MASTER_PORT: rank 0 hosts the store, or torchrun's agent already does); gloo for
        CPU tensors, plus NCCL (RCCL on ROCm) for GPU ones wherever torch was built with
        it: its communicator starts lazily, at the first collective on a GPU tensor, so a
        CPU-only job never touches it. Blocks until every rank joined."""
        device = device or torch.device("cpu")
        gpu = device.type == "cuda" or dist.is_nccl_available()
        backend = "cpu:gloo,cuda:nccl" if gpu else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(
                backend, init_method="env://", rank=rank, world_size=world_size, timeout=timeout
            )
        logger.info("rank %d of %d joined the %s group", rank, world_size, backend)
        return cls(rank, world_size, device)

    # ---- collectives ---------------------------------------------------------------

    def all_reduce_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the ranks, in place; the sum is returned."""
        self._collective(lambda: dist.all_reduce(tensor))
        return tensor

    def all_gather_last(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's `tensor` side by side along the last dim, in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        self._collective(lambda: dist.all_gather(parts, tensor.contiguous()))
        return torch.cat(parts, dim=-1)

    def min_int(self, value: int) -> int:
        """The smallest of every rank's `value`."""
        tensor = torch.tensor([value], dtype=torch.int64, device=self.device)
        self._collective(lambda: dist.all_reduce(tensor, op=dist.ReduceOp.MIN))
        return int(tensor.item())

    def broadcast_bytes(self, payload: bytes | None) -> bytes:
        """Rank 0's `payload` on every rank (others pass None): its length, then it."""
        size = torch.tensor([len(payload) if payload is not None else 0], dtype=torch.int64)
        self._collective(lambda: dist.broadcast(size, src=0))
        if self.rank == 0:
            assert payload is not None
            data = torch.frombuffer(bytearray(payload), dtype=torch.uint8)
        else:
            data = torch.empty(int(size.item()), dtype=torch.uint8)
        if data.numel():
            self._collective(lambda: dist.broadcast(data, src=0))
        return payload if payload is not None else data.numpy().tobytes()

    def gather_text(self, text: str) -> list[str]:
        """Every rank's `text`, in rank order (load errors, for rank 0 to report)."""
        encoded = text.encode()
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world_size)]
        mine = torch.tensor([len(encoded)], dtype=torch.int64)
        self._collective(lambda: dist.all_gather(sizes, mine))
        longest = max(int(size.item()) for size in sizes)
        padded = torch.zeros(max(longest, 1), dtype=torch.uint8)
        if encoded:
            padded[: len(encoded)] = torch.frombuffer(bytearray(encoded), dtype=torch.uint8)
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        self._collective(lambda: dist.all_gather(parts, padded))
        return [
            part[: int(size.item())].numpy().tobytes().decode()
            for part, size in zip(parts, sizes, strict=True)
        ]

    def close(self) -> None:
        """Leave the group (a broken one is left to the process's exit)."""
        if self.broken is None and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # best effort: the process is ending anyway
                logger.debug("destroy_process_group failed", exc_info=True)

    def _collective(self, run: Callable[[], object]) -> None:
        if self.broken is not None:
            raise PeerLost(f"rank {self.rank}: the rank group is broken ({self.broken})")
        try:
            run()
        except (RuntimeError, dist.DistBackendError) as exc:
            self.broken = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            logger.error("rank %d lost its peers: %s", self.rank, self.broken)
            raise PeerLost(f"rank {self.rank} lost contact with the other ranks: {exc}") from exc
