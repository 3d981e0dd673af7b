"""Penalties, typical-p, top-n tokens and the stateful BatchSampler, checked against
reference implementations written row by row (the batched code must agree with them)."""

from __future__ import annotations

import math

import pytest
import torch

from tgi.sampling import BatchSampler, HistoryView, SamplingBatch, SamplingParams, sample

CPU = torch.device("cpu")
VOCAB = 32


def logits_rows(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0


def history_of(histories: list[list[int]]) -> HistoryView:
    counts = torch.zeros(len(histories), VOCAB)
    for row, ids in enumerate(histories):
        for token_id in ids:
            counts[row, token_id] += 1
    lengths = torch.tensor([float(len(ids)) for ids in histories])
    last = torch.tensor([ids[-1] for ids in histories])
    return HistoryView(counts, lengths, last)


def processed_logprobs(
    logits: torch.Tensor, params: list[SamplingParams], histories: list[list[int]]
) -> torch.Tensor:
    """Log-softmax of the processed scores, read back through top-n = V."""
    params = [SamplingParams(**{**_fields(p), "top_n_tokens": VOCAB}) for p in params]
    batch = SamplingBatch.build(params, VOCAB, CPU)
    out = sample(logits, batch, torch.zeros(len(params), dtype=torch.int64), history_of(histories))
    assert out.top_ids is not None and out.top_logprobs is not None
    result = torch.empty(len(params), VOCAB)
    result.scatter_(1, out.top_ids, out.top_logprobs)
    return result


def _fields(params: SamplingParams) -> dict[str, object]:
    return {name: getattr(params, name) for name in SamplingParams.__dataclass_fields__}


# ---- penalties ---------------------------------------------------------------------------


def reference_repetition(row: torch.Tensor, seen: set[int], penalty: float) -> torch.Tensor:
    out = row.clone()
    for token_id in seen:  # CTRL: divide positive logits, multiply negative ones
        value = out[token_id]
        out[token_id] = value * penalty if value < 0 else value / penalty
    return out


def test_repetition_penalty_matches_the_reference_per_row() -> None:
    logits = logits_rows(3)
    histories = [[1, 2, 2, 7], [3, 4], [5]]
    params = [
        SamplingParams(repetition_penalty=1.5),
        SamplingParams(),  # a companion without penalty keeps its logits
        SamplingParams(repetition_penalty=0.5),  # < 1 favours repeats
    ]
    got = processed_logprobs(logits, params, histories)
    for row, (hist, p) in enumerate(zip(histories, params, strict=True)):
        want = reference_repetition(logits[row], set(hist), p.repetition_penalty)
        assert torch.allclose(got[row], torch.log_softmax(want, -1), atol=1e-5), row


def test_frequency_penalty_scales_each_tokens_share_of_the_history() -> None:
    logits = logits_rows(2, seed=1)
    histories = [[1, 1, 1, 2], [9, 9]]
    params = [SamplingParams(frequency_penalty=2.0), SamplingParams(frequency_penalty=-1.0)]
    got = processed_logprobs(logits, params, histories)
    for row, (hist, p) in enumerate(zip(histories, params, strict=True)):
        want = logits[row].clone()
        for token_id in set(hist):
            want[token_id] -= p.frequency_penalty * hist.count(token_id) / len(hist)
        assert torch.allclose(got[row], torch.log_softmax(want, -1), atol=1e-5), row


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 4], logits[0, 5] = 3.0, 2.0
    plain = SamplingBatch.build([SamplingParams()], VOCAB, CPU)
    penalised = SamplingBatch.build([SamplingParams(repetition_penalty=2.0)], VOCAB, CPU)
    steps = torch.zeros(1, dtype=torch.int64)
    history = history_of([[4]])
    assert sample(logits, plain, steps, history).token_ids.tolist() == [4]
    assert sample(logits, penalised, steps, history).token_ids.tolist() == [5]


def test_history_is_required_when_a_row_needs_it() -> None:
    batch = SamplingBatch.build([SamplingParams(frequency_penalty=1.0)], VOCAB, CPU)
    with pytest.raises(ValueError, match="history"):
        sample(logits_rows(1), batch, torch.zeros(1, dtype=torch.int64))


# ---- typical-p ---------------------------------------------------------------------------


def reference_typical(row: torch.Tensor, mass: float) -> torch.Tensor:
    """transformers' TypicalLogitsWarper on one row (min_tokens_to_keep = 1)."""
    logp = torch.log_softmax(row, -1)
    entropy = -(logp.exp() * logp).sum()
    shifted = (-logp - entropy).abs()
    order = torch.argsort(shifted)
    cumulative = torch.softmax(row[order], -1).cumsum(-1)
    last = int((cumulative < mass).sum())
    keep = set(order[: last + 1].tolist())
    return torch.tensor([v if i in keep else -math.inf for i, v in enumerate(row.tolist())])


@pytest.mark.parametrize("mass", [0.2, 0.5, 0.9])
def test_typical_p_matches_the_reference(mass: float) -> None:
    logits = logits_rows(2, seed=3)
    params = [SamplingParams(typical_p=mass, do_sample=True), SamplingParams()]
    got = processed_logprobs(logits, params, [[0], [0]])
    want = torch.log_softmax(reference_typical(logits[0], mass), -1)
    assert torch.equal(torch.isinf(got[0]), torch.isinf(want))
    kept = ~torch.isinf(want)
    assert torch.allclose(got[0][kept], want[kept], atol=1e-5)
    assert torch.allclose(got[1], torch.log_softmax(logits[1], -1), atol=1e-5)  # untouched


