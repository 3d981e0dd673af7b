"""Host overhead per step: building a step's tensors (layout, metadata, block tables),
not the model forward, under contract v1 (whole tables each step) and v2 (persistent).

    .venv/bin/python benchmarks/host_overhead.py [--rows 32,256] [--blocks 8,128,512]
        [--repeat 5] [--out benchmarks/results/<date>-host-overhead.json]

Four measurements per (rows, table length, tokens per row), each the median of every
step of `--repeat` cycles of 16 decode steps (so 1/16 of the rows start a new block each
step, as in a steady-state decode):

- `v1 layout`: what the paged CPU engine did at 521365e: each row carried its whole
  block table (`DecodeRow.block_ids`), `_checked` scanned it (ids, table bounds) and
  `build_step` turned the tables into a tensor whenever the step left the one-token
  fast path (`_any_rows`). The code is copied below (`_v1_*`), with the limits it
  checks as constants.
- `v2 tables`: `tgi.runner` with the same rows, device-neutral part only: the appended
  block ids go into the persistent `BlockTables`, then `build_step` (input ids,
  positions, pool slots);
- `v2 layout`: the same plus the CPU attention's `plan_step` (SDPA masks, dense slots):
  the like-for-like counterpart of `v1 layout`.
- `v2 step`: all of `PagedModelRunner.step(plan)` but the forward (a stub returning
  zero logits): plan ingestion, tables, layout, dense rows, SDPA metadata, logits index.

"tokens per row" 1 is plain decode (the one-token fast path of both versions); 2 is a
decode row with one draft (the general path). Positions sit at the end of each table, so
a longer table is also a longer context: the SDPA masks (`[R, 1, T, L]` bools, both
versions) grow with it; the tables themselves no longer do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from itertools import chain
from pathlib import Path
from typing import Any

import torch
from tgi_backend_cpu._paged_attention import CpuPagedAttention, DenseRows, plan_step

from tgi.backend.contract import Limits, NewSequence, RunningSequence, StepPlan
from tgi.models.llama import LlamaForCausalLM, LlamaSpec
from tgi.runner import BlockTables, KvPool, PagedModelRunner, StepRows, build_step

BLOCK_SIZE = 16
RESULTS = Path(__file__).resolve().parent / "results"
SPEC = LlamaSpec.from_hf(
    {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 64,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "max_position_embeddings": 1 << 16,
    }
)
WINDOWS = SPEC.layer_windows


# -- v1 (521365e: backends/cpu/tgi_backend_cpu/_paged_attention.py and paged.py) ---------


@dataclass(frozen=True, slots=True)
class _V1Row:
    token_ids: Sequence[int]
    start: int
    block_ids: Sequence[int]


@dataclass(frozen=True, slots=True)
class _V1Metadata:
    num_rows: int
    max_queries: int
    max_keys: int
    slots: torch.Tensor
    query_index: torch.Tensor | None
    masks: dict[int | None, torch.Tensor | None]
    key_slots: torch.Tensor | None = None
    dense_slots: torch.Tensor | None = None
    dense_rows: torch.Tensor | None = None


def _v1_checked(token_ids: Sequence[int], start: int, block_ids: Sequence[int]) -> _V1Row:
    """`PagedCpuBackend._checked` at 521365e, run per row per step."""
    end = start + len(token_ids)
    if not token_ids or min(token_ids) < 0 or max(token_ids) >= SPEC.vocab_size:
        raise ValueError("token outside the vocabulary")
    if start < 0 or end > 1 << 20:
        raise ValueError("too long")
    if len(block_ids) * BLOCK_SIZE < end:
        raise ValueError("short table")
    if min(block_ids) < 0 or max(block_ids) >= 1 << 30:
        raise ValueError("block outside the pool")
    return _V1Row(token_ids, start, block_ids)


def _v1_build_step(
    rows: Sequence[_V1Row],
    block_size: int,
    windows: Sequence[int | None],
    dense: tuple[Sequence[int], int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, _V1Metadata]:
    one_token = all(len(row.token_ids) == 1 for row in rows)
    if dense is not None and one_token and list(dense[0]) == list(range(len(rows))):
        return _v1_one_token_rows(rows, block_size, windows, dense[1])
    return _v1_any_rows(rows, block_size, windows, dense)


def _v1_any_rows(
    rows: Sequence[_V1Row],
    block_size: int,
    windows: Sequence[int | None],
    dense: tuple[Sequence[int], int] | None,
) -> tuple[torch.Tensor, torch.Tensor, _V1Metadata]:
    counts = [len(row.token_ids) for row in rows]
    ends = [row.start + n for row, n in zip(rows, counts, strict=True)]
    num_steps, max_queries, max_keys = len(rows), max(counts), max(ends)
    num_blocks = -(-max_keys // block_size)
    table = torch.tensor(
        [
            list(row.block_ids[:num_blocks]) + [0] * (num_blocks - len(row.block_ids))
            for row in rows
        ],
        dtype=torch.long,
    )  # [R_step, num_blocks]
    ids = list(chain.from_iterable(row.token_ids for row in rows))
    input_ids = torch.tensor(ids, dtype=torch.long)
    counts_t = torch.tensor(counts, dtype=torch.long)
    row_of = torch.arange(num_steps).repeat_interleave(counts_t)
    first = torch.cumsum(counts_t, 0) - counts_t
    t_of = torch.arange(len(ids)) - first[row_of]
    positions = torch.tensor([row.start for row in rows], dtype=torch.long)[row_of] + t_of
    slots = table[row_of, positions // block_size] * block_size + positions % block_size
    batch_row = list(range(num_steps))
    num_rows, dense_rows, dense_slots = num_steps, None, None
    if dense is not None:
        rows_in_dense, cap = dense
        dense_t = torch.tensor(list(rows_in_dense), dtype=torch.long)
        dense_slots = dense_t[row_of] * cap + positions
        high = max(rows_in_dense) + 1
        if list(rows_in_dense) == batch_row:
            pass
        elif 2 * num_steps >= high and min(counts) == max_queries:
            batch_row, num_rows = list(rows_in_dense), high
        else:
            dense_rows = dense_t
    batch_t = torch.tensor(batch_row, dtype=torch.long)
    query_index = batch_t[row_of] * max_queries + t_of
    query_pos = torch.zeros(num_rows * max_queries, dtype=torch.long)
    query_pos[query_index] = positions
    query_pos = query_pos.view(num_rows, max_queries)
    full = max_queries == 1 and min(ends) == max_keys and num_rows == num_steps
    masks = _v1_masks(query_pos, max_keys, windows, full)
    key_pos = torch.arange(max_keys)
    identity = batch_row == list(range(num_steps)) and min(counts) == max_queries
    key_slots = None
    if dense is None:
        key_slots = table[:, key_pos // block_size] * block_size + key_pos % block_size
        key_slots = key_slots.reshape(-1)
    metadata = _V1Metadata(
        num_rows=num_rows,
        max_queries=max_queries,
        max_keys=max_keys,
        slots=slots,
        query_index=None if identity else query_index,
        masks=masks,
        key_slots=key_slots,
        dense_slots=dense_slots,
        dense_rows=dense_rows,
    )
    return input_ids, positions, metadata


def _v1_one_token_rows(
    rows: Sequence[_V1Row], block_size: int, windows: Sequence[int | None], cap: int
) -> tuple[torch.Tensor, torch.Tensor, _V1Metadata]:
    positions = [row.start for row in rows]
    slots = [
        row.block_ids[p // block_size] * block_size + p % block_size
        for row, p in zip(rows, positions, strict=True)
    ]
    max_keys = max(positions) + 1
    query_pos = torch.tensor(positions, dtype=torch.long)
    masks = _v1_masks(query_pos[:, None], max_keys, windows, full=min(positions) + 1 == max_keys)
    metadata = _V1Metadata(
        num_rows=len(rows),
        max_queries=1,
        max_keys=max_keys,
        slots=torch.tensor(slots, dtype=torch.long),
        query_index=None,
        masks=masks,
        dense_slots=torch.tensor([r * cap + p for r, p in enumerate(positions)], dtype=torch.long),
    )
    input_ids = torch.tensor([row.token_ids[0] for row in rows], dtype=torch.long)
    return input_ids, query_pos, metadata


def _v1_masks(
    query_pos: torch.Tensor, max_keys: int, windows: Sequence[int | None], full: bool
) -> dict[int | None, torch.Tensor | None]:
    key_pos = torch.arange(max_keys)
    masks: dict[int | None, torch.Tensor | None] = {}
    for window in set(windows):
        if full and (window is None or window >= max_keys):
            masks[window] = None
            continue
        causal = key_pos[None, None, :] <= query_pos[:, :, None]
        if window is not None:
            causal = causal & (key_pos > query_pos[:, :, None] - window)
        masks[window] = causal[:, None]
    return masks


# -- the steady-state decode both versions run --------------------------------------------


@dataclass(slots=True)
class _Rows:
    """R sequences of ~`num_blocks` blocks each, 16 decode steps from where they start."""

    tables: list[list[int]]  # the scheduler's tables (v1 sends them whole each step)
    positions: list[int]
    tokens_per_row: int

    @classmethod
    def start(cls, num_rows: int, num_blocks: int, tokens_per_row: int) -> _Rows:
        # Row r starts r % 16 positions into its last block but one, so over 16 steps
        # every row crosses one block boundary and its table ends at num_blocks blocks.
        positions = [(num_blocks - 2) * BLOCK_SIZE + r % BLOCK_SIZE for r in range(num_rows)]
        tables = [
            list(range(r * num_blocks, r * num_blocks + -(-(p + 1) // BLOCK_SIZE)))
            for r, p in zip(range(num_rows), positions, strict=True)
        ]
        return cls(tables, positions, tokens_per_row)

    def advance(self) -> list[tuple[int, ...]]:
        """Move every row on by one step; the blocks each appended to cover it."""
        appended = []
        for r, table in enumerate(self.tables):
            self.positions[r] += 1
            end = self.positions[r] + self.tokens_per_row
            new = []
            while len(table) * BLOCK_SIZE < end:
                table.append(table[-1] + 1)
                new.append(table[-1])
            appended.append(tuple(new))
        return appended


def _timed(samples: list[float], fn: Callable[[], Any]) -> None:
    started = time.perf_counter_ns()
    fn()
    samples.append((time.perf_counter_ns() - started) / 1000)


def _v1_step(
    plan: list[tuple[tuple[int, ...], int, tuple[int, ...]]], dense: tuple[list[int], int]
) -> None:
    """The v1 engine's host work on one decode plan: check each row, then lay out."""
    _v1_build_step([_v1_checked(*row) for row in plan], BLOCK_SIZE, WINDOWS, dense)


