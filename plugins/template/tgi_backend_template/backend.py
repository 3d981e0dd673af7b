"""The simplest honest backend: a transformers causal LM that recomputes every step.

NOTE: there is no KV cache. The backend keeps each live sequence's token ids and, at
every step, runs the model over each row's whole sequence so far, one row at a time.
That is O(n^2) work per sequence, but it cannot get positions, masks or cache
bookkeeping wrong, so it is the right first step on new hardware: make this pass the
conformance suite on your device, then add a KV cache (change `kv_layout`), then batch
rows into one forward.

One `step(plan)` (contract v2) carries only what changed since the previous step:

    finished, preempted   del history[seq]                      (their KV goes first)
    new                   history[seq]  = row.token_ids         (a sequence starts)
    running               del history[seq][row.start_position:] (rejected drafts)
                          history[seq] += row.input_ids         (a chunk, or the fed
                                                                 token + its drafts)
    then, per logits row  forward(history) -> logits of its last `num_logits` positions

Where your device goes is marked `# DEVICE:`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
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
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.errors import BackendError

if TYPE_CHECKING:
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = ["CAPABILITIES", "TemplateBackend"]

CAPABILITIES = Capabilities(
    batching=Batching.CONTINUOUS,  # rows may join and leave between any two steps
    kv_layout=KvLayout.PER_ROW,  # plans carry no slots or block tables: key state by seq_id
    chunked_prefill=True,  # free here: a chunk only appends to the history
    prompt_logits=True,  # free here: every forward computes every position
    speculation=True,  # free here: drafts are appended, rejected ones cut off next step
)
# Without --max-batch-total-tokens, hold this many full-length sequences. Nothing is
# cached, so the budget bounds the work of one step, not memory.
DEFAULT_MAX_SEQUENCES = 4
# What one held token costs: its id, an int64. Replace with your KV bytes per token
# (2 * layers * kv_heads * head_dim * dtype size) once you keep a cache.
BYTES_PER_TOKEN = 8

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class TemplateBackend:
    """`tgi.backend.Backend` over `transformers.AutoModelForCausalLM`, without KV cache."""

    def __init__(
        self,
        model_dir: Path,
        *,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
    ) -> None:
        """Load the weights from `model_dir` (config.json + safetensors) onto the device."""
        from transformers import AutoModelForCausalLM

        # DEVICE: your device, e.g. torch.device("foo"). Inputs are moved here and logits
        # are returned from here; the core samples on whatever device the logits live on.
        self.device = torch.device("cpu")
        try:
            model: Any = AutoModelForCausalLM.from_pretrained(
                model_dir, dtype=dtype, trust_remote_code=trust_remote_code
            )
        except (OSError, ValueError) as exc:
            raise BackendError(f"cannot load a causal LM from {model_dir}: {exc}") from exc
        # DEVICE: this is also where a compiler or graph capture would wrap the model.
        self._model: Any = model.to(self.device).eval()
        self._vocab_size = int(model.config.get_text_config().vocab_size)
        self._history: dict[int, list[int]] = {}  # seq_id -> every token id it fed so far
        self._capacity: KVCapacity | None = None
        logger.info("template backend loaded %s (%s) on %s", model_dir, dtype, self.device)

    @classmethod
    def from_config(cls, config: ServeConfig, model: ModelFiles) -> TemplateBackend:
        """Build from the validated config; `model.path` is a local model directory."""
        dtype = _DTYPES[config.dtype or "float32"]
        return cls(Path(model.path), dtype=dtype, trust_remote_code=config.trust_remote_code)

    @property
    def capabilities(self) -> Capabilities:
        return CAPABILITIES

    def warmup(self, limits: Limits) -> WarmupReport:
        """Run the costliest step once (one full-length sequence); report the token
        budget. No step shapes to declare: any number of rows and tokens runs."""
        started = time.monotonic()
        capacity = limits.max_batch_total_tokens or limits.max_total_tokens * (
            limits.max_batch_size or DEFAULT_MAX_SEQUENCES
        )
        num_tokens = limits.max_total_tokens
        max_positions = getattr(self._model.config, "max_position_embeddings", None)
        if max_positions is not None and num_tokens > max_positions:
            raise BackendError(
                f"--max-total-tokens {num_tokens} is past the model's context of "
                f"{max_positions} tokens; lower it"
            )
        try:
            self._forward([0] * num_tokens, keep=1)
        except RuntimeError as exc:  # DEVICE: out-of-memory errors land here
            raise BackendError(f"warmup forward of {num_tokens} tokens failed: {exc}") from exc
        self._capacity = KVCapacity(total_tokens=capacity, bytes_per_token=BYTES_PER_TOKEN)
        # DEVICE: a compiled backend declares its shapes here, in `constraints`
        # (StepConstraints: batch_buckets, length_buckets, max_rows_per_step, ...).
        return WarmupReport(kv=self._capacity, seconds=time.monotonic() - started)

    def step(self, plan: StepPlan) -> StepOutput:
        """Drop ended sequences, take in new ones, append every row's tokens, then the
        logits of each row that returns some (its last `num_logits` positions)."""
        self._check(plan)
        for seq_id in (*plan.finished, *plan.preempted):
            self._history.pop(seq_id, None)
        for new in plan.new:
            self._history[new.seq_id] = list(new.token_ids)
        for row in plan.running:
            history = self._history[row.seq_id]
            del history[row.start_position :]  # drafts the core rejected last step
            history.extend(row.input_ids)
        rows_logits: list[torch.Tensor] = []  # each [num_logits, V]
        prompt_logits: dict[int, torch.Tensor] = {}
        for new in plan.new:
            if new.want_prompt_logits:  # one forward serves both
                prompt_logits[new.seq_id] = self._forward(new.token_ids, len(new.token_ids))[0]
        for wanted in plan.logits_rows:
            seq_id, keep = wanted.seq_id, wanted.num_logits
            if seq_id in prompt_logits:
                rows_logits.append(prompt_logits[seq_id][-1:])
            else:
                rows_logits.append(self._forward(self._history[seq_id], keep)[0])
        seq_ids = tuple(wanted.seq_id for wanted in plan.logits_rows)
        return StepOutput(seq_ids, self._pad(rows_logits), prompt_logits)

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self._history.pop(seq_id, None)

    def kv_usage(self) -> KVUsage:
        capacity = self._capacity.total_tokens if self._capacity is not None else 0
        used = sum(len(history) for history in self._history.values())
        return KVUsage(frozenset(self._history), used_tokens=used, capacity_tokens=capacity)

    def health(self) -> None:
        """One real one-token forward; raise BackendError when the device cannot serve."""
        try:
            self._forward([0], keep=1)
        except RuntimeError as exc:
            raise BackendError(f"health forward failed: {exc}") from exc

    def close(self) -> None:
        # DEVICE: free device memory here (e.g. your SDK's empty_cache()).
        self._history.clear()
        self._model = None

    def _forward(self, token_ids: Sequence[int], keep: int) -> torch.Tensor:
        """The whole sequence through the model; logits of its last `keep` positions."""
        if self._model is None:
            raise BackendError("the template backend was closed")
        input_ids = torch.tensor([list(token_ids)], dtype=torch.long, device=self.device)  # [1, n]
        with torch.inference_mode():
            logits = self._model(input_ids=input_ids, use_cache=False).logits  # [1, n, V]
        return logits[:, -keep:].float()  # [1, keep, V]

    def _check(self, plan: StepPlan) -> None:
        """Refuse a plan this backend cannot run before any history changes."""
        if self._capacity is None:
            raise BackendError("warmup() must run before step()")
        ended = {*plan.finished, *plan.preempted}
        held = {s: len(h) for s, h in self._history.items() if s not in ended}
        for new in plan.new:
            if new.start_position != 0:  # no KV, so no cached prefix to start after
                raise BackendError(f"seq {new.seq_id} starts at {new.start_position}")
        for row in plan.running:
            if row.seq_id not in held or row.start_position > held[row.seq_id]:
                raise BackendError(
                    f"seq {row.seq_id} continues at {row.start_position} but "
                    f"{held.get(row.seq_id, 0)} of its tokens are held"
                )
        grown = sum(len(row.input_ids) for row in plan.rows) - sum(
            held[row.seq_id] - row.start_position for row in plan.running
        )
        used = sum(held.values())
        if used + grown > self._capacity.total_tokens:
            raise BackendError(
                f"token budget full: {used} held + {grown} new > "
                f"{self._capacity.total_tokens}; end sequences first"
            )

    def _pad(self, rows_logits: list[torch.Tensor]) -> torch.Tensor:
        """[R, T, V] from each row's [num_logits, V]; T = the most positions, zero padded."""
        width = max((row.shape[0] for row in rows_logits), default=1)
        out = torch.zeros(  # [R, T, V]
            (len(rows_logits), width, self._vocab_size), device=self.device
        )
        for index, row in enumerate(rows_logits):
            out[index, : row.shape[0]] = row
        return out
