"""The green-list watermark: the batched bias and the detector agree on the split."""

from __future__ import annotations

import math

import pytest
import torch

from tgi.sampling import BatchSampler, SamplingParams, detect_watermark
from tgi.sampling.watermark import green_mask

VOCAB = 1000


def test_the_green_list_is_a_gamma_fraction_keyed_on_the_previous_token() -> None:
    prev = torch.tensor([1, 1, 2])
    gamma = torch.tensor([0.25, 0.25, 0.25])
    mask = green_mask(prev, VOCAB, gamma)
    assert torch.equal(mask[0], mask[1])  # same previous token, same split
    assert not torch.equal(mask[0], mask[2])
    assert abs(mask.float().mean().item() - 0.25) < 0.03
    wider = green_mask(prev, VOCAB, torch.tensor([0.5, 0.5, 0.5]))
    assert bool((mask & ~wider).sum() == 0)  # green at 0.25 stays green at 0.5


def generate(watermark: bool, seed: int, steps: int = 200) -> list[int]:
    """Sample `steps` tokens from a flat-ish random model, with or without the watermark."""
    sampler = BatchSampler()
    params = (SamplingParams(do_sample=True, seed=seed, watermark=watermark),)
    generator = torch.Generator().manual_seed(seed)
    tokens = [7]
    out = sampler.sample(
        "prefill", [1], params, [0], torch.randn(1, VOCAB, generator=generator), [[7]]
    )
    tokens += out.token_ids
    for step in range(1, steps):
        logits = torch.randn(1, VOCAB, generator=generator)
        tokens += sampler.sample("decode", [1], params, [step], logits).token_ids
    return tokens


def test_the_detector_tells_watermarked_tokens_from_plain_ones() -> None:
    marked = detect_watermark(generate(True, seed=3))
    plain = detect_watermark(generate(False, seed=3))
    assert marked.num_tokens == plain.num_tokens == 200
    assert marked.z_score > 6 and marked.is_watermarked()
    assert abs(plain.z_score) < 3 and not plain.is_watermarked()
    assert marked.p_value < 1e-6 < plain.p_value


def test_the_z_score_formula() -> None:
    ids = [5, 6, 7, 8, 9]
    score = detect_watermark(ids, gamma=0.5)
    green = green_mask(torch.tensor(ids[:-1]), 10, torch.full((4,), 0.5))
    expected_green = int(green[torch.arange(4), torch.tensor(ids[1:])].sum())
    assert score.num_green == expected_green
    assert math.isclose(score.z_score, (expected_green - 2) / math.sqrt(4 * 0.25))


@pytest.mark.parametrize(("ids", "gamma"), [([1], 0.5), ([1, 2], 1.0), ([1, 2], 0.0)])
def test_the_detector_refuses_what_it_cannot_score(ids: list[int], gamma: float) -> None:
    with pytest.raises(ValueError):
        detect_watermark(ids, gamma=gamma)
