"""A fixed sequence of step plans of every kind, for comparing two engines step by step.

`mixed_step_logits(backend)` warms the backend up, then runs: a prefill of two prompts
(5 and 30 tokens), two decode steps of both rows, and a mixed step (the two decode rows
beside a 12-token chunk of a third prompt), and returns each step's logits. Two backends
built alike but for one part (a kernel, a fused op) must return close logits.
"""

from __future__ import annotations

import torch

from tgi.backend.contract import Backend, Limits, NewSequence, RunningSequence, StepPlan

__all__ = ["MIXED_STEP_LIMITS", "MIXED_STEP_TOKENS", "mixed_step_logits"]

MIXED_STEP_LIMITS = Limits(64, 128, 256, None, 8)
# tokens of each step `mixed_step_logits` runs, warmup's prompt and decode first
MIXED_STEP_TOKENS = (64, 1, 35, 2, 2, 14)


def mixed_step_logits(backend: Backend) -> list[torch.Tensor]:
    """Each step's logits ([rows, T, V]) over the plans of the module docstring."""
    backend.warmup(MIXED_STEP_LIMITS)
    prompts = [[1, 2, 3, 4, 5], list(range(10, 40))]
    new = tuple(
        NewSequence(s, tuple(p), block_ids=tuple(range(8 * s, 8 * s + 8)))
        for s, p in enumerate(prompts)
    )
    logits = [_logits(backend, StepPlan(new=new))]
    lengths = [len(p) for p in prompts]
    for step in range(3):
        running = tuple(
            RunningSequence(s, lengths[s], decode=True, last_token=7 + step)
            for s in range(len(prompts))
        )
        chunk: tuple[NewSequence, ...] = ()
        if step == 2:  # the mixed step: a 12-token prompt beside the decode rows
            chunk = (NewSequence(9, tuple(range(50, 62)), block_ids=(40, 41)),)
        logits.append(_logits(backend, StepPlan(new=chunk, running=running)))
        lengths = [n + 1 for n in lengths]
    return logits


def _logits(backend: Backend, plan: StepPlan) -> torch.Tensor:
    logits = backend.step(plan).logits
    if logits is None:
        raise AssertionError("the backend sampled on its device: no logits to compare")
    return logits
