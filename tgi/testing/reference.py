"""The conformance suite's oracle: transformers `generate()` on the same tiny weights."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["ReferenceModel", "make_prompt"]


def make_prompt(seed: int, num_tokens: int, vocab_size: int) -> list[int]:
    """Deterministic token ids in [0, vocab_size), different for each seed."""
    rng = random.Random(seed)
    return [rng.randrange(vocab_size) for _ in range(num_tokens)]


class ReferenceModel:
    """transformers `generate` on the same weights: what greedy decoding must equal."""

    def __init__(self, model_dir: Path, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM

        self._use(AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval())

    @classmethod
    def wrapping(cls, model: Any) -> ReferenceModel:
        """The oracle over a transformers model already in memory."""
        reference = cls.__new__(cls)
        reference._use(model)
        return reference

    def _use(self, model: Any) -> None:
        self.model: Any = model
        self.vocab_size = int(model.config.get_text_config().vocab_size)

    def greedy(
        self, prompt: Sequence[int], max_new_tokens: int, *, stop_at_eos: bool = True
    ) -> list[int]:
        """The new tokens of `generate(do_sample=False)`; fewer when it stops at EOS,
        unless `stop_at_eos` is False (then always `max_new_tokens`)."""
        input_ids = torch.tensor([list(prompt)], dtype=torch.long)  # [1, n]
        config = self.model.generation_config
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        if isinstance(pad, list):
            pad = pad[0]
        with torch.inference_mode():
            out = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                min_new_tokens=None if stop_at_eos else max_new_tokens,
                pad_token_id=pad if pad is not None else 0,
            )
        return [int(token) for token in out[0, len(prompt) :]]

    def prompt_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        """Logits of every prompt position, [n, V] float32, from one full forward."""
        with torch.inference_mode():
            out = self.model(torch.tensor([list(prompt)], dtype=torch.long))
        return out.logits[0].float()