def test_typical_p_sampling_stays_inside_the_typical_set() -> None:
    logits = logits_rows(1, seed=4).expand(64, -1)
    params = [SamplingParams(do_sample=True, typical_p=0.3, seed=s) for s in range(64)]
    out = sample(
        logits, SamplingBatch.build(params, VOCAB, CPU), torch.zeros(64, dtype=torch.int64)
    )
    allowed = set(torch.nonzero(~torch.isinf(reference_typical(logits[0], 0.3))).flatten().tolist())
    assert set(out.token_ids.tolist()) <= allowed
    assert len(allowed) < VOCAB // 2  # the test means something


# ---- top-n tokens ------------------------------------------------------------------------


def test_top_n_tokens_are_the_best_logprobs_of_the_same_pass() -> None:
    logits = logits_rows(2, seed=5)
    params = [SamplingParams(top_n_tokens=3), SamplingParams(temperature=0.5, top_n_tokens=1)]
    out = sample(logits, SamplingBatch.build(params, VOCAB, CPU), torch.zeros(2, dtype=torch.int64))
    assert out.top_ids is not None and out.top_logprobs is not None
    assert out.top_ids.shape == (2, 3)  # the widest row; narrower rows are cut on the host
    logp0 = torch.log_softmax(logits[0], -1)
    assert out.top_ids[0].tolist() == torch.argsort(logp0, descending=True)[:3].tolist()
    assert torch.allclose(out.top_logprobs[0], logp0[out.top_ids[0]])
    # the chosen token's logprob and the top tokens come from the same (tempered) scores
    assert out.top_ids[1, 0] == out.token_ids[1]
    assert torch.isclose(out.top_logprobs[1, 0], out.logprobs[1])


# ---- BatchSampler: histories on the device, one host copy ------------------------------------


def test_batch_sampler_keeps_histories_across_steps_and_releases_them() -> None:
    sampler = BatchSampler()
    params = (SamplingParams(repetition_penalty=100.0), SamplingParams())
    logits = torch.zeros(2, VOCAB)
    logits[:, 10], logits[:, 11], logits[:, 12] = 3.0, 2.0, 1.0
    # The prompt holds 10: the penalised row moves to 11, then 12, then (all three seen and
    # divided by 100) back to 10, the largest left; the plain row stays on 10.
    first = sampler.sample("prefill", [1, 2], params, [0, 0], logits, prompts=[[10], [10]])
    second = sampler.sample("decode", [1, 2], params, [1, 1], logits)
    third = sampler.sample("decode", [1, 2], params, [2, 2], logits)
    assert [first.token_ids, second.token_ids, third.token_ids] == [[11, 10], [12, 10], [10, 10]]
    assert sampler.num_histories == 1  # only the row that needs one
    sampler.release([1, 2])
    assert sampler.num_histories == 0


def test_batch_sampler_returns_each_rows_own_number_of_top_tokens() -> None:
    sampler = BatchSampler()
    params = (SamplingParams(top_n_tokens=2), SamplingParams(), SamplingParams(top_n_tokens=4))
    out = sampler.sample("decode", [1, 2, 3], params, [0, 0, 0], logits_rows(3, seed=6))
    assert [len(top) for top in out.top_tokens] == [2, 0, 4]
    for row, top in enumerate(out.top_tokens):
        if top:
            assert top[0][0] == out.token_ids[row]  # greedy: the best is the chosen one
            assert math.isclose(top[0][1], out.logprobs[row], rel_tol=1e-6)
            assert [lp for _, lp in top] == sorted((lp for _, lp in top), reverse=True)


def test_penalised_seeded_rows_ignore_their_companions() -> None:
    def run(companions: int) -> list[int]:
        sampler = BatchSampler()
        target = SamplingParams(do_sample=True, seed=7, repetition_penalty=1.3, top_n_tokens=2)
        params = tuple(
            [
                SamplingParams(do_sample=True, seed=100 + i, frequency_penalty=1.0)
                for i in range(companions)
            ]
            + [target]
        )
        seq_ids = list(range(companions + 1))
        prompts = [[i % VOCAB] for i in seq_ids[:-1]] + [[3, 4, 5]]
        logits = logits_rows(len(params))
        logits[-1] = logits_rows(1)[0]  # the target's logits: the same in every run
        out = sampler.sample("prefill", seq_ids, params, [0] * len(params), logits, prompts)
        tokens = [out.token_ids[-1]]
        for step in range(1, 6):
            logits = logits_rows(len(params), seed=step)
            logits[-1] = logits_rows(1, seed=step)[0]  # the target's logits: same in every run
            out = sampler.sample("decode", seq_ids, params, [step] * len(params), logits)
            tokens.append(out.token_ids[-1])
        return tokens

    alone = run(0)
    assert run(3) == alone == run(0)


# ---- the hot path stays free of host syncs ------------------------------------------------

HOT_MODULES = ("sampler.py", "history.py", "noise.py", "batch.py")
SYNC_CALLS = {"item", "tolist", "cpu", "numpy", "print"}


@pytest.mark.parametrize("module", HOT_MODULES)
def test_hot_sampling_modules_make_no_host_sync_but_the_one_copy(module: str) -> None:
    import ast
    from pathlib import Path

    import tgi.sampling

    tree = ast.parse((Path(tgi.sampling.__file__).parent / module).read_text())
    calls = [
        node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
    ]
    found = sorted(call for call in calls if call in SYNC_CALLS)
    # batch.py's `_to_host` is the forward's single, documented device-to-host copy.
    assert found == (["tolist"] if module == "batch.py" else []), found
