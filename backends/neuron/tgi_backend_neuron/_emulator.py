"""A Neuron executor for machines without Inferentia: the same static KV, in torch on CPU.

NOTE: what is emulated is the memory layout and the slot semantics a compiled Neuron
model has: per layer, one preallocated key and one value tensor of shape
`[B, kv_heads, L, head_dim]`; a prefill rewrites a slot from position 0 and takes rows
of at most `max_context_length` tokens (the context graph's size), a decode writes one
position, a cleared slot holds nothing. Without continuous batching the compiled
prefill runs the whole batch, so every slot a prefill does not name holds nothing
afterwards: a caller that forgets to rebuild a live slot fails at its next decode, as
it would on the device. What is *not* emulated is the padded compute: each slot's
attention runs over its own valid prefix only, in float32, as one batch-of-one forward
called exactly as `generate()` calls the model (`input_ids` of the new tokens,
`position_ids`, no attention mask; see backends/cpu/backend.py). So greedy
output is token-for-token that of transformers, the property the conformance suite and
the backend's rebuild tests check.

Per forward, a slot's prefix is copied from the static tensors into a transformers
`DynamicCache`, whose `update` also writes the new positions back into the slot:

    static K[layer]:  [B, H, L, D]     slot s, valid prefix n
         K[layer][s, :, :n]  ──seed──►  DynamicCache  ──forward(k new tokens)──►
         K[layer][s, :, n:n+k]  ◄──────── update() of the k new positions
"""

from __future__ import annotations

import functools
import gc
import inspect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from tgi_backend_neuron._sampling import GREEDY, RowSampling

logger = logging.getLogger(__name__)

__all__ = ["EmulatedNeuronModel"]


