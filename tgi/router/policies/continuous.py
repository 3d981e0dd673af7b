"""Continuous batching without paged KV: new requests join a running batch between steps.

NOTE: every admitted prompt is computed whole in its first step, and every running
sequence decodes one token per step (`WholePromptPolicy`). TGI's `waiting_served_ratio`
/ `max_waiting_tokens` apply where a new prompt pauses the whole batch to re-shape it
(padded and bucketed backends): there, new rows join only when waiting >= running x
ratio, or after `max_waiting_tokens` steps. Where a prompt costs the running rows
nothing but its own time (per-row KV, chunked prefill) waiting buys nothing, and new
rows join at the very next step.

Hard step shapes (`StepConstraints`) bound admission: no step holds more rows than the
largest batch bucket, and a prompt counts against the prefill budget at its padded
length.
"""

from __future__ import annotations

from tgi.backend.contract import Capabilities, KvLayout
from tgi.router.policies.base import PolicyLimits
from tgi.router.policies.whole_prompt import WholePromptPolicy

__all__ = ["ContinuousPolicy"]


class ContinuousPolicy(WholePromptPolicy):
    """`SchedulingPolicy` for continuous backends whose KV is kept per sequence."""

    def __init__(self, limits: PolicyLimits, *, join_immediately: bool) -> None:
        super().__init__(limits)
        self.join_immediately = join_immediately  # new prompts do not pause running rows

    @classmethod
    def from_capabilities(
        cls, capabilities: Capabilities, limits: PolicyLimits
    ) -> ContinuousPolicy:
        """New rows join at once where a prompt does not re-shape the running batch:
        chunked prefill, or KV kept per sequence."""
        joins = capabilities.chunked_prefill or capabilities.kv_layout is KvLayout.PER_ROW
        return cls(limits, join_immediately=joins)

    def _pauses_running(self) -> bool:
        return not self.join_immediately
