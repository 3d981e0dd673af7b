"""The batched sampler: logits of many rows with different parameters -> next tokens.

NOTE: per-row parameters live in [B] tensors built once per batch membership
(`SamplingBatch.build`); `sample` runs only torch ops, skips every stage no row
needs (decided on the host when the batch is built, so no device sync), and returns
device tensors. The router makes the step's single device-to-host copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tgi.sampling.noise import uniform_noise
from tgi.sampling.params import SamplingParams

__all__ = ["SampleOutput", "SamplingBatch", "sample"]


@dataclass(frozen=True, slots=True)
class SamplingBatch:
    """Per-row sampling parameters as tensors, plus which stages any row needs."""

    do_sample: torch.Tensor  # [B] bool
    temperature: torch.Tensor  # [B] float32
    top_k: torch.Tensor  # [B] int64, vocab size where off
    top_p: torch.Tensor  # [B] float32
    seeds: torch.Tensor  # [B] int64
    any_sample: bool
    any_temperature: bool
    max_top_k: int  # 0 when no row uses top-k
    any_top_p: bool

    @classmethod
    def build(
        cls, params: Sequence[SamplingParams], vocab_size: int, device: torch.device
    ) -> SamplingBatch:
        top_k = [p.top_k if p.top_k > 0 else vocab_size for p in params]
        return cls(
            do_sample=torch.tensor([p.do_sample for p in params], device=device),
            temperature=torch.tensor([p.temperature for p in params], device=device),
            top_k=torch.tensor(top_k, dtype=torch.int64, device=device),
            top_p=torch.tensor([p.top_p for p in params], device=device),
            seeds=torch.tensor(
                [_seed_bits(p.seed) for p in params], dtype=torch.int64, device=device
            ),
            any_sample=any(p.do_sample for p in params),
            any_temperature=any(p.temperature != 1.0 for p in params),
            max_top_k=max((k for k in top_k if k < vocab_size), default=0),
            any_top_p=any(p.top_p < 1.0 for p in params),
        )


def _seed_bits(seed: int) -> int:
    """A u64 seed (TGI's type) as the int64 with the same bits, which torch can hold."""
    return seed - (1 << 64) if seed >= (1 << 63) else seed


@dataclass(frozen=True, slots=True)
class SampleOutput:
    token_ids: torch.Tensor  # [B] int64
    logprobs: torch.Tensor  # [B] float32, log-softmax of the processed scores


def sample(logits: torch.Tensor, batch: SamplingBatch, steps: torch.Tensor) -> SampleOutput:
    """Choose one token per row.

    logits: [B, V] in any float dtype. steps: [B] int64, how many tokens each row has
    generated so far (with the seed it picks the row's noise). Greedy rows take the
    argmax; sampled rows race exponential noise (Gumbel-max in another form).
    """
    scores = logits.float()  # [B, V]
    if batch.any_temperature:
        scores = scores / batch.temperature[:, None]
    if batch.max_top_k:
        scores = _top_k(scores, batch.top_k, batch.max_top_k)
    if batch.any_top_p:
        scores = _top_p(scores, batch.top_p)
    logprobs = torch.log_softmax(scores, dim=-1)  # [B, V]
    token_ids = torch.argmax(scores, dim=-1)  # [B]
    if batch.any_sample:
        noise = uniform_noise(batch.seeds, steps, scores.shape[-1])  # [B, V]
        # argmax(p / E) with E ~ Exp(1) draws from p; in log space: logp - log(E).
        race = logprobs - torch.log(-torch.log(noise))
        token_ids = torch.where(batch.do_sample, torch.argmax(race, dim=-1), token_ids)
    chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)  # [B]
    return SampleOutput(token_ids=token_ids, logprobs=chosen)


def _top_k(scores: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> torch.Tensor:
    """Keep each row's `top_k` highest scores; rows with top_k = V are untouched."""
    values = torch.topk(scores, max_top_k, dim=-1).values  # [B, K], descending
    kth_index = (top_k.clamp(max=max_top_k) - 1)[:, None]  # [B, 1]
    threshold = values.gather(1, kth_index)  # [B, 1]
    keep_all = (top_k >= scores.shape[-1])[:, None]  # [B, 1]
    return scores.masked_fill((scores < threshold) & ~keep_all, float("-inf"))


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: keep the smallest set of tokens whose mass reaches top_p."""
    sorted_scores, order = torch.sort(scores, dim=-1, descending=False)  # [B, V] ascending
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    drop_sorted = cumulative <= (1.0 - top_p)[:, None]
    drop_sorted[:, -1] = False  # always keep the most likely token
    drop = drop_sorted.scatter(1, order, drop_sorted)
    return scores.masked_fill(drop, float("-inf"))
