"""The generic fallback backend: any transformers causal LM, one KV cache per sequence.

NOTE: correctness over speed. Each row runs as a batch of one with its own
`DynamicCache`, called exactly the way `GenerationMixin.generate` calls the model for a
batch of one in transformers 5.x (`generation/utils.py`: `_prepare_cache_for_generation`,
`_prefill`, `prepare_inputs_for_generation`):

- cache: `DynamicCache(config=model.config.get_text_config(decoder=True))`;
- inputs: `input_ids` [1, n] of the new tokens only, `position_ids` [1, n] counting on
  from the tokens already cached, `attention_mask=None` (generate drops an all-ones mask),
  `use_cache=True`, `logits_to_keep=1` unless more positions are wanted.

So greedy decoding through this backend is token-for-token what `generate` gives on the
same weights, whatever else shares the step: rows never pad against each other. The
price: a step of R rows (new chunks and decode rows mixed) runs R forwards, one per row,
not the one forward per step of the paged engine (`tgi_backend_cpu.paged`).

KV accounting: the core's policy keeps the total within the capacity `warmup` reported
and each sequence within `Limits.max_total_tokens` (the contract's promise, not
re-checked here); the backend counts the tokens it wrote per sequence for `kv_usage`.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tgi.backend.contract import (
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    NewSequence,
    StepConstraints,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.errors import BackendError
from tgi_backend_cpu._host import (
    KV_MEMORY_SETTING,
    MEMINFO,
    check_kv_fits,
    choose_dtype,
    choose_threads,
    kv_budget_bytes,
    read_cpu_info,
)

if TYPE_CHECKING:
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = ["KV_MEMORY_FRACTION", "WARMUP_MAX_TOKENS", "TransformersCpuBackend"]

# Share of MemAvailable (measured after the weights loaded) given to KV when neither
# --max-batch-total-tokens nor --kv-cache-memory (TGI_KV_CACHE_MEMORY) says: DynamicCache
# grows by concatenation, so a layer briefly holds two copies, and activations need room.
KV_MEMORY_FRACTION = 0.5
# Warmup runs one prompt of at most this many tokens: enough to fault in the weights and
# allocator pools; SmolLM2-135M takes about 1 s for it on two cores.
WARMUP_MAX_TOKENS = 512

CAPABILITIES = Capabilities(
    batching=Batching.CONTINUOUS,
    kv_layout=KvLayout.PER_ROW,
    chunked_prefill=True,  # a row may continue at start_position == tokens it holds
    prompt_logits=True,
)


@dataclass(slots=True)
class _Sequence:
    """The KV state of one live sequence."""

    cache: Any  # transformers DynamicCache
    num_tokens: int  # tokens written into `cache`; the next token's position


class TransformersCpuBackend:
    """`tgi.backend.Backend` over a transformers `AutoModelForCausalLM` on the CPU."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: torch.dtype = torch.float32,
        num_threads: int | None = None,
        kv_cache_memory: int | None = None,
        trust_remote_code: bool = False,
        meminfo: Path = MEMINFO,
    ) -> None:
        """Load the weights from `model_dir` (config.json + safetensors) in eval mode.

        `kv_cache_memory` is the KV budget in bytes (`ServeConfig.kv_cache_memory`); None
        sizes KV from MemAvailable at warmup.
        """
        from transformers import AutoModelForCausalLM

        if num_threads is not None:
            torch.set_num_threads(num_threads)
        self._kv_cache_memory = kv_cache_memory
        self._meminfo = meminfo
        started = time.perf_counter()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load a causal LM from {model_dir}: {exc}") from exc
        self._model: Any = model.eval()
        self.dtype = dtype
        self._text_config = model.config.get_text_config(decoder=True)
        self._vocab_size = int(model.config.get_text_config().vocab_size)
        # generate() sets logits_to_keep=1 where forward() accepts it; mirror that.
        self._has_logits_to_keep = "logits_to_keep" in _forward_parameters(model)
        self._seqs: dict[int, _Sequence] = {}
        self._limits: Limits | None = None
        self._capacity: KVCapacity | None = None
        logger.info(
            "cpu backend loaded %s (%s, %s) in %.2f s with %d threads",
            model_dir,
            type(model).__name__,
            dtype,
            time.perf_counter() - started,
            torch.get_num_threads(),
        )

    @classmethod
    def from_config(cls, config: ServeConfig, model: ModelFiles) -> TransformersCpuBackend:
        """Choose dtype and threads from `config` and the host, then load `model`."""
        cpu = read_cpu_info()
        # A dtype filled in by our own validate hook is our default, not the user's ask.
        asked = config.dtype if config.source_of("dtype") != "backend cpu" else None
        dtype = choose_dtype(asked, cpu)
        threads, threads_why = choose_threads(config.cpu_threads, cpu)
        logger.info("cpu backend for %s: %s", model.model_id, cpu.describe())
        logger.info("cpu backend computes in %s because %s", dtype.dtype, dtype.reason)
        logger.info("cpu backend uses %d threads (%s)", threads, threads_why)
        return cls(
            model.path,
            dtype=dtype.dtype,
            num_threads=threads,
            kv_cache_memory=config.kv_cache_memory,
            trust_remote_code=config.trust_remote_code,
        )

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    # -- warmup and KV sizing -------------------------------------------------------------

    @property
    def bytes_per_token(self) -> int:
        """KV bytes of one token: keys and values of every layer."""
        cfg = self._text_config
        num_heads = int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or num_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads)
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        return 2 * int(cfg.num_hidden_layers) * kv_heads * head_dim * itemsize

    def warmup(self, limits: Limits) -> WarmupReport:
        """Size KV from the memory budget, run one real prefill, report the capacity."""
        model = self._require_model()
        capacity_tokens = self._kv_capacity_tokens(limits)
        if capacity_tokens < limits.max_total_tokens:
            raise BackendError(
                f"KV for one sequence of --max-total-tokens {limits.max_total_tokens} needs "
                f"{limits.max_total_tokens * self.bytes_per_token} bytes but only "
                f"{capacity_tokens} tokens ({capacity_tokens * self.bytes_per_token} bytes) "
                f"fit; lower --max-total-tokens or give KV more memory ({KV_MEMORY_SETTING}, "
                "--max-batch-total-tokens)"
            )
        max_positions = getattr(self._text_config, "max_position_embeddings", None)
        num_tokens = min(
            limits.max_input_tokens,
            limits.max_batch_prefill_tokens,
            WARMUP_MAX_TOKENS,
            max_positions or WARMUP_MAX_TOKENS,
        )
        token_ids = torch.arange(num_tokens, dtype=torch.long) % self._vocab_size  # [n]
        started = time.perf_counter()
        try:
            self._forward(self._new_cache(), token_ids.tolist(), 0, keep=1)
        except RuntimeError as exc:
            raise BackendError(f"warmup forward of {num_tokens} tokens failed: {exc}") from exc
        elapsed_s = time.perf_counter() - started
        self._limits = limits
        self._capacity = KVCapacity(
            total_tokens=capacity_tokens, bytes_per_token=self.bytes_per_token
        )
        logger.info(
            "cpu backend warmup: %d-token prefill took %.3f s; KV holds %d tokens at %d "
            "bytes each (%s)",
            num_tokens,
            elapsed_s,
            capacity_tokens,
            self.bytes_per_token,
            type(model).__name__,
        )
        return WarmupReport(self._capacity, StepConstraints(), seconds=elapsed_s)

    def _kv_capacity_tokens(self, limits: Limits) -> int:
        """Tokens of KV the budget allows: the router's number, else a memory budget."""
        per_token = self.bytes_per_token
        if limits.max_batch_total_tokens is not None:
            needed = limits.max_batch_total_tokens * per_token
            check_kv_fits(limits.max_batch_total_tokens, needed, self._meminfo)
            return limits.max_batch_total_tokens
        budget, source = kv_budget_bytes(self._kv_cache_memory, self._meminfo, KV_MEMORY_FRACTION)
        logger.info("cpu backend KV budget %d bytes (%s)", budget, source)
        return budget // per_token

    # -- steps ------------------------------------------------------------------------------

    def step(self, plan: StepPlan) -> StepOutput:
        """Drop `finished` and `preempted`, start caches for `new`, then run each row as a
        batch of one (see the module NOTE); logits [R, T, V] for `plan.logits_rows`.

        Raises BackendError for a row of a sequence it does not hold, at another
        position than the tokens it holds, and when a forward fails.
        """
        self._require_warm()
        if plan.finished:
            self.release(plan.finished)
        if plan.preempted:
            self.release(plan.preempted)
        self._check(plan)
        for new in plan.new:
            self._seqs[new.seq_id] = _Sequence(self._new_cache(), 0)
        seq_ids: list[int] = []
        rows_logits: list[torch.Tensor] = []  # each [1, num_logits, V]
        prompt_logits: dict[int, torch.Tensor] = {}
        for row in plan.rows:
            token_ids = row.input_ids  # decode rows have their last token (`_check`)
            prompt = isinstance(row, NewSequence) and row.want_prompt_logits
            keep = len(token_ids) if prompt else max(row.num_logits, 1)
            logits = self._run(row.seq_id, self._seqs[row.seq_id], token_ids, keep)
            if row.num_logits:  # logits: [1, keep, V]
                seq_ids.append(row.seq_id)
                rows_logits.append(logits[:, keep - row.num_logits :])
            if prompt:
                prompt_logits[row.seq_id] = logits[0].float()  # [n, V]
        return StepOutput(tuple(seq_ids), self._stack(rows_logits), prompt_logits)

    def _check(self, plan: StepPlan) -> None:
        """Refuse a broken plan before any cache changes: O(1) per row."""
        for new in plan.new:
            if new.seq_id in self._seqs or new.start_position != 0:
                raise BackendError(
                    f"seq {new.seq_id} is new at position {new.start_position}; the backend "
                    "holds it already or cannot share a cached prefix"
                )
        for run in plan.running:
            if run.decode and run.last_token is None:
                raise BackendError(
                    f"decode row of seq {run.seq_id} reached a backend without a token"
                )
            seq = self._seqs.get(run.seq_id)
            if seq is None or run.start_position != seq.num_tokens:
                held = seq.num_tokens if seq is not None else None
                raise BackendError(
                    f"seq {run.seq_id} runs at position {run.start_position} but the backend "
                    f"holds {held} of its tokens"
                )

    def _run(
        self, seq_id: int, seq: _Sequence, token_ids: Sequence[int], keep: int
    ) -> torch.Tensor:
        """Forward one row; on failure drop its half-written cache and raise BackendError.

        Rows earlier in the same step have advanced by then; the core fails and
        releases every sequence of a step that raised.
        """
        try:
            logits = self._forward(seq.cache, token_ids, seq.num_tokens, keep)
        except RuntimeError as exc:
            self._seqs.pop(seq_id, None)
            raise BackendError(f"forward of seq {seq_id} failed: {exc}") from exc
        seq.num_tokens += len(token_ids)
        return logits

    def _forward(self, cache: Any, token_ids: Sequence[int], start: int, keep: int) -> torch.Tensor:
        """One batch-of-one forward as generate() makes it; logits [1, keep, V]."""
        model = self._require_model()
        num_tokens = len(token_ids)
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long)  # [1, n]
        position_ids = torch.arange(start, start + num_tokens).unsqueeze(0)  # [1, n]
        kwargs: dict[str, Any] = {"logits_to_keep": keep} if self._has_logits_to_keep else {}
        with torch.inference_mode():
            out = model(
                input_ids=input_ids,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
                **kwargs,
            )
        return out.logits[:, -keep:]

    def _stack(self, rows_logits: list[torch.Tensor]) -> torch.Tensor:
        """[R, T, V] float32 from rows of [1, t, V]: T the widest, the narrower padded
        with their last position."""
        if not rows_logits:
            return torch.empty((0, 1, self._vocab_size), dtype=torch.float32)
        width = max(logits.shape[1] for logits in rows_logits)
        padded = [
            torch.cat([logits, logits[:, -1:].expand(1, width - logits.shape[1], -1)], dim=1)
            if logits.shape[1] < width
            else logits
            for logits in rows_logits
        ]
        return torch.cat(padded, dim=0).float()

    # -- lifecycle ---------------------------------------------------------------------------

    def release(self, seq_ids: Sequence[int]) -> None:
        """Drop the caches of `seq_ids`; ids that hold nothing are ignored."""
        for seq_id in seq_ids:
            self._seqs.pop(seq_id, None)

    def kv_usage(self) -> KVUsage:
        used = sum(seq.num_tokens for seq in self._seqs.values())
        capacity = self._capacity.total_tokens if self._capacity is not None else 0
        return KVUsage(seq_ids=frozenset(self._seqs), used_tokens=used, capacity_tokens=capacity)

    def health(self) -> None:
        """A real one-token forward on a throwaway cache; raise BackendError if it fails."""
        try:
            logits = self._forward(self._new_cache(), [0], 0, keep=1)
        except RuntimeError as exc:
            raise BackendError(f"health forward failed: {exc}") from exc
        if not bool(torch.isfinite(logits).all()):
            raise BackendError("health forward produced non-finite logits")

    def close(self) -> None:
        """Drop every cache and the weights; later calls raise BackendError."""
        self._seqs.clear()
        self._model = None
        gc.collect()

    # -- helpers ----------------------------------------------------------------------------

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        return DynamicCache(config=self._text_config)

    def _require_model(self) -> Any:
        if self._model is None:
            raise BackendError("the cpu backend was closed")
        return self._model

    def _require_warm(self) -> None:
        self._require_model()
        if self._limits is None or self._capacity is None:
            raise BackendError("warmup() must run before step()")


def _forward_parameters(model: Any) -> frozenset[str]:
    import inspect

    return frozenset(inspect.signature(model.forward).parameters)
