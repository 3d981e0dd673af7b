"""What the engine hands back to the router after each step: plain data only.

`StepResult` crosses from the engine (backend + sampler) to the router, which may live in
another process: ints, floats, strings and frozen dataclasses, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tgi.backend.contract import KVUsage

__all__ = ["StepResult"]


@dataclass(slots=True)
class StepResult:
    """The sampled tokens of one step, with its errors, timings and KV usage."""

    # (seq_id, token id, logprob) in the order the tokens were chosen; a decode row with
    # accepted drafts has several entries, in position order
    tokens: list[tuple[int, int, float]] = field(default_factory=list)
    prompt_logprobs: dict[int, list[float]] = field(default_factory=dict)  # seq_id -> [n-1]
    errors: dict[int, str] = field(default_factory=dict)  # seq_id -> message
    # A failed step drops the KV of every row it ran; sequences that had already
    # generated tokens are not to blame for a new prompt's failure and are recomputed
    # (the router re-admits them as after a preemption) instead of failing.
    recompute: list[int] = field(default_factory=list)
    durations: dict[str, float] = field(default_factory=dict)  # phase -> seconds
    # seq_id -> the step's top-n (token id, logprob), best first; only rows that asked
    # (such rows never carry drafts, so one list per row)
    top_tokens: dict[int, list[tuple[int, float]]] = field(default_factory=dict)
    kv: KVUsage = field(default_factory=lambda: KVUsage(frozenset(), 0, 0))
    drafts_proposed: int = 0  # speculation: draft tokens verified this step
    drafts_accepted: int = 0  # ... and accepted
    step_index: int = 0  # the plan's step_index
    engine_s: float = 0.0  # time the engine spent on the step, wherever it runs
    # the engine kept this step in flight past its `submit` (its tokens were still on an
    # accelerator's way to the host): the router then submits the next plan before it
    # collects this one, so the two overlap (`tgi.engine.core`'s NOTE)
    kept_in_flight: bool = False
