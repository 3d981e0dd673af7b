"""`RunnerBackend`: what every backend built on the paged runner shares.

A backend of this kind (the CPU's paged engine, CUDA, ROCm) is `PagedModelRunner` on its
device: the same capabilities and the same contract calls, each handed to the runner.
A subclass sets `self.runner` and adds only what is its own (loading, `engine_details`).
"""

from __future__ import annotations

from collections.abc import Sequence

from tgi.backend.contract import (
    Batching,
    Capabilities,
    FedTokens,
    KvLayout,
    KVUsage,
    Limits,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.runner._runner import PagedModelRunner

__all__ = ["RunnerBackend"]


class RunnerBackend:
    """`tgi.backend.Backend` by delegation to `self.runner`."""

    runner: PagedModelRunner

    @property
    def capabilities(self) -> Capabilities:
        """Continuous batching over paged KV; every row kind the runner's step takes."""
        return Capabilities(
            batching=Batching.CONTINUOUS,
            kv_layout=KvLayout.PAGED,
            block_size=self.runner.block_size,
            speculation=True,
            prefix_caching=True,
            chunked_prefill=True,
            prompt_logits=True,
            # a tensor on this rank's device cannot feed the other ranks' forwards
            fed_tokens=not self.runner.sharded,
        )

    @property
    def bytes_per_token(self) -> int:
        return self.runner.bytes_per_token

    def warmup(self, limits: Limits) -> WarmupReport:
        """Size and allocate the pool, run one real prefill and decode over it, then let
        the device prepare its steps (captured graphs)."""
        return self.runner.warmup(limits)

    def step(self, plan: StepPlan, fed: FedTokens | None = None) -> StepOutput:
        """One forward over the plan's rows (`PagedModelRunner.step`); decode rows
        without a `last_token` feed theirs from `fed`, on the device."""
        return self.runner.step(plan, fed)

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forget the sequences' tables and lengths; their blocks belong to the router."""
        self.runner.release(seq_ids)

    def kv_usage(self) -> KVUsage:
        return self.runner.kv_usage()

    def health(self) -> None:
        """A real one-token forward that writes nothing: it runs on a throwaway pool."""
        self.runner.health()

    def close(self) -> None:
        """Drop the pool and the weights; later calls raise BackendError."""
        self.runner.close()
