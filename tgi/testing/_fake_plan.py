"""What every fake backend checks and records of a `StepPlan`, shared by the fakes."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from tgi.backend.contract import (
    Capabilities,
    NewSequence,
    RunningSequence,
    StepConstraints,
    StepPlan,
)
from tgi.errors import BackendError

__all__ = ["check_plan", "log_calls", "logits_ends", "pad_logits"]


def check_plan(
    plan: StepPlan,
    capabilities: Capabilities,
    constraints: StepConstraints,
    adapters: Mapping[int, str | None],
) -> None:
    """Raise `BackendError` for a plan no backend with `capabilities` and `constraints`
    could run: a sequence named twice, a feature it does not declare, a step outside the
    hard constraints. `adapters`: seq_id -> adapter of the sequences the backend holds."""
    _check_ids(plan)
    for new in plan.new:
        if not new.token_ids:
            raise BackendError(f"seq {new.seq_id}: a new sequence with no tokens")
        if new.start_position and not capabilities.prefix_caching:
            raise BackendError(f"seq {new.seq_id} starts at {new.start_position}: no prefix cache")
        if new.want_prompt_logits and not capabilities.prompt_logits:
            raise BackendError(f"seq {new.seq_id} wants prompt logits; none declared")
    for row in plan.running:
        if row.decode and row.token_ids and not capabilities.speculation:
            raise BackendError(f"seq {row.seq_id} carries drafts; no speculation declared")
        if not row.decode and not capabilities.chunked_prefill:
            raise BackendError(f"seq {row.seq_id} is a chunk row; no chunked_prefill declared")
        if not row.decode and not row.token_ids:
            raise BackendError(f"seq {row.seq_id}: an empty chunk")
    _check_constraints(plan, constraints, adapters)


def _check_ids(plan: StepPlan) -> None:
    rows = [row.seq_id for row in plan.rows]
    if len(set(rows)) != len(rows):
        raise BackendError(f"a plan names a sequence in two rows: {rows}")
    ended = [*plan.finished, *plan.preempted]
    if len(set(ended)) != len(ended):
        raise BackendError(f"a plan ends a sequence twice: {ended}")
    running = {row.seq_id for row in plan.running} & set(ended)
    if running:
        raise BackendError(f"sequences {sorted(running)} run in the step that ends them")


def _check_constraints(
    plan: StepPlan, constraints: StepConstraints, adapters: Mapping[int, str | None]
) -> None:
    """The hard constraints warmup declared (see `StepConstraints`)."""
    max_rows, max_chunk = constraints.max_rows, constraints.max_chunk
    if max_rows is not None and len(plan.rows) > max_rows:
        raise BackendError(f"{len(plan.rows)} rows in one step; the backend runs {max_rows}")
    for new in plan.new:
        if max_chunk is not None and len(new.token_ids) > max_chunk:
            raise BackendError(
                f"seq {new.seq_id}: a first chunk of {len(new.token_ids)} tokens; the "
                f"longest length bucket is {max_chunk}"
            )
    max_tokens = constraints.max_tokens_per_step
    if max_tokens is not None and plan.num_tokens > max_tokens:
        raise BackendError(f"{plan.num_tokens} tokens in one step; the backend runs {max_tokens}")
    max_adapters = constraints.max_adapters_per_step
    if max_adapters is not None:
        used = {new.adapter_id for new in plan.new} | {
            adapters.get(row.seq_id) for row in plan.running
        }
        named = sorted(adapter for adapter in used if adapter is not None)
        if len(named) > max_adapters:
            raise BackendError(f"adapters {named} in one step; the backend runs {max_adapters}")


def log_calls(calls: list[tuple[str, tuple[int, ...]]], plan: StepPlan) -> None:
    """Append `("prefill", ids of new and chunk rows)` then `("decode", ids of decode
    rows)`, each only when the plan has such rows (the fakes' `calls` log)."""
    prefill = tuple(row.seq_id for row in plan.rows if not _is_decode(row))
    decode = tuple(row.seq_id for row in plan.running if row.decode)
    if prefill:
        calls.append(("prefill", prefill))
    if decode:
        calls.append(("decode", decode))


def logits_ends(row: NewSequence | RunningSequence, length: int) -> range:
    """The prefix lengths whose next-token logits `row` returns, once its sequence holds
    `length` tokens: its last `num_logits` positions.

        history  t0 t1 t2 t3 t4 t5        decode row fed t3 (last token), t4 t5 (drafts)
        ends                 4  5  6      logits after history[:4], [:5], [:6]
    """
    return range(length - row.num_logits + 1, length + 1)


def pad_logits(rows: list[torch.Tensor], vocab_size: int) -> torch.Tensor:
    """Stack per-row logits ([n_r, V] each) into [R, T, V], T = max n_r, zero padding."""
    if not rows:
        return torch.zeros(0, 1, vocab_size)
    width = max(row.shape[0] for row in rows)
    out = torch.zeros(len(rows), width, vocab_size)  # [R, T, V]
    for index, row in enumerate(rows):
        out[index, : row.shape[0]] = row
    return out


def _is_decode(row: NewSequence | RunningSequence) -> bool:
    return isinstance(row, RunningSequence) and row.decode