def _v1_layout(num_rows: int, num_blocks: int, tokens: int, repeat: int) -> list[float]:
    samples: list[float] = []
    dense = (list(range(num_rows)), num_blocks * BLOCK_SIZE)
    for _ in range(repeat):
        rows = _Rows.start(num_rows, num_blocks, tokens)
        rows.advance()
        for _ in range(BLOCK_SIZE):
            # the v1 plan: every row's whole table, as a tuple, every step
            plan = [
                (tuple([1] * tokens), p, tuple(t))
                for p, t in zip(rows.positions, rows.tables, strict=True)
            ]
            _timed(samples, partial(_v1_step, plan, dense))
            rows.advance()
    return samples


def _v2_tables(num_rows: int, num_blocks: int, tokens: int, repeat: int) -> list[float]:
    return _v2_layout(num_rows, num_blocks, tokens, repeat, metadata=False)


def _v2_layout(
    num_rows: int, num_blocks: int, tokens: int, repeat: int, *, metadata: bool = True
) -> list[float]:
    samples: list[float] = []
    dense = (list(range(num_rows)), num_blocks * BLOCK_SIZE)
    for _ in range(repeat):
        rows = _Rows.start(num_rows, num_blocks, tokens)
        tables = BlockTables(num_blocks, num_rows)
        for r, table in enumerate(rows.tables):
            tables.add(r, table)
        appended = rows.advance()
        for _ in range(BLOCK_SIZE):
            positions = list(rows.positions)

            def step(
                appended: list[tuple[int, ...]] = appended,
                positions: list[int] = positions,
                tables: BlockTables = tables,
            ) -> None:
                step_rows = StepRows()
                for r, new in enumerate(appended):
                    if new:
                        tables.extend(r, new)
                    step_rows.append(r, positions[r], [1] * tokens)
                layout = build_step(step_rows, tables, BLOCK_SIZE)
                if metadata:
                    plan_step(layout, WINDOWS, dense)

            _timed(samples, step)
            appended = rows.advance()
    return samples


