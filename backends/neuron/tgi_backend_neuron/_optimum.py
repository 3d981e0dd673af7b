"""The real executor: optimum-neuron's `NeuronModelForCausalLM` on Inferentia2/Trainium.

Needs the Neuron SDK (the `neuron` extra); imported only when the backend is created on
a machine whose probe found devices. The calls mirror how TGI's own Neuron server drives
the model (text-generation-inference, backends/neuron, generator.py):

- prefill: rows left-padded to the longest one with an attention mask (0 on padding),
  `seq_ids` = the slots to write, through `prepare_inputs_for_prefill`;
- decode: the pending token of each slot, the slot's mask grown by one (so the model
  derives position = tokens in the slot), through `prepare_inputs_for_decode`;
- a model compiled without continuous batching runs the whole batch [B, ...] every
  time: absent slots are filled with a one-token dummy row that nobody reads. A
  prefill's dummy rows overwrite the absent slots (the backend re-prefills every live
  one in the same call). A decode's dummy row for a live slot (one its step's prefill
  just wrote) carries that slot's mask grown by one, so it writes one position past
  the slot's tokens, which its next decode writes again: its KV stays as it was.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tgi.errors import BackendError
from tgi_backend_neuron._options import normalize_cast_type
from tgi_backend_neuron._plan import NeuronPlan

logger = logging.getLogger(__name__)

__all__ = ["OptimumNeuronModel", "export_kwargs"]


def export_kwargs(plan: NeuronPlan) -> dict[str, Any]:
    """The export parameters of `plan`, as `NeuronModelForCausalLM.from_pretrained` takes
    them with `export=True`; unset ones are left to optimum-neuron's defaults."""
    shape = plan.shape
    kwargs: dict[str, Any] = {
        "batch_size": shape.batch_size,
        "sequence_length": shape.sequence_length,
    }
    if shape.num_cores is not None:
        kwargs["num_cores"] = shape.num_cores
    if shape.auto_cast_type is not None:
        kwargs["auto_cast_type"] = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}[
            shape.auto_cast_type
        ]
    return kwargs


