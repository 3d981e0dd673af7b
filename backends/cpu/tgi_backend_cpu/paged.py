"""The paged CPU engine: Llama-family models from `tgi.models.llama`, one forward per step.

NOTE: every row of a step (prefill rows, chunks, decode rows with drafts) is flattened
into one batch of N tokens, so each projection is one matmul and each weight is read once
per step, whatever the number of rows. KV lives in a `KvPool` of `num_blocks` blocks the
router allocates (`/work/notes/paged_contract.md`): this backend never frees or zeroes a
block, it only writes the positions a row brings and reads the ones its table covers.
Prefill and decode share one path (`_run`); they differ only in which logits come back.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    DecodeBatch,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    PrefillBatch,
    PrefillRow,
    StepOutput,
)
from tgi.errors import BackendError, ConfigError
from tgi.models.llama import LlamaForCausalLM, load_llama, quantize_model_
from tgi_backend_cpu._host import (
    KV_MEMORY_SETTING,
    MEMINFO,
    check_kv_fits,
    choose_dtype,
    choose_threads,
    kv_budget_bytes,
    read_cpu_info,
)
from tgi_backend_cpu._paged_attention import (
    DenseRows,
    KvPool,
    PagedAttention,
    StepRow,
    build_step,
)

if TYPE_CHECKING:
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_SIZE", "PagedCpuBackend"]

BLOCK_SIZE = 16  # tokens per KV block: small enough for prefix reuse, big enough for tables
# Share of MemAvailable (after the weights loaded) given to the pool when nothing sizes
# it: the pool is allocated up front, and gather buffers and activations need room too.
KV_MEMORY_FRACTION = 0.3
WARMUP_MAX_TOKENS = 512

CAPABILITIES = Capabilities(
    batching=Batching.CONTINUOUS,
    kv_layout=KvLayout.PAGED,
    block_size=BLOCK_SIZE,
    speculation=True,
    prefix_caching=True,
    chunked_prefill=True,
    prompt_logits=True,
)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PagedCpuBackend:
    """`tgi.backend.Backend` over `tgi.models.llama` with a paged KV pool on the CPU."""

    def __init__(
        self,
        model: Path | Any,
        *,
        dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
        num_threads: int | None = None,
        kv_cache_memory: int | None = None,
        quantize: str | None = None,
        dense_kv_bytes: int | None = None,
        meminfo: Path = MEMINFO,
    ) -> None:
        """Load a Llama-family checkpoint (dir, ModelFiles or .gguf); quantize if asked.

        `kv_cache_memory` is the pool's budget in bytes (`ServeConfig.kv_cache_memory`);
        None sizes the pool from MemAvailable at warmup.
        """
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        started = time.perf_counter()
        try:
            self._model: LlamaForCausalLM | None = load_llama(model, dtype)
        except (OSError, KeyError, ValueError) as exc:
            raise BackendError(f"cannot load a Llama-family model from {model}: {exc}") from exc
        if quantize is not None:
            if quantize not in ("int8", "int4"):
                raise ConfigError(f"--quantize {quantize} is not supported by the cpu backend")
            # Decode reads the quantized weights; prefill (48+ rows, where the int kernels
            # lose to float GEMM) keeps a float copy instead of rebuilding it every call:
            # 128-token prefill of SmolLM2 in int4 (bf16) went from ~476 ms to 215-230 ms.
            quantize_model_(self._model, quantize, keep_prefill_weights=True)  # type: ignore[arg-type]
        self.spec = self._model.spec
        self.dtype = dtype
        self.kv_dtype = kv_dtype or dtype
        self._kv_cache_memory = kv_cache_memory
        self._dense_kv_bytes = dense_kv_bytes  # None: as many bytes as the pool; 0: off
        self._meminfo = meminfo
        self._lengths: dict[int, int] = {}  # seq_id -> tokens of it in KV
        self._pool: KvPool | None = None
        self._attention: PagedAttention | None = None
        self._dense: DenseRows | None = None
        self._limits: Limits | None = None
        self._capacity: KVCapacity | None = None
        logger.info(
            "paged cpu engine loaded %s (%s, %d layers, %s%s) in %.2f s with %d threads",
            getattr(model, "path", model),
            self.spec.architecture,
            self.spec.num_layers,
            dtype,
            f", {quantize}" if quantize else "",
            time.perf_counter() - started,
            torch.get_num_threads(),
        )

    @classmethod
    def from_config(cls, config: ServeConfig, model: ModelFiles) -> PagedCpuBackend:
        """Choose dtype, KV dtype and threads from `config` and the host, then load."""
        cpu = read_cpu_info()
        asked = config.dtype if config.source_of("dtype") != "backend cpu" else None
        dtype = choose_dtype(asked, cpu, quantized=config.quantize is not None)
        threads, threads_why = choose_threads(config.cpu_threads, cpu)
        logger.info("paged cpu engine computes in %s because %s", dtype.dtype, dtype.reason)
        logger.info("paged cpu engine uses %d threads (%s)", threads, threads_why)
        kv_dtype = _DTYPES[config.kv_cache_dtype] if config.kv_cache_dtype else None
        return cls(
            model.path,
            dtype=dtype.dtype,
            kv_dtype=kv_dtype,
            num_threads=threads,
            kv_cache_memory=config.kv_cache_memory,
            quantize=config.quantize,
        )

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    @property
    def bytes_per_token(self) -> int:
        return self.spec.kv_bytes_per_token(self.kv_dtype)

    # -- warmup and KV sizing -------------------------------------------------------------

    def warmup(self, limits: Limits) -> KVCapacity:
        """Allocate the pool from the budget, run one real prefill and decode over it."""
        self._require_model()
        num_blocks = self._num_blocks(limits)
        capacity_tokens = num_blocks * BLOCK_SIZE
        if capacity_tokens < limits.max_total_tokens:
            raise BackendError(
                f"KV for one sequence of --max-total-tokens {limits.max_total_tokens} needs "
                f"{limits.max_total_tokens * self.bytes_per_token} bytes but only "
                f"{capacity_tokens} tokens fit; lower --max-total-tokens or give KV more "
                f"memory ({KV_MEMORY_SETTING}, --max-batch-total-tokens)"
            )
        spec = self.spec
        self._pool = KvPool(
            spec.num_layers, num_blocks, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim, self.kv_dtype
        )
        # The dense copy may use as many bytes as the pool (see _paged_attention's NOTE).
        dense_bytes = self._dense_kv_bytes
        if dense_bytes is None:
            dense_bytes = num_blocks * BLOCK_SIZE * self.bytes_per_token
        self._dense = DenseRows(self._pool, limits.max_total_tokens, dense_bytes)
        self._attention = PagedAttention(self._pool, spec.layer_windows, self._dense)
        num_tokens = min(
            limits.max_input_tokens,
            limits.max_batch_prefill_tokens,
            WARMUP_MAX_TOKENS,
            spec.max_position_embeddings or WARMUP_MAX_TOKENS,
            capacity_tokens - 1,
        )
        blocks = tuple(range(-(-(num_tokens + 1) // BLOCK_SIZE)))
        prompt = [i % spec.vocab_size for i in range(num_tokens)]
        started = time.perf_counter()
        try:
            self._forward([-1], [StepRow(prompt, 0, blocks)], None)
            self._forward([-1], [StepRow([0], num_tokens, blocks)], None)
            self._dense.release([-1])
        except RuntimeError as exc:
            raise BackendError(f"warmup forward of {num_tokens} tokens failed: {exc}") from exc
        self._limits = limits
        self._capacity = KVCapacity(
            max_total_tokens=capacity_tokens,
            bytes_per_token=self.bytes_per_token,
            block_size=BLOCK_SIZE,
            num_blocks=num_blocks,
        )
        logger.info(
            "paged cpu engine warmup: %d-token prefill + decode took %.3f s; %d blocks of %d "
            "tokens at %d bytes per token (%s KV)",
            num_tokens,
            time.perf_counter() - started,
            num_blocks,
            BLOCK_SIZE,
            self.bytes_per_token,
            self.kv_dtype,
        )
        return self._capacity

    def _num_blocks(self, limits: Limits) -> int:
        """Blocks the budget allows: the router's token count, else a byte budget."""
        per_block = self.bytes_per_token * BLOCK_SIZE
        if limits.max_batch_total_tokens is not None:
            num_blocks = -(-limits.max_batch_total_tokens // BLOCK_SIZE)
            check_kv_fits(limits.max_batch_total_tokens, num_blocks * per_block, self._meminfo)
            return num_blocks
        budget, source = kv_budget_bytes(self._kv_cache_memory, self._meminfo, KV_MEMORY_FRACTION)
        logger.info("paged cpu engine KV budget %d bytes (%s)", budget, source)
        return budget // per_block

    # -- steps ------------------------------------------------------------------------------

    def prefill(self, batch: PrefillBatch) -> StepOutput:
        """One forward over every row's tokens; logits for the rows that want them."""
        limits = self._require_warm()
        if not batch.rows:
            return StepOutput((), torch.empty((0, 1, self.spec.vocab_size)))
        steps, seen = [], set()
        for row in batch.rows:
            held = self._lengths.get(row.seq_id)
            if row.seq_id in seen or (held is not None and row.start_position != held):
                raise BackendError(
                    f"prefill of seq {row.seq_id} at position {row.start_position}: it is "
                    f"named twice or the backend holds {held} of its tokens"
                )
            seen.add(row.seq_id)
            steps.append(
                self._checked(row.seq_id, row.token_ids, row.start_position, row.block_ids, limits)
            )
        # Flat indices of the logits to compute: the last token of rows wanting logits,
        # every token of rows wanting prompt logits.
        index: list[int] = []
        picks: list[tuple[PrefillRow, int]] = []  # (row, first index into the logits)
        offset = 0
        for row in batch.rows:
            count = len(row.token_ids)
            if row.want_prompt_logits:
                picks.append((row, len(index)))
                index.extend(range(offset, offset + count))
            elif row.want_logits:
                picks.append((row, len(index)))
                index.append(offset + count - 1)
            offset += count
        logits = self._run(batch.rows, steps, index)  # [M, V]
        seq_ids: list[int] = []
        last: list[int] = []
        prompt_logits: dict[int, torch.Tensor] = {}
        for row, first in picks:
            if row.want_prompt_logits:
                prompt_logits[row.seq_id] = logits[first : first + len(row.token_ids)]
                if row.want_logits:
                    seq_ids.append(row.seq_id)
                    last.append(first + len(row.token_ids) - 1)
            else:
                seq_ids.append(row.seq_id)
                last.append(first)
        rows_logits = logits[torch.tensor(last, dtype=torch.long)][:, None]  # [R, 1, V]
        return StepOutput(tuple(seq_ids), rows_logits, prompt_logits)

    def decode(self, batch: DecodeBatch) -> StepOutput:
        """One forward over every row's T tokens; logits [R, T, V]."""
        limits = self._require_warm()
        if not batch.rows:
            return StepOutput((), torch.empty((0, 1, self.spec.vocab_size)))
        width = len(batch.rows[0].token_ids)
        steps, seen = [], set()
        for row in batch.rows:
            held = self._lengths.get(row.seq_id)
            # position < held: the router rewound past rejected drafts.
            if row.seq_id in seen or held is None or row.position > held:
                raise BackendError(
                    f"decode of seq {row.seq_id} at position {row.position}: it is not live, "
                    f"named twice, or past the {held} tokens the backend holds"
                )
            if len(row.token_ids) != width:
                raise BackendError("decode rows must all carry the same number of tokens")
            seen.add(row.seq_id)
            steps.append(
                self._checked(row.seq_id, row.token_ids, row.position, row.block_ids, limits)
            )
        logits = self._run(batch.rows, steps, None)  # [R * T, V]
        return StepOutput(
            tuple(row.seq_id for row in batch.rows), logits.view(len(batch.rows), width, -1)
        )

    def _checked(
        self,
        seq_id: int,
        token_ids: Sequence[int],
        start: int,
        block_ids: Sequence[int],
        limits: Limits,
    ) -> StepRow:
        """Refuse a row before any KV changes: bad ids, short block table, too long."""
        pool = self._require_pool()
        end = start + len(token_ids)
        if not token_ids or min(token_ids) < 0 or max(token_ids) >= self.spec.vocab_size:
            raise BackendError(
                f"seq {seq_id} has no tokens or one outside the vocabulary [0, "
                f"{self.spec.vocab_size})"
            )
        if start < 0 or end > limits.max_total_tokens:
            raise BackendError(
                f"seq {seq_id} would hold {end} tokens, past --max-total-tokens "
                f"{limits.max_total_tokens}"
            )
        if len(block_ids) * BLOCK_SIZE < end:
            raise BackendError(
                f"seq {seq_id} needs {end} positions but its {len(block_ids)} blocks hold "
                f"{len(block_ids) * BLOCK_SIZE}"
            )
        if min(block_ids) < 0 or max(block_ids) >= pool.num_blocks:
            raise BackendError(
                f"seq {seq_id} names a block outside the pool of {pool.num_blocks} blocks"
            )
        return StepRow(token_ids, start, block_ids)

    def _run(
        self, rows: Sequence[Any], steps: list[StepRow], index: list[int] | None
    ) -> torch.Tensor:
        """Forward `steps`, then record each row's new KV length; BackendError on failure."""
        try:
            logits = self._forward([row.seq_id for row in rows], steps, index)
        except RuntimeError as exc:
            for row in rows:  # their KV is half written; the router fails these rows
                self._lengths.pop(row.seq_id, None)
            self.release([row.seq_id for row in rows])
            raise BackendError(f"forward of {len(steps)} rows failed: {exc}") from exc
        for row, step in zip(rows, steps, strict=True):
            self._lengths[row.seq_id] = step.start + len(step.token_ids)
        return logits

    def _forward(
        self, seq_ids: Sequence[int], steps: Sequence[StepRow], index: list[int] | None
    ) -> torch.Tensor:
        model = self._require_model()
        attention, dense = self._attention, self._dense
        if attention is None or dense is None:
            raise BackendError("warmup() must run before prefill or decode")
        rows = dense.assign(seq_ids, steps)
        input_ids, positions, metadata = build_step(
            steps, BLOCK_SIZE, self.spec.layer_windows, rows
        )
        logits_index = torch.tensor(index, dtype=torch.long) if index is not None else None
        with torch.inference_mode():
            return model(input_ids, positions, attention, metadata, logits_index)

    # -- lifecycle ---------------------------------------------------------------------------

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forget the sequences' lengths; their blocks belong to the router."""
        for seq_id in seq_ids:
            self._lengths.pop(seq_id, None)
        if self._dense is not None:
            self._dense.release(seq_ids)

    def kv_usage(self) -> KVUsage:
        capacity = self._capacity.max_total_tokens if self._capacity is not None else 0
        return KVUsage(
            seq_ids=frozenset(self._lengths),
            used_tokens=sum(self._lengths.values()),
            capacity_tokens=capacity,
        )

    def health(self) -> None:
        """A real one-token forward that writes nothing: it runs on a throwaway pool."""
        model = self._require_model()
        spec = self.spec
        pool = KvPool(
            spec.num_layers, 1, BLOCK_SIZE, spec.num_kv_heads, spec.head_dim, self.kv_dtype
        )
        input_ids, positions, metadata = build_step(
            [StepRow([0], 0, (0,))], BLOCK_SIZE, spec.layer_windows
        )
        try:
            with torch.inference_mode():
                logits = model(
                    input_ids, positions, PagedAttention(pool, spec.layer_windows), metadata
                )
        except RuntimeError as exc:
            raise BackendError(f"health forward failed: {exc}") from exc
        if not bool(torch.isfinite(logits).all()):
            raise BackendError("health forward produced non-finite logits")

    def close(self) -> None:
        """Drop the pool and the weights; later calls raise BackendError."""
        self._lengths.clear()
        self._pool = self._attention = self._dense = None
        self._model = None
        gc.collect()

    # -- helpers ----------------------------------------------------------------------------

    def _require_model(self) -> LlamaForCausalLM:
        if self._model is None:
            raise BackendError("the cpu backend was closed")
        return self._model

    def _require_pool(self) -> KvPool:
        if self._pool is None:
            raise BackendError("warmup() must run before prefill or decode")
        return self._pool

    def _require_warm(self) -> Limits:
        self._require_model()
        if self._limits is None or self._pool is None:
            raise BackendError("warmup() must run before prefill or decode")
        return self._limits
