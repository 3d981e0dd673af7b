"""The green-list watermark of Kirchenbauer et al., "A Watermark for Large Language Models"
(https://arxiv.org/abs/2301.10226): the batched logit bias and its detector.

NOTE: at each step the previous token seeds a split of the vocabulary into a green
fraction `gamma` and a red rest; watermarked rows add `delta` to every green logit.
TGI draws the split with a `torch.Generator` seeded by `hash_key * previous token` and a
`randperm` per row, which needs a Python loop over rows. Here a token is green when a
counter-based hash of (hash_key * previous token, token id) falls below `gamma`
(SplitMix64, as the sampler's noise): the same kind of pseudo-random split, with each
token green with probability `gamma`, computed for the whole batch in one op on any
device. The detector recomputes the split from the text's own tokens, so it needs
neither the model nor the logits: z = (green - gamma T) / sqrt(T gamma (1 - gamma)).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgi.sampling.noise import keyed_uniform_at, keyed_uniforms, splitmix64

__all__ = ["HASH_KEY", "WatermarkScore", "detect_watermark", "green_mask", "watermark_bias"]

HASH_KEY = 15485863  # the prime TGI (and the paper's reference code) key the split with


def _split_keys(prev_token_ids: torch.Tensor) -> torch.Tensor:
    return splitmix64(prev_token_ids * HASH_KEY)


def green_mask(prev_token_ids: torch.Tensor, vocab_size: int, gamma: torch.Tensor) -> torch.Tensor:
    """Which tokens are green after each row's previous token.

    prev_token_ids: [B] int64; gamma: [B] float32. Returns [B, V] bool.
    """
    uniforms = keyed_uniforms(_split_keys(prev_token_ids), vocab_size)  # [B, V]
    return uniforms < gamma[:, None]


def watermark_bias(
    scores: torch.Tensor, prev_token_ids: torch.Tensor, gamma: torch.Tensor, delta: torch.Tensor
) -> torch.Tensor:
    """`scores` with `delta` added to each row's green tokens (delta 0: row untouched).

    scores: [B, V] float32; prev_token_ids: [B] int64; gamma, delta: [B] float32.
    """
    green = green_mask(prev_token_ids, scores.shape[-1], gamma)  # [B, V]
    return scores + green.to(scores.dtype) * delta[:, None]


@dataclass(frozen=True, slots=True)
class WatermarkScore:
    """The detector's verdict on one text."""

    num_tokens: int  # tokens scored (every token after the first)
    num_green: int  # of those, how many were green
    z_score: float  # standard deviations above what unwatermarked text would score
    p_value: float  # one-sided: chance of this many green tokens without a watermark

    def is_watermarked(self, threshold: float = 4.0) -> bool:
        """The paper's test: z above 4 (a false positive rate of about 3e-5)."""
        return self.z_score > threshold


def detect_watermark(token_ids: Sequence[int], gamma: float = 0.5) -> WatermarkScore:
    """Score `token_ids` for the watermark.

    token_ids: the token before the text (e.g. the prompt's last token), then the text's
    tokens; each token from the second on is checked against the split its predecessor
    seeds. `gamma` must be the server's `WATERMARK_GAMMA`.
    """
    if len(token_ids) < 2:
        raise ValueError("need a context token and at least one token to score")
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"gamma must be inside (0, 1), got {gamma}")
    ids = torch.tensor(list(token_ids), dtype=torch.int64)
    previous, current = ids[:-1], ids[1:]
    green = keyed_uniform_at(_split_keys(previous), current) < gamma  # [T]
    num_tokens, num_green = int(current.numel()), int(green.sum().item())
    expected = gamma * num_tokens
    z_score = (num_green - expected) / math.sqrt(num_tokens * gamma * (1.0 - gamma))
    p_value = 0.5 * math.erfc(z_score / math.sqrt(2.0))
    return WatermarkScore(num_tokens, num_green, z_score, p_value)
