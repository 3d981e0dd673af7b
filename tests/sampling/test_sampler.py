"""The batched sampler and its counter-based noise."""

from __future__ import annotations

import math

import pytest
import torch

from tgi.sampling import SamplingBatch, SamplingParams, sample
from tgi.sampling.noise import uniform_noise

CPU = torch.device("cpu")
VOCAB = 32


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, VOCAB, generator=generator) * 2.0  # [B, V]


def run(
    logits: torch.Tensor, params: list[SamplingParams], step: int | list[int] = 0
) -> tuple[list[int], list[float]]:
    batch = SamplingBatch.build(params, logits.shape[-1], CPU)
    steps = [step] * len(params) if isinstance(step, int) else step
    out = sample(logits, batch, torch.tensor(steps, dtype=torch.int64))
    return out.token_ids.tolist(), out.logprobs.tolist()


def draws(logits_row: torch.Tensor, params: SamplingParams, steps: int = 12) -> list[int]:
    """One row's tokens over `steps` decode steps, sampled alone."""
    return [run(logits_row[None, :], [params], step)[0][0] for step in range(steps)]


def sampled(seed: int, **values: float | int) -> SamplingParams:
    return SamplingParams(do_sample=True, seed=seed, **values)  # type: ignore[arg-type]


def frequencies(logits_row: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Token frequencies over one batch of rows that share `logits_row`."""
    logits = logits_row[None, :].expand(len(params), -1)
    ids, _ = run(logits, params)
    return torch.bincount(torch.tensor(ids), minlength=logits.shape[-1]).float() / len(ids)


# ---- greedy ---------------------------------------------------------------------------


def test_greedy_rows_take_the_argmax() -> None:
    logits = random_logits(6)
    params = [SamplingParams(), sampled(1), SamplingParams(temperature=0.5)] * 2
    params[3] = sampled(2, top_k=3)
    ids, _ = run(logits, params)
    argmax = logits.argmax(dim=-1).tolist()
    for row in (0, 2, 5):  # the greedy rows, whatever their companions do
        assert ids[row] == argmax[row]


@pytest.mark.parametrize("vocab", [37, 49152])
def test_greedy_ties_and_nan_go_to_the_first_index_as_argmax(vocab: int) -> None:
    """The sampler's argmax (through torch.max) picks what torch.argmax picks: the
    first of tied maxima, and a NaN over any number, at any width the kernels split."""
    generator = torch.Generator().manual_seed(3)
    logits = torch.randint(0, 4, (8, vocab), generator=generator).float()  # many ties
    logits[2, vocab - 1] = logits[2, 5] = float("nan")
    logits[5] = 1.0  # all tied: index 0
    ids, _ = run(logits, [SamplingParams()] * 8)
    assert ids == logits.argmax(dim=-1).tolist()
    assert ids[2] == 5 and ids[5] == 0


def test_logprobs_are_the_log_softmax_of_the_chosen_token() -> None:
    logits = random_logits(4)
    params = [SamplingParams(), sampled(3), SamplingParams(), sampled(4)]
    ids, logprobs = run(logits, params)
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(4), torch.tensor(ids)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-5)


def test_logprobs_reflect_the_temperature() -> None:
    logits = random_logits(1)
    ids, logprobs = run(logits, [SamplingParams(temperature=0.5)])
    expected = torch.log_softmax(logits / 0.5, dim=-1)[0, ids[0]].item()
    assert logprobs[0] == pytest.approx(expected, abs=1e-5)


def test_half_precision_logits_are_accepted() -> None:
    logits = random_logits(3)
    ids, _ = run(logits.to(torch.bfloat16), [SamplingParams()] * 3)
    assert ids == logits.to(torch.bfloat16).float().argmax(dim=-1).tolist()


# ---- seeds ----------------------------------------------------------------------------


def test_seeded_sampling_repeats_across_runs() -> None:
    logits = random_logits(1)[0]
    assert draws(logits, sampled(11)) == draws(logits, sampled(11))


def test_different_seeds_draw_differently() -> None:
    logits = random_logits(1)[0]
    assert draws(logits, sampled(11)) != draws(logits, sampled(12))


def test_a_row_draws_the_same_whatever_its_companions_and_position() -> None:
    target = random_logits(1, seed=7)[0]
    alone = draws(target, sampled(2024))
    companions = random_logits(3, seed=8)
    companion_params = [
        SamplingParams(),
        sampled(5, temperature=0.3, top_k=4),
        sampled(6, top_p=0.5),
    ]
    for position in range(4):  # first, middle, last
        logits = torch.cat([companions[:position], target[None, :], companions[position:]])
        params = [*companion_params[:position], sampled(2024), *companion_params[position:]]
        in_batch = [run(logits, params, step)[0][position] for step in range(len(alone))]
        assert in_batch == alone, f"target at row {position}"


def test_u64_seeds_sample() -> None:
    # TGI's seed is a u64; seeds past the int64 range must not break the batch.
    logits = random_logits(2)
    ids, _ = run(logits, [sampled(2**64 - 1), sampled(2**63)])
    assert len(ids) == 2
    assert draws(logits[0], sampled(2**64 - 1)) == draws(logits[0], sampled(2**64 - 1))
    assert draws(logits[0], sampled(2**64 - 1)) != draws(logits[0], sampled(2**63))


# ---- warpers ----------------------------------------------------------------------------


def test_top_k_1_is_greedy() -> None:
    logits = random_logits(64, seed=3)
    ids, _ = run(logits, [sampled(seed, top_k=1) for seed in range(64)])
    assert ids == logits.argmax(dim=-1).tolist()


def test_top_k_restricts_the_support_to_k_tokens() -> None:
    logits = random_logits(1, seed=4)[0]
    support = set(
        frequencies(logits, [sampled(s, top_k=3) for s in range(2000)]).nonzero().flatten().tolist()
    )
    assert support == set(torch.topk(logits, 3).indices.tolist())


def test_top_p_keeps_the_smallest_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log()

    def support(top_p: float) -> set[int]:
        seen = frequencies(logits, [sampled(s, top_p=top_p) for s in range(2000)])
        return set(seen.nonzero().flatten().tolist())

    assert support(0.45) == {0}  # 0.5 alone reaches 0.45
    assert support(0.75) == {0, 1}  # 0.5 is short of 0.75; 0.5 + 0.3 reaches it
    assert support(0.85) == {0, 1, 2}
    assert support(0.99) == {0, 1, 2, 3}


def test_top_p_renormalises_the_nucleus() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    seen = frequencies(probs.log(), [sampled(s, top_p=0.75) for s in range(3000)])
    assert seen[0].item() == pytest.approx(0.5 / 0.8, abs=0.04)
    assert seen[1].item() == pytest.approx(0.3 / 0.8, abs=0.04)


def test_temperature_reshapes_the_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    seeds = range(3000)
    cold = frequencies(logits, [sampled(s, temperature=0.25) for s in seeds])
    plain = frequencies(logits, [sampled(s) for s in seeds])
    hot = frequencies(logits, [sampled(s, temperature=4.0) for s in seeds])
    assert cold[0] > plain[0] > hot[0]
    assert cold[0].item() == pytest.approx(torch.softmax(logits / 0.25, -1)[0].item(), abs=0.03)
    assert hot[0].item() == pytest.approx(torch.softmax(logits / 4.0, -1)[0].item(), abs=0.03)


def test_frequencies_match_the_softmax() -> None:
    logits = torch.tensor([1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])
    num_draws = 3000
    seen = frequencies(logits, [sampled(s) for s in range(num_draws)])
    probs = torch.softmax(logits, dim=-1)
    for token, p in enumerate(probs.tolist()):
        tolerance = 4 * math.sqrt(p * (1 - p) / num_draws) + 1e-3  # four standard errors
        assert abs(seen[token].item() - p) < tolerance, (token, seen[token].item(), p)


def test_steps_draw_fresh_noise() -> None:
    # The same seed at successive steps must not repeat one draw.
    logits = torch.zeros(1, VOCAB)
    assert len(set(draws(logits[0], sampled(1)))) > 6


# ---- noise --------------------------------------------------------------------------------


def test_uniform_noise_is_in_the_open_unit_interval_and_uniform() -> None:
    seeds = torch.arange(64, dtype=torch.int64)
    noise = uniform_noise(seeds, torch.zeros(64, dtype=torch.int64), 1000)  # [64, 1000]
    assert noise.shape == (64, 1000) and noise.dtype == torch.float32
    assert noise.min().item() > 0.0 and noise.max().item() < 1.0
    assert noise.mean().item() == pytest.approx(0.5, abs=0.01)
    deciles = torch.histc(noise, bins=10, min=0.0, max=1.0) / noise.numel()
    assert torch.allclose(deciles, torch.full((10,), 0.1), atol=0.01)


def test_uniform_noise_depends_on_seed_and_step_only() -> None:
    seeds = torch.tensor([5, 6, 5], dtype=torch.int64)
    steps = torch.tensor([0, 0, 1], dtype=torch.int64)
    noise = uniform_noise(seeds, steps, 16)
    alone = uniform_noise(seeds[:1], steps[:1], 16)
    assert torch.equal(noise[0], alone[0])
    assert not torch.equal(noise[0], noise[1])  # another seed
    assert not torch.equal(noise[0], noise[2])  # another step
