"""Run a backend on N ranks in N processes, for tests of sharded models.

`greedy_on_ranks(world_size, factory, ...)` spawns the ranks (gloo over loopback), builds
the backend on each from `factory` (an importable "module:callable" taking the model
directory, `group=` and keyword arguments), runs `greedy_steps` on every rank and returns
rank 0's result. `greedy_steps` also runs on a single backend, for the reference.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tgi.backend.contract import Backend, Limits, NewSequence, RunningSequence, StepPlan
from tgi.parallel.env import free_port

__all__ = ["GreedyRun", "greedy_on_ranks", "greedy_steps"]

_BLOCKS_PER_SEQUENCE = 8
_BLOCK_SIZE = 16


@dataclass(frozen=True)
class GreedyRun:
    """What `greedy_steps` saw: each prompt's greedy tokens in the mixed batch, the first
    prompt's tokens when it ran alone, and the mixed batch's first-step logits."""

    tokens: list[list[int]]
    alone: list[int]
    first_logits: torch.Tensor  # [rows, vocab]


def greedy_steps(
    backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> GreedyRun:
    """Warm up; run the first prompt alone, then every prompt in one mixed prefill step
    followed by decode steps of all of them together, greedily."""
    backend.warmup(
        Limits(
            max_input_tokens=64,
            max_total_tokens=_BLOCKS_PER_SEQUENCE * _BLOCK_SIZE,
            max_batch_prefill_tokens=256,
            max_batch_total_tokens=len(prompts) * _BLOCKS_PER_SEQUENCE * _BLOCK_SIZE,
            max_batch_size=len(prompts),
        )
    )
    alone, _ = _greedy(backend, prompts[:1], max_new_tokens)
    tokens, first_logits = _greedy(backend, prompts, max_new_tokens)
    return GreedyRun(tokens, alone[0], first_logits)


def _greedy(
    backend: Backend, prompts: Sequence[Sequence[int]], max_new_tokens: int
) -> tuple[list[list[int]], torch.Tensor]:
    new = tuple(
        NewSequence(
            seq_id,
            tuple(prompt),
            block_ids=tuple(
                range(seq_id * _BLOCKS_PER_SEQUENCE, (seq_id + 1) * _BLOCKS_PER_SEQUENCE)
            ),
        )
        for seq_id, prompt in enumerate(prompts)
    )
    output = backend.step(StepPlan(new=new))
    assert output.logits is not None, "greedy_steps needs a backend that returns logits"
    first_logits = output.logits[:, -1].clone()
    tokens = [[int(t)] for t in first_logits.argmax(-1)]
    lengths = [len(prompt) for prompt in prompts]
    for _ in range(max_new_tokens - 1):
        running = tuple(
            RunningSequence(seq_id, lengths[seq_id], decode=True, last_token=tokens[seq_id][-1])
            for seq_id in range(len(prompts))
        )
        output = backend.step(StepPlan(running=running))
        assert output.logits is not None
        for seq_id, token in enumerate(output.logits[:, -1].argmax(-1).tolist()):
            tokens[seq_id].append(int(token))
            lengths[seq_id] += 1
    backend.release(list(range(len(prompts))))
    return tokens, first_logits


def greedy_on_ranks(
    world_size: int,
    factory: str,
    model_dir: Path,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    **kwargs: Any,
) -> GreedyRun:
    """`greedy_steps` on `world_size` ranks of `factory`'s backend; rank 0's result."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as scratch:
        result = Path(scratch) / "rank0.pt"
        mp.start_processes(
            _rank_main,
            args=(
                world_size,
                free_port(),
                factory,
                str(model_dir),
                [list(p) for p in prompts],
                max_new_tokens,
                kwargs,
                str(result),
            ),
            nprocs=world_size,
            start_method="spawn",
        )
        saved = torch.load(result)
    return GreedyRun(saved["tokens"], saved["alone"], saved["first_logits"])


def _rank_main(
    rank: int,
    world_size: int,
    port: int,
    factory: str,
    model_dir: str,
    prompts: list[list[int]],
    max_new_tokens: int,
    kwargs: dict[str, Any],
    result: str,
) -> None:
    from tgi.parallel import set_rank_group
    from tgi.parallel.group import ShardGroup

    os.environ.update(
        {
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
        }
    )
    torch.set_num_threads(1)
    group = ShardGroup.join(rank, world_size)
    set_rank_group(group)
    module, _, name = factory.partition(":")
    build: Callable[..., Backend] = getattr(importlib.import_module(module), name)
    backend = build(Path(model_dir), group=group, **kwargs)
    run = greedy_steps(backend, prompts, max_new_tokens)
    if rank == 0:
        torch.save(
            {"tokens": run.tokens, "alone": run.alone, "first_logits": run.first_logits}, result
        )
    backend.close()
    group.close()