class EmulatedNeuronModel:
    """`SlotExecutor` over a transformers causal LM on the CPU, with static slot KV."""

    def __init__(
        self,
        model_dir: Path,
        *,
        batch_size: int,
        sequence_length: int,
        continuous_batching: bool,
        max_context_length: int | None = None,
        dtype: torch.dtype = torch.float32,
        trust_remote_code: bool = False,
        on_device_sampling: bool = False,
        max_top_k: int = 256,
    ) -> None:
        from transformers import AutoModelForCausalLM

        if batch_size <= 0 or sequence_length <= 0:
            raise ValueError("the emulator needs a positive batch size and sequence length")
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=trust_remote_code
        )
        self._model: Any = model.eval()
        self._text_config = model.config.get_text_config(decoder=True)
        self._has_logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.batch_size = batch_size
        self.sequence_length = sequence_length
        self.max_context_length = min(max_context_length or sequence_length, sequence_length)
        self.continuous_batching = continuous_batching
        self.samples_on_device = on_device_sampling
        self.calls_touch_every_slot = False  # slot by slot: a failure touches its own rows
        self.max_top_k: int | None = max_top_k if on_device_sampling else None
        self._generator = torch.Generator().manual_seed(0)  # the device's own RNG
        self.vocab_size = int(model.config.get_text_config().vocab_size)
        self.dtype = dtype
        self._keys: list[torch.Tensor] = []  # per layer [B, H, L, D]
        self._values: list[torch.Tensor] = []
        self._lengths = [0] * batch_size  # valid prefix of each slot
        self._shapes = self._layer_shapes()
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.bytes_per_token = sum(2 * heads * dim * itemsize for heads, dim in self._shapes)

    # -- layout ---------------------------------------------------------------------------

    def _layer_shapes(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of every layer, read from a one-token forward."""
        shapes: dict[int, tuple[int, int]] = {}

        def record(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            shapes[layer] = (int(keys.shape[1]), int(keys.shape[-1]))

        self._forward(_new_cache(self._text_config, record), [0], 0)
        return [shapes[layer] for layer in sorted(shapes)]

    def warmup(self, num_tokens: int) -> None:
        """Allocate [B, H, L, D] keys and values per layer, prefill slot 0 once, clear it."""
        if not self._keys:
            for heads, dim in self._shapes:
                shape = (self.batch_size, heads, self.sequence_length, dim)
                self._keys.append(torch.zeros(shape, dtype=self.dtype))
                self._values.append(torch.zeros(shape, dtype=self.dtype))
        count = max(1, min(num_tokens, self.max_context_length))
        self.prefill([0], [[token % self.vocab_size for token in range(count)]])
        self.clear([0])

    # -- steps ----------------------------------------------------------------------------

    def prefill(
        self,
        slots: Sequence[int],
        token_ids: Sequence[Sequence[int]],
        sampling: Sequence[RowSampling] | None = None,
    ) -> torch.Tensor:
        """Rewrite each slot from position 0; logits [n, V] (or sampled ids [n]) of each
        row's last token. Without continuous batching, the slots not named are wiped."""
        for slot, tokens in zip(slots, token_ids, strict=True):
            if len(tokens) > self.max_context_length:
                raise ValueError(
                    f"a prefill row of {len(tokens)} tokens for slot {slot} is longer than "
                    f"the compiled context length {self.max_context_length}"
                )
        if not self.continuous_batching:
            named = set(slots)
            self.clear([slot for slot in range(self.batch_size) if slot not in named])
        rows = []
        for slot, tokens in zip(slots, token_ids, strict=True):
            self._lengths[slot] = 0
            rows.append(self._run(slot, tokens, 0))
        return self._results(torch.cat(rows, dim=0), sampling)

    def decode(
        self,
        slots: Sequence[int],
        token_ids: Sequence[int],
        positions: Sequence[int],
        sampling: Sequence[RowSampling] | None = None,
    ) -> torch.Tensor:
        """One token per slot at its position; logits [n, V] (or sampled ids [n])."""
        rows = []
        for slot, token, position in zip(slots, token_ids, positions, strict=True):
            if position != self._lengths[slot]:
                raise ValueError(
                    f"slot {slot} holds {self._lengths[slot]} tokens; cannot write {position}"
                )
            rows.append(self._run(slot, [token], position))
        return self._results(torch.cat(rows, dim=0), sampling)

    def _results(
        self, logits: torch.Tensor, sampling: Sequence[RowSampling] | None
    ) -> torch.Tensor:
        """`logits` [n, V], or with on-device sampling the token each row's
        `RowSampling` picks from them (top_k=1: the argmax)."""
        if not self.samples_on_device:
            return logits
        choices = list(sampling) if sampling is not None else [GREEDY] * logits.shape[0]
        picked = [self._sample(row, choice) for row, choice in zip(logits, choices, strict=True)]
        return torch.tensor(picked, dtype=torch.long)  # [n]

    def _sample(self, logits: torch.Tensor, choice: RowSampling) -> int:
        """What a top-k / top-p / temperature sampler draws from `logits` [V]."""
        if choice.top_k == 1:
            return int(torch.argmax(logits))
        top = torch.topk(logits / choice.temperature, min(choice.top_k, logits.shape[-1]))
        probs = torch.softmax(top.values, dim=-1)
        outside = torch.cumsum(probs, dim=-1) - probs >= choice.top_p  # keep at least one
        probs = probs.masked_fill(outside, 0.0)
        index = torch.multinomial(probs, 1, generator=self._generator)
        return int(top.indices[index])

    def describe(self) -> dict[str, object]:
        """Nothing beyond the shapes every executor has (the backend reports those)."""
        return {}

    def _run(self, slot: int, tokens: Sequence[int], start: int) -> torch.Tensor:
        end = start + len(tokens)
        if not self._keys:
            raise RuntimeError("the emulator's KV is not allocated: warmup() first")
        if end > self.sequence_length:
            raise ValueError(f"slot {slot} would hold {end} tokens, past {self.sequence_length}")

        def write(layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            self._keys[layer][slot, :, start:end] = keys[0]  # keys: [1, H, k, D]
            self._values[layer][slot, :, start:end] = values[0]

        cache = _new_cache(self._text_config, write)
        if start:
            for layer, (keys, values) in enumerate(zip(self._keys, self._values, strict=True)):
                cache.seed(
                    layer, keys[slot : slot + 1, :, :start], values[slot : slot + 1, :, :start]
                )
        logits = self._forward(cache, tokens, start)  # [1, V]
        self._lengths[slot] = end
        return logits

    def _forward(self, cache: Any, tokens: Sequence[int], start: int) -> torch.Tensor:
        """One batch-of-one forward as generate() makes it; logits [1, V] of the last token."""
        input_ids = torch.tensor([list(tokens)], dtype=torch.long)  # [1, k]
        position_ids = torch.arange(start, start + len(tokens)).unsqueeze(0)  # [1, k]
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._has_logits_to_keep else {}
        with torch.inference_mode():
            out = self._model(
                input_ids=input_ids,
                position_ids=position_ids,
                past_key_values=cache,
                use_cache=True,
                return_dict=True,
                **kwargs,
            )
        return out.logits[:, -1].float()

    def clear(self, slots: Sequence[int]) -> None:
        """Forget the slots; their stale tensors are never read (length 0)."""
        for slot in slots:
            self._lengths[slot] = 0

    def health(self) -> None:
        """A one-token forward on a throwaway cache: no slot is touched."""
        logits = self._forward(_new_cache(self._text_config, None), [0], 0)
        if not bool(torch.isfinite(logits).all()):
            raise RuntimeError("the emulator's health forward produced non-finite logits")

    def close(self) -> None:
        self._keys.clear()
        self._values.clear()
        self._model = None
        gc.collect()


def _new_cache(text_config: Any, sink: Any) -> Any:
    """A DynamicCache that reports every update to `sink(layer, keys, values)`."""
    return _slot_cache_class()(text_config, sink)


@functools.cache
def _slot_cache_class() -> type:
    """Built on first use, so importing this module does not import transformers."""
    from transformers import DynamicCache

    class SlotCache(DynamicCache):  # type: ignore[misc]
        def __init__(self, config: Any, sink: Any) -> None:
            super().__init__(config=config)
            self._sink = sink

        def seed(self, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
            """Load a slot's prefix without writing it back."""
            DynamicCache.update(self, keys, values, layer)

        def update(  # the model calls this once per layer per forward
            self,
            key_states: torch.Tensor,
            value_states: torch.Tensor,
            layer_idx: int,
            *args: Any,
            **kwargs: Any,
        ) -> Any:
            if self._sink is not None:
                self._sink(layer_idx, key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return SlotCache
