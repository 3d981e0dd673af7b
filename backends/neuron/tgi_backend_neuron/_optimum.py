"""The real executor: a loaded optimum-neuron (0.4.x) `NxDModelForCausalLM` on Inferentia2/Trainium.

NOTE: the calls follow what optimum-neuron's compiled NxD graphs do with their inputs
(read from optimum-neuron 0.4.5: `modeling_decoder.py`, `decoder_wrappers.py`,
`kv_cache_manager.py`), not what a padded transformers batch would need:

- `forward(input_ids, position_ids, seq_ids, sampling_params)` takes no attention mask.
  A row with more than one token at position 0 goes to the context graph; any other
  row to the token generation (decode) graph.
- The context graph's mask is purely causal and it writes KV by tensor index: a left
  padded row would attend to its pads and shift its KV. So every context row is
  right padded, here, to `max_context_length` with position 0 (the pads' KV lies past
  the row's tokens, where no decode reads it), so the last real token holds the
  largest position, which is where the graph takes its logits.
- With continuous batching the context graph runs one row (`ctx_batch_size` 1) and
  writes the cache line `seq_ids[0]`: one call per new sequence. Without it, it runs
  all B rows and writes line i from row i, whatever `seq_ids` says: one call, row
  index = slot, and every slot not named gets an inert one-token row.
- The decode graph writes each row's KV at its `position_ids` into cache line = row
  index, and a decode batch smaller than B is padded by the wrapper with copies of
  row 0, written into the missing lines (`_forward_with_pad`). So every decode call
  here carries all B rows in slot order; a slot that does not decode gets a padding
  row at the position just past its tokens, which it never reads before its own next
  decode writes that position again.
- A one-token prompt cannot go to the context graph (one token means decode, and a
  one-token row in a multi-row context call would take its logits at a pad), so it is
  decoded at position 0 in its slot.
- A model exported with on-device sampling (optimum-neuron's default for Llama and
  others) returns sampled token ids [n], not logits; each row's (top_k, top_p,
  temperature) travels in `sampling_params`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from tgi.errors import BackendError
from tgi_backend_neuron._sampling import GREEDY, RowSampling

logger = logging.getLogger(__name__)

__all__ = ["OptimumNeuronModel"]


class OptimumNeuronModel:
    """`SlotExecutor` over a loaded optimum-neuron `NxDModelForCausalLM`."""

    def __init__(self, model: Any, *, pad_token_id: int) -> None:
        config = model.neuron_config
        self._model = model
        self._pad = pad_token_id
        self.batch_size = int(config.batch_size)
        self.sequence_length = int(config.sequence_length)
        context = getattr(config, "max_context_length", None) or self.sequence_length
        self.max_context_length = min(int(context), self.sequence_length)
        self.continuous_batching = bool(getattr(config, "continuous_batching", False))
        self.samples_on_device = bool(getattr(config, "on_device_sampling", False))
        self.max_top_k = int(config.max_topk) if self.samples_on_device else None
        if self.max_top_k is not None and self.max_top_k < 1:
            # optimum-neuron's sampler then accepts only top_k=-1, which samples uniformly
            raise BackendError(
                f"the model was exported with on_device_sampling and max_topk="
                f"{self.max_top_k}: its sampler cannot pick greedily. Fix: export it again "
                "with max_topk >= 1 (optimum-neuron's default is 256)"
            )
        self.calls_touch_every_slot = True  # every decode call carries all B rows
        text_config = (
            model.config.get_text_config()
            if hasattr(model.config, "get_text_config")
            else model.config
        )
        self.vocab_size = int(text_config.vocab_size)
        self.dtype = _dtype_of(config)
        self.bytes_per_token = _bytes_per_token(text_config, self.dtype)
        self._lengths = [0] * self.batch_size  # tokens the KV of each slot holds

    def describe(self) -> dict[str, Any]:
        """What the export records beyond the executor's shapes: cores and target."""
        config = self._model.neuron_config
        return {
            "tp_degree": getattr(config, "tp_degree", None),
            "target": getattr(config, "target", None),
        }

    # -- steps ----------------------------------------------------------------------------

    def warmup(self, num_tokens: int) -> None:
        """One context call of `num_tokens` and one decode call, then every slot empty."""
        count = max(2, min(num_tokens, self.max_context_length, self.sequence_length - 1))
        self.prefill([0], [[self._pad] * count])
        self.decode([0], [self._pad], [count])
        self.clear(range(self.batch_size))

    def prefill(
        self,
        slots: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        sampling: Sequence[RowSampling] | None = None,
    ) -> torch.Tensor:
        """Write each slot from position 0; logits [n, V] (or token ids [n]) of each row's
        last token, in the order given. Without continuous batching every other slot
        holds nothing afterwards."""
        rows = [list(tokens) for tokens in token_ids]
        choices = list(sampling) if sampling is not None else [GREEDY] * len(rows)
        results: list[torch.Tensor | None] = [None] * len(rows)
        long_rows = [i for i, row in enumerate(rows) if len(row) > 1]
        for i in long_rows:
            if len(rows[i]) > self.max_context_length:
                raise ValueError(
                    f"a prefill row of {len(rows[i])} tokens for slot {slots[i]} is longer "
                    f"than the compiled context length {self.max_context_length}"
                )
        if self.continuous_batching:
            for i in long_rows:
                results[i] = self._context({slots[i]: (rows[i], choices[i])})[0]
        elif long_rows:
            named = {slots[i]: (rows[i], choices[i]) for i in long_rows}
            out = self._context(named)
            for j, i in enumerate(long_rows):
                results[i] = out[j]
        singles = [i for i, row in enumerate(rows) if len(row) == 1]
        if singles:
            for i in singles:
                self._lengths[slots[i]] = 0
            out = self._decode_call({slots[i]: (rows[i][0], 0, choices[i]) for i in singles})
            for j, i in enumerate(singles):
                results[i] = out[j]
        return torch.stack([result for result in results if result is not None])

    def decode(
        self,
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
        sampling: Sequence[RowSampling] | None = None,
    ) -> torch.Tensor:
        """Feed one token per slot at its position; logits [n, V] (or token ids [n])."""
        choices = list(sampling) if sampling is not None else [GREEDY] * len(slots)
        rows = {}
        for slot, token, position, choice in zip(slots, token_ids, positions, choices, strict=True):
            if position != self._lengths[slot]:
                raise ValueError(
                    f"slot {slot} holds {self._lengths[slot]} tokens; cannot write {position}"
                )
            rows[slot] = (token, position, choice)
        return self._decode_call(rows)

    def clear(self, slots: Sequence[int] | range) -> None:
        for slot in slots:
            self._lengths[slot] = 0

    def health(self) -> None:
        """A decode call of padding rows only: each writes just past its slot's tokens,
        so no live KV changes. Raises when the device fails or answers garbage."""
        out = self._decode_call({}, every_row=True)  # [B, V] or [B]
        if self.samples_on_device:
            if bool(((out < 0) | (out >= self.vocab_size)).any()):
                raise RuntimeError("the health forward returned token ids outside the vocabulary")
        elif not bool(torch.isfinite(out).all()):
            raise RuntimeError("the health forward produced non-finite logits")

    def close(self) -> None:
        self._lengths = [0] * self.batch_size
        self._model = None

    # -- graph calls ----------------------------------------------------------------------

    def _context(self, rows: dict[int, tuple[list[int], RowSampling]]) -> torch.Tensor:
        """One context graph call writing `rows` (slot -> tokens, sampling); the results
        of those rows, in the dict's order. Without continuous batching the call holds
        all B rows, row i for slot i, the absent slots as one pad token."""
        width = self.max_context_length
        slots = list(rows) if self.continuous_batching else list(range(self.batch_size))
        input_ids = torch.full((len(slots), width), self._pad, dtype=torch.long)
        position_ids = torch.zeros((len(slots), width), dtype=torch.long)
        params = []
        for i, slot in enumerate(slots):
            tokens, choice = rows.get(slot, ([self._pad], GREEDY))
            input_ids[i, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
            position_ids[i, : len(tokens)] = torch.arange(len(tokens))
            params.append(choice.as_row())
        out = self._run(input_ids, position_ids, slots, params)
        for slot in slots:
            self._lengths[slot] = len(rows[slot][0]) if slot in rows else 0
        index = [slots.index(slot) for slot in rows]
        return out[index]

    def _decode_call(
        self, rows: dict[int, tuple[int, int, RowSampling]], every_row: bool = False
    ) -> torch.Tensor:
        """One decode graph call over all B slots: `rows` (slot -> token, position,
        sampling) and a padding row for every other slot; results of `rows`, in order
        (of all B rows with `every_row`)."""
        size = self.batch_size
        input_ids = torch.full((size, 1), self._pad, dtype=torch.long)
        position_ids = torch.zeros((size, 1), dtype=torch.long)
        params = []
        for slot in range(size):
            if slot in rows:
                token, position, choice = rows[slot]
            else:  # past this slot's tokens: its own next decode writes there again
                token, position, choice = self._pad, self._lengths[slot], GREEDY
            if position >= self.sequence_length:
                raise ValueError(
                    f"slot {slot} would write position {position}, past the compiled "
                    f"sequence length {self.sequence_length}"
                )
            input_ids[slot, 0] = token
            position_ids[slot, 0] = position
            params.append(choice.as_row())
        out = self._run(input_ids, position_ids, list(range(size)), params)
        for slot, (_, position, _) in rows.items():
            self._lengths[slot] = position + 1
        return out if every_row else out[list(rows)]

    def _run(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        seq_ids: list[int],
        params: list[tuple[float, float, float]],
    ) -> torch.Tensor:
        """The model's forward; logits [n, V] float32, or token ids [n] int64."""
        if self._model is None:
            raise RuntimeError("the neuron model was closed")
        output = self._model.forward(
            input_ids=input_ids,
            position_ids=position_ids,
            seq_ids=torch.tensor(seq_ids, dtype=torch.long),
            sampling_params=torch.tensor(params, dtype=torch.float32),  # [n, 3]
        )
        first = output[0] if isinstance(output, tuple | list) else output
        if self.samples_on_device:
            return first.reshape(-1)[: len(seq_ids)].long()  # [n]
        if first.dim() == 3:
            first = first[:, -1, :]
        return first[: len(seq_ids)].float()  # [n, V]


def _dtype_of(neuron_config: Any) -> torch.dtype:
    """The dtype the model computes in (NxD's `torch_dtype`, a dtype or its name)."""
    value = getattr(neuron_config, "torch_dtype", None)
    if isinstance(value, torch.dtype):
        return value
    if isinstance(value, str):
        resolved = getattr(torch, value.removeprefix("torch."), None)
        if isinstance(resolved, torch.dtype):
            return resolved
    return torch.bfloat16


def _bytes_per_token(text_config: Any, dtype: torch.dtype) -> int:
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or text_config.hidden_size // heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * int(text_config.num_hidden_layers) * kv_heads * head_dim * itemsize
