"""The simplest honest backend: a transformers causal LM that recomputes every step.

NOTE: there is no KV cache. The backend keeps each live sequence's token ids and, at
every prefill and decode, runs the model over the whole sequence so far, one row at a
time. That is O(n^2) work per sequence, but it cannot get positions, masks or cache
bookkeeping wrong, so it is the right first step on new hardware: make this pass the
conformance suite on your device, then add a KV cache (change `kv_layout`), then batch
rows into one forward.

    prefill(rows)  history[seq] += row.token_ids      forward(history) -> logits of last
    decode(rows)   history[seq] += row.token_ids      forward(history) -> logits of last T

Where your device goes is marked `# DEVICE:`.
"""

from __future__ import annotations

import logging
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
    StepOutput,
)
from tgi.errors import BackendError

if TYPE_CHECKING:
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = ["CAPABILITIES", "TemplateBackend"]

CAPABILITIES = Capabilities(
    batching=Batching.CONTINUOUS,  # rows may join and leave between any two steps
    kv_layout=KvLayout.PER_ROW,  # the router sends no slots or block tables
    chunked_prefill=True,  # free here: a chunk only appends to the history
    prompt_logits=True,  # free here: every forward computes every position
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

    def warmup(self, limits: Limits) -> KVCapacity:
        """Run the costliest step once (one full-length sequence); return the token budget."""
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
        self._capacity = KVCapacity(max_total_tokens=capacity, bytes_per_token=BYTES_PER_TOKEN)
        return self._capacity

    def prefill(self, batch: PrefillBatch) -> StepOutput:
        """Append each row's tokens; logits of the last position of rows that want them."""
        self._check_room(sum(len(row.token_ids) for row in batch.rows))
        seq_ids: list[int] = []
        rows_logits: list[torch.Tensor] = []  # each [1, 1, V]
        prompt_logits: dict[int, torch.Tensor] = {}
        for row in batch.rows:
            history = self._history.setdefault(row.seq_id, [])
            if row.start_position != len(history):
                raise BackendError(
                    f"prefill of seq {row.seq_id} starts at {row.start_position} but "
                    f"{len(history)} of its tokens are held"
                )
            history.extend(row.token_ids)
            if not (row.want_logits or row.want_prompt_logits):
                continue  # nothing to compute: the next step recomputes from the history
            keep = len(row.token_ids) if row.want_prompt_logits else 1
            logits = self._forward(history, keep)  # [1, keep, V]
            if row.want_logits:
                seq_ids.append(row.seq_id)
                rows_logits.append(logits[:, -1:])
            if row.want_prompt_logits:
                prompt_logits[row.seq_id] = logits[0]  # [n, V]
        return StepOutput(tuple(seq_ids), self._stack(rows_logits, 1), prompt_logits)

    def decode(self, batch: DecodeBatch) -> StepOutput:
        """Append each row's tokens; logits [R, T, V] for each of them."""
        self._check_room(sum(len(row.token_ids) for row in batch.rows))
        rows_logits = []  # each [1, T, V]
        for row in batch.rows:
            history = self._history.get(row.seq_id)
            if history is None or row.position != len(history):
                raise BackendError(
                    f"decode of seq {row.seq_id} at {row.position} does not "
                    "continue a live sequence"
                )
            history.extend(row.token_ids)
            rows_logits.append(self._forward(history, keep=len(row.token_ids)))
        width = len(batch.rows[0].token_ids) if batch.rows else 1
        return StepOutput(tuple(row.seq_id for row in batch.rows), self._stack(rows_logits, width))

    def release(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self._history.pop(seq_id, None)

    def kv_usage(self) -> KVUsage:
        capacity = self._capacity.max_total_tokens if self._capacity is not None else 0
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

    def _check_room(self, new_tokens: int) -> None:
        """Refuse a step past the warmup budget before any history changes."""
        if self._capacity is None:
            raise BackendError("warmup() must run before prefill or decode")
        used = sum(len(history) for history in self._history.values())
        if used + new_tokens > self._capacity.max_total_tokens:
            raise BackendError(
                f"token budget full: {used} held + {new_tokens} new > "
                f"{self._capacity.max_total_tokens}; release sequences first"
            )

    def _stack(self, rows_logits: list[torch.Tensor], width: int) -> torch.Tensor:
        if not rows_logits:
            return torch.empty((0, width, self._vocab_size), device=self.device)
        return torch.cat(rows_logits, dim=0)  # [R, T, V]
