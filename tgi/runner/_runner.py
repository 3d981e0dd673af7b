"""`PagedModelRunner`: contract-v2 step plans over `tgi.models.llama` and a paged KV pool.

NOTE: one forward per step, always. `step(plan)` first drops `finished` and `preempted`
sequences, takes in `new` ones (their whole block table), appends `new_block_ids` to the
running ones, then flattens every row of the plan (first chunks, later chunks, decode
rows with drafts) into one batch of N tokens (`tgi.runner._layout`), so each projection
is one matmul and each weight is read once per step, whatever the mix of rows. The
runner never frees or zeroes a block: it writes the positions a row brings and reads
the ones its table covers; which blocks a sequence owns is the policy's business.

Logits come back for `plan.logits_rows` as `[R, T, V]`: row r's positions first, then
its last position repeated as padding. They are computed only for the flat positions
wanted (`logits_index`), padding included, so the output is one view, no copy:

    rows     chunk (5, want_logits)   decode + 2 drafts   decode
    flat     0 1 2 3 4               5 6 7                8        T = 3
    index    4 4 4                   5 6 7                8 8 8    -> view [3, 3, V]

A step whose rows all return every position at one width (decode rows alike) passes no
index at all.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgi.backend.contract import (
    FedTokens,
    KVCapacity,
    KVUsage,
    Limits,
    NewSequence,
    RunningSequence,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.errors import BackendError
from tgi.models.llama import LlamaForCausalLM, LlamaSpec
from tgi.runner._device import AttentionBackend, ModelForward, RunnerDevice
from tgi.runner._kv import BlockTables, KvPool
from tgi.runner._layout import StepRows, build_step

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_BLOCK_SIZE", "WARMUP_MAX_TOKENS", "PagedModelRunner"]

DEFAULT_BLOCK_SIZE = 16  # tokens per KV block: small enough for prefix reuse
WARMUP_MAX_TOKENS = 512  # warmup's prompt: enough to fault in weights and allocator pools


@dataclass(slots=True)
class _Warm:
    """What warmup made; None before it and after close."""

    limits: Limits
    pool: KvPool
    attention: AttentionBackend
    tables: BlockTables
    capacity: KVCapacity


@dataclass(slots=True)
class _Picks:
    """Which flat positions of the step return logits, found in the pass over its rows."""

    seq_ids: list[int]  # the logits rows, in plan order
    firsts: list[int]  # flat index of each logits row's first logits position
    counts: list[int]  # logits positions of each (num_logits)
    prompts: list[tuple[int, int, int]]  # (seq_id, flat offset, tokens): prompt logits
    uniform: bool  # every row returns every position, all at one width: no index needed
    fed: list[tuple[int, int]]  # (flat index, index into `FedTokens.ids`) of fed tokens


class PagedModelRunner:
    """Runs `tgi.backend.contract` step plans on a device supplied through `RunnerDevice`.

    Lifecycle: `warmup` (sizes and allocates KV, runs one prefill and decode), then any
    number of `step`s and `release`s; `close` once. Calls come from one thread.
    """

    def __init__(
        self,
        model: LlamaForCausalLM,
        device: RunnerDevice,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        """Hand `model` to `device.prepare_model` (quantization, compilation) once."""
        self.spec: LlamaSpec = model.spec
        self.device = device
        self.block_size = block_size
        self._model: LlamaForCausalLM | None = model
        self._eager: ModelForward = device.prepare_model(model)
        self._forward = self._eager  # after warmup: what the device's `prepare_steps` says
        self._lengths: dict[int, int] = {}  # seq_id -> tokens of it in KV
        self._warm: _Warm | None = None

    @property
    def model(self) -> LlamaForCausalLM:
        """The model as the device prepared it; BackendError once closed."""
        return self._require_model()

    @property
    def sharded(self) -> bool:
        """One rank's slice of the model: every rank must be told the same tokens."""
        return self._model is not None and self._model.shard is not None

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token: keys and values of every layer."""
        return self.spec.kv_bytes_per_token(self.device.kv_dtype)

    # -- warmup -------------------------------------------------------------------------

    def warmup(self, limits: Limits) -> WarmupReport:
        """Size and allocate the pool, then run one real prefill and decode over it.

        Raises BackendError when one sequence of `limits.max_total_tokens` does not fit.
        Warming up again drops every sequence and allocates a new pool.
        """
        spec, block_size = self.spec, self.block_size
        self._require_model()
        started = time.perf_counter()
        self.release(list(self._lengths))
        self._warm = None  # free the old pool before allocating the new one
        self._forward = self._eager
        self._warm = self._allocate(limits)
        capacity_tokens = self._warm.capacity.total_tokens
        num_tokens = min(
            limits.max_input_tokens,
            limits.max_batch_prefill_tokens,
            WARMUP_MAX_TOKENS,
            spec.max_position_embeddings or WARMUP_MAX_TOKENS,
            capacity_tokens - 1,
        )
        blocks = tuple(range(-(-(num_tokens + 1) // block_size)))
        prompt = tuple(i % spec.vocab_size for i in range(num_tokens))
        try:
            self.step(StepPlan(new=(NewSequence(-1, prompt, block_ids=blocks),)))
            decode = RunningSequence(-1, num_tokens, decode=True, last_token=0)
            self.step(StepPlan(running=(decode,)))
        except BackendError as exc:
            self._warm = None
            raise BackendError(f"warmup forward of {num_tokens} tokens failed: {exc}") from exc
        finally:
            self.release([-1])
        try:
            self._forward, constraints = self.device.prepare_steps(
                self._eager, self._warm.attention, limits
            )
        except (RuntimeError, ValueError) as exc:  # capturing graphs failed
            self._warm = None
            raise BackendError(f"preparing steps after warmup failed: {exc}") from exc
        seconds = time.perf_counter() - started
        logger.info(
            "paged runner warmup: %d-token prefill + decode in %.3f s; %d blocks of %d tokens "
            "at %d bytes per token (%s KV)",
            num_tokens,
            seconds,
            self._warm.capacity.num_blocks,
            block_size,
            self.bytes_per_token,
            self.device.kv_dtype,
        )
        return WarmupReport(kv=self._warm.capacity, constraints=constraints, seconds=seconds)

    def _allocate(self, limits: Limits) -> _Warm:
        """The pool the device's budget allows, its attention backend, empty tables."""
        block_size, bytes_per_token = self.block_size, self.bytes_per_token
        shard = self._model.shard if self._model is not None else None
        try:
            num_blocks = self.device.num_blocks(limits, block_size, bytes_per_token)
        except BackendError:
            if shard is None:
                raise
            shard[1].min_int(-1)  # the other ranks must not wait for this one
            raise
        if shard is not None:
            # every rank holds the same sequences: the pool is what the tightest one fits
            num_blocks = shard[1].min_int(num_blocks)
            if num_blocks < 0:
                raise BackendError("another rank cannot size its KV pool (see its log)")
        capacity_tokens = num_blocks * block_size
        if capacity_tokens < limits.max_total_tokens:
            raise BackendError(
                f"KV for one sequence of --max-total-tokens {limits.max_total_tokens} needs "
                f"{limits.max_total_tokens * bytes_per_token} bytes but only "
                f"{capacity_tokens} tokens fit; lower --max-total-tokens or give KV more "
                f"memory ({self.device.kv_memory_setting}, --max-batch-total-tokens)"
            )
        pool = self.device.allocate_kv(self.spec, num_blocks, block_size)
        # Rows for the live sequences (they double when more are live at once), columns
        # for the longest sequence's table.
        num_rows = min(limits.max_batch_size or 64, 256)
        return _Warm(
            limits=limits,
            pool=pool,
            attention=self.device.attention(pool, self.spec, limits.max_total_tokens),
            tables=BlockTables(
                -(-limits.max_total_tokens // block_size), num_rows, self.device.device
            ),
            capacity=KVCapacity(
                total_tokens=capacity_tokens,
                bytes_per_token=bytes_per_token,
                block_size=block_size,
                num_blocks=num_blocks,
            ),
        )

    # -- steps --------------------------------------------------------------------------

    def step(self, plan: StepPlan, fed: FedTokens | None = None) -> StepOutput:
        """Apply the plan's changes, then one forward over its rows; see the module NOTE.

        A decode row whose `last_token` is None feeds its token from `fed`, a tensor on
        the device: one gather into the step's input ids, no host copy.

        Raises BackendError for a plan that names a sequence the runner does not hold (or
        one it already holds as new) and when the forward fails; after a failed forward
        the step's sequences are released (their KV is half written).
        """
        warm = self._require_warm()
        if plan.finished:
            self.release(plan.finished)
        if plan.preempted:
            self.release(plan.preempted)
        if not plan.new and not plan.running:
            return StepOutput((), torch.empty((0, 1, self.spec.vocab_size)))
        rows = StepRows()
        picks = self._take_rows(plan, rows, warm.tables, fed)
        index, width, prompts = _logits_index(picks)
        try:
            # IndexError: a table shorter than its row's positions (a broken plan)
            layout = build_step(rows, warm.tables, self.block_size)
            metadata = warm.attention.plan(layout)
            host = [layout.input_ids, layout.positions, *([index] if index is not None else [])]
            if picks.fed:
                host.append(torch.tensor(picks.fed, dtype=torch.long))  # [K, 2]
            input_ids, positions, *wanted = self.device.upload(host)
            if picks.fed:
                assert fed is not None
                where = wanted.pop()
                input_ids[where[:, 0]] = fed.ids[where[:, 1]].to(input_ids.device)
            with torch.inference_mode():
                out = self._forward(
                    input_ids, positions, warm.attention, metadata, wanted[0] if wanted else None
                )  # [M, V]
        except (RuntimeError, IndexError, ValueError) as exc:
            self.release(rows.seq_ids)
            raise BackendError(f"forward of {len(rows.seq_ids)} rows failed: {exc}") from exc
        lengths = self._lengths
        for seq_id, start, count in zip(rows.seq_ids, rows.starts, rows.counts, strict=True):
            lengths[seq_id] = start + count
        num_rows = len(picks.seq_ids)
        logits = out[: num_rows * width].view(num_rows, width, out.shape[-1])  # [R, T, V]
        prompt_logits = {seq_id: out[first : first + n] for seq_id, first, n in prompts}
        return StepOutput(tuple(picks.seq_ids), logits, prompt_logits)

    def _take_rows(
        self, plan: StepPlan, rows: StepRows, tables: BlockTables, fed: FedTokens | None
    ) -> _Picks:
        """Admit `plan.new`, grow the running tables, fill `rows`; say which logits go back
        and which tokens `fed` brings.

        O(rows) and O(blocks appended): tables are never re-read or re-checked here.
        """
        lengths, block_size = self._lengths, self.block_size
        picks = _Picks([], [], [], [], uniform=True, fed=[])
        offset, width = 0, -1
        for new in plan.new:
            count = len(new.token_ids)
            if new.seq_id in lengths:
                raise BackendError(f"seq {new.seq_id} is new in the plan but already live")
            if len(new.block_ids) * block_size < new.start_position + count:
                raise _short_table(new.seq_id, len(new.block_ids), new.start_position + count)
            tables.add(new.seq_id, new.block_ids)
            lengths[new.seq_id] = new.start_position
            rows.append(new.seq_id, new.start_position, new.token_ids)
            if new.want_logits:
                picks.seq_ids.append(new.seq_id)
                picks.firsts.append(offset + count - 1)
                picks.counts.append(1)
            if new.want_prompt_logits:
                picks.prompts.append((new.seq_id, offset, count))
            if not new.want_logits or count != 1 or width not in (-1, 1):
                picks.uniform = False
            width = 1
            offset += count
        for run in plan.running:
            held = lengths.get(run.seq_id)
            if held is None or run.start_position > held:
                raise BackendError(
                    f"seq {run.seq_id} runs at position {run.start_position} but the runner "
                    f"holds {held} of its tokens"
                )
            if run.new_block_ids:
                tables.extend(run.seq_id, run.new_block_ids)
            if run.decode and run.last_token is None:
                if fed is None or run.seq_id not in fed.rows:
                    raise BackendError(f"decode row of seq {run.seq_id} has no last token")
                picks.fed.append((offset, fed.rows[run.seq_id]))
                tokens: tuple[int, ...] = (0, *run.token_ids)  # 0: a place for the fed one
            else:
                tokens = run.input_ids
            num_logits = run.num_logits
            count = len(tokens)
            num_blocks = len(tables.blocks(run.seq_id))
            if num_blocks * block_size < run.start_position + count:
                raise _short_table(run.seq_id, num_blocks, run.start_position + count)
            rows.append(run.seq_id, run.start_position, tokens)
            if num_logits:
                picks.seq_ids.append(run.seq_id)
                picks.firsts.append(offset + count - num_logits)
                picks.counts.append(num_logits)
            if num_logits != count or width not in (-1, count):
                picks.uniform = False
            width = count
            offset += count
        if picks.prompts:
            picks.uniform = False
        return picks

    # -- lifecycle ----------------------------------------------------------------------

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forget the sequences' tables and lengths; their blocks belong to the policy."""
        warm = self._warm
        for seq_id in seq_ids:
            self._lengths.pop(seq_id, None)
            if warm is not None:
                warm.tables.remove(seq_id)
        if warm is not None:
            warm.attention.release(seq_ids)

    def kv_usage(self) -> KVUsage:
        capacity = self._warm.capacity.total_tokens if self._warm is not None else 0
        return KVUsage(
            seq_ids=frozenset(self._lengths),
            used_tokens=sum(self._lengths.values()),
            capacity_tokens=capacity,
        )

    def health(self) -> None:
        """A real one-token forward that writes nothing: it runs on a throwaway pool."""
        self._require_model()
        pool = self.device.allocate_kv(self.spec, 1, self.block_size)
        attention = self.device.attention(pool, self.spec, self.block_size)
        tables = BlockTables(1, 1, self.device.device)
        tables.add(0, (0,))
        rows = StepRows()
        rows.append(0, 0, (0,))
        layout = build_step(rows, tables, self.block_size)
        input_ids, positions = self.device.upload([layout.input_ids, layout.positions])
        try:
            with torch.inference_mode():
                # eager: the throwaway pool is not the one captured graphs read
                logits = self._eager(input_ids, positions, attention, attention.plan(layout))
        except RuntimeError as exc:
            raise BackendError(f"health forward failed: {exc}") from exc
        if not bool(torch.isfinite(logits).all()):
            raise BackendError("health forward produced non-finite logits")

    def close(self) -> None:
        """Drop the pool, the tables and the weights; later calls raise BackendError."""
        self._lengths.clear()
        self._warm = None
        self._model = None
        gc.collect()

    def _require_model(self) -> LlamaForCausalLM:
        if self._model is None:
            raise BackendError("the paged runner was closed")
        return self._model

    def _require_warm(self) -> _Warm:
        self._require_model()
        if self._warm is None:
            raise BackendError("warmup() must run before step()")
        return self._warm


def _short_table(seq_id: int, num_blocks: int, num_tokens: int) -> BackendError:
    return BackendError(f"seq {seq_id} needs {num_tokens} positions but has {num_blocks} blocks")


def _logits_index(
    picks: _Picks,
) -> tuple[torch.Tensor | None, int, list[tuple[int, int, int]]]:
    """(flat positions to compute logits for, or None for all; T; (seq_id, first logits
    row, count) of each prompt-logits row), per the module NOTE."""
    width = max(picks.counts, default=1)
    if picks.uniform:
        return None, width, []
    index: list[int] = []
    for first, count in zip(picks.firsts, picks.counts, strict=True):
        last = first + count - 1
        index.extend(range(first, last + 1))
        index.extend([last] * (width - count))
    prompts = []
    for seq_id, offset, count in picks.prompts:
        prompts.append((seq_id, len(index), count))
        index.extend(range(offset, offset + count))
    return torch.tensor(index, dtype=torch.long), width, prompts