class _StubDevice:
    """A `RunnerDevice` whose forward returns zero logits: the step minus the model."""

    device = torch.device("cpu")
    kv_dtype = torch.float32
    kv_memory_setting = "none"

    def __init__(self, num_blocks: int) -> None:
        self._num_blocks = num_blocks

    def prepare_model(self, model: LlamaForCausalLM) -> Any:
        def forward(
            input_ids: torch.Tensor,
            positions: torch.Tensor,
            attention: Any,
            metadata: Any = None,
            logits_index: torch.Tensor | None = None,
        ) -> torch.Tensor:
            rows = input_ids.shape[0] if logits_index is None else logits_index.shape[0]
            return torch.zeros((rows, SPEC.vocab_size))

        return forward

    def num_blocks(self, limits: Limits, block_size: int, bytes_per_token: int) -> int:
        return self._num_blocks

    def allocate_kv(self, spec: LlamaSpec, num_blocks: int, block_size: int) -> KvPool:
        return KvPool(1, num_blocks, block_size, 1, 8, torch.float32)

    def attention(self, pool: KvPool, spec: LlamaSpec, max_length: int) -> CpuPagedAttention:
        return CpuPagedAttention(pool, WINDOWS, DenseRows(pool, max_length, 1 << 40))


def _v2_step(num_rows: int, num_blocks: int, tokens: int, repeat: int) -> list[float]:
    with torch.device("meta"):
        model = LlamaForCausalLM(SPEC)
    runner = PagedModelRunner(model, _StubDevice(num_rows * num_blocks + 1))
    max_total = (num_blocks + 1) * BLOCK_SIZE
    runner.warmup(Limits(16, max_total, 64, None, num_rows))
    samples: list[float] = []
    for _ in range(repeat):
        rows = _Rows.start(num_rows, num_blocks, tokens)
        # admitted at the start position's KV; the step computes only what follows
        runner.step(
            StepPlan(
                new=tuple(
                    NewSequence(r, (1,), p, tuple(t), want_logits=False)
                    for r, (p, t) in enumerate(zip(rows.positions, rows.tables, strict=True))
                )
            )
        )
        appended = rows.advance()
        for _ in range(BLOCK_SIZE):
            plan = StepPlan(
                running=tuple(
                    RunningSequence(
                        r, p, (1,) * (tokens - 1), decode=True, last_token=1, new_block_ids=new
                    )
                    for r, (p, new) in enumerate(zip(rows.positions, appended, strict=True))
                )
            )
            _timed(samples, partial(runner.step, plan))
            appended = rows.advance()
        runner.release(list(range(num_rows)))
    return samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,256")
    parser.add_argument("--blocks", default="8,128,512")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    # One intra-op thread by default: these are small ops, and on a busy host an OpenMP
    # region waiting for a descheduled second thread costs a scheduler tick (~8 ms
    # medians measured on a shared 2-core box), which would swamp what is measured here.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    print(
        f"{'rows':>5} {'blocks':>6} {'tok/row':>7} {'v1 layout':>10} {'v2 tables':>10} "
        f"{'v2 layout':>10} {'v2 step':>10}  (median us per step)"
    )
    for num_rows in (int(n) for n in args.rows.split(",")):
        for num_blocks in (int(n) for n in args.blocks.split(",")):
            for tokens in (1, 2):
                medians = {
                    name: statistics.median(fn(num_rows, num_blocks, tokens, args.repeat))
                    for name, fn in (
                        ("v1_layout_us", _v1_layout),
                        ("v2_tables_layout_us", _v2_tables),
                        ("v2_layout_metadata_us", _v2_layout),
                        ("v2_step_us", _v2_step),
                    )
                }
                results.append(
                    {"rows": num_rows, "blocks": num_blocks, "tokens_per_row": tokens, **medians}
                )
                print(
                    f"{num_rows:5d} {num_blocks:6d} {tokens:7d} "
                    + " ".join(f"{value:10.1f}" for value in medians.values())
                )
    out = args.out or RESULTS / f"{datetime.date.today().isoformat()}-host-overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "host_overhead",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "block_size": BLOCK_SIZE,
        "steps_per_sample": 1,
        "samples_per_case": args.repeat * BLOCK_SIZE,
        "results": results,
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