class OptimumNeuronModel:
    """`SlotExecutor` over a loaded `NeuronModelForCausalLM`."""

    def __init__(self, model: Any, *, pad_token_id: int) -> None:
        config = model.neuron_config
        self._model = model
        self._pad = pad_token_id
        self.batch_size = int(config.batch_size)
        self.sequence_length = int(config.sequence_length)
        context = getattr(config, "max_context_length", None) or self.sequence_length
        self.max_context_length = min(int(context), self.sequence_length)
        self.continuous_batching = bool(getattr(config, "continuous_batching", False))
        text_config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.vocab_size = int(text_config.vocab_size)
        self.dtype = _dtype_of(config)
        self.bytes_per_token = _bytes_per_token(text_config, self.dtype)
        self._masks: dict[int, torch.Tensor] = {}  # slot -> attention mask row [n], 1 = token

    @classmethod
    def load(cls, plan: NeuronPlan, model_dir: Path, *, pad_token_id: int) -> OptimumNeuronModel:
        """Load the exported variant, or export `model_dir` with the plan's parameters."""
        from optimum.neuron import NeuronModelForCausalLM

        started = time.perf_counter()
        if plan.export:
            kwargs = export_kwargs(plan)
            logger.info("neuron: exporting %s with %s (minutes, once per shape)", model_dir, kwargs)
            model = NeuronModelForCausalLM.from_pretrained(str(model_dir), export=True, **kwargs)
        else:
            path = plan.shape.path or model_dir
            logger.info("neuron: loading the exported model %s", path)
            model = NeuronModelForCausalLM.from_pretrained(str(path))
        logger.info("neuron: model ready in %.1f s", time.perf_counter() - started)
        loaded = cls(model, pad_token_id=pad_token_id)
        if (loaded.batch_size, loaded.sequence_length) != (
            plan.shape.batch_size,
            plan.shape.sequence_length,
        ):
            raise BackendError(
                f"the loaded model runs batch_size={loaded.batch_size}, sequence_length="
                f"{loaded.sequence_length}, but start-up validated {plan.shape.describe()}"
            )
        return loaded

    # -- steps ----------------------------------------------------------------------------

    def warmup(self, num_tokens: int) -> None:
        count = max(1, min(num_tokens, self.max_context_length))
        self.prefill([0], [[self._pad] * count])
        self.clear([0])

    def prefill(self, slots: Sequence[int], token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
        rows = [list(tokens) for tokens in token_ids]
        run_slots = list(slots)
        if not self.continuous_batching:  # the compiled prefill always takes all B rows
            absent = [slot for slot in range(self.batch_size) if slot not in set(slots)]
            run_slots += absent
            rows += [[self._pad]] * len(absent)
        width = max(len(row) for row in rows)
        input_ids = torch.full((len(rows), width), self._pad, dtype=torch.long)  # [n, W]
        mask = torch.zeros((len(rows), width), dtype=torch.long)  # [n, W], left padding
        for i, row in enumerate(rows):
            input_ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        seq_ids = torch.tensor(run_slots, dtype=torch.long)
        inputs = self._model.prepare_inputs_for_prefill(
            input_ids, attention_mask=mask, seq_ids=seq_ids
        )
        logits = _last_logits(self._model(**inputs))  # [n, V]
        for slot in run_slots[len(slots) :]:  # now hold a dummy row
            self._masks.pop(slot, None)
        for i, slot in enumerate(slots):
            self._masks[slot] = mask[i].clone()
        return logits[: len(slots)]

    def decode(
        self, slots: Sequence[int], token_ids: Sequence[int], positions: Sequence[int]
    ) -> torch.Tensor:
        run_slots, tokens = list(slots), list(token_ids)
        masks = []
        for slot, position in zip(slots, positions, strict=True):
            if slot not in self._masks:
                raise ValueError(f"slot {slot} holds no tokens; cannot decode at {position}")
            grown = self._grown(slot)
            if int(grown.sum()) != position + 1:
                raise ValueError(f"slot {slot} holds {int(grown.sum()) - 1} tokens, not {position}")
            masks.append(grown)
        if not self.continuous_batching:  # the compiled decode always takes all B rows
            absent = [slot for slot in range(self.batch_size) if slot not in set(slots)]
            run_slots += absent
            tokens += [self._pad] * len(absent)
            masks += [self._grown(slot) for slot in absent]  # live: past its tokens
        width = max(len(mask) for mask in masks)
        mask = torch.zeros((len(masks), width), dtype=torch.long)  # [n, W]
        for i, row in enumerate(masks):
            mask[i, : len(row)] = row
        input_ids = torch.tensor(tokens, dtype=torch.long).unsqueeze(1)  # [n, 1]
        seq_ids = torch.tensor(run_slots, dtype=torch.long)
        inputs = self._model.prepare_inputs_for_decode(
            input_ids, attention_mask=mask, seq_ids=seq_ids
        )
        logits = _last_logits(self._model(**inputs))  # [n, V]
        for slot, grown in zip(slots, masks, strict=False):
            self._masks[slot] = grown
        return logits[: len(slots)]

    def _grown(self, slot: int) -> torch.Tensor:
        """The slot's mask with one more position (one position for an empty slot)."""
        held = self._masks.get(slot, torch.zeros(0, dtype=torch.long))
        return torch.cat([held, torch.ones(1, dtype=torch.long)])

    def clear(self, slots: Sequence[int]) -> None:
        for slot in slots:
            self._masks.pop(slot, None)

    def health(self) -> None:
        """A one-token prefill on a free slot. When that would touch live KV (no slot
        free, or no continuous batching and any slot live) the running steps vouch."""
        free = [slot for slot in range(self.batch_size) if slot not in self._masks]
        if not free or (not self.continuous_batching and self._masks):
            return
        logits = self.prefill([free[0]], [[self._pad]])
        self.clear([free[0]])
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("the health forward produced non-finite logits")

    def close(self) -> None:
        self._masks.clear()
        self._model = None


def _last_logits(output: Any) -> torch.Tensor:
    """Logits [n, V] of the last position from the model's output ([n, T, V] or [n, V])."""
    logits = output[0] if isinstance(output, tuple | list) else getattr(output, "logits", output)
    if logits.dim() == 3:
        logits = logits[:, -1, :]
    return logits.float()


def _dtype_of(neuron_config: Any) -> torch.dtype:
    """The dtype the model computes in: NxD's `torch_dtype`, or a legacy cast type name."""
    value = getattr(neuron_config, "torch_dtype", None) or getattr(
        neuron_config, "auto_cast_type", None
    )
    if isinstance(value, torch.dtype):
        return value
    try:
        return getattr(torch, normalize_cast_type(str(value)))  # type: ignore[no-any-return]
    except ValueError:
        return torch.bfloat16


def _bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * int(text_config.num_hidden_layers) * kv_heads * head_dim * itemsize
