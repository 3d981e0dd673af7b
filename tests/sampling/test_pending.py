"""`BatchSampler.sample_on_device`: the choices on the device at once, on the host after
`PendingTokens.wait`, exactly what `sample` gives."""

from __future__ import annotations

import pytest
import torch

from tgi.sampling import BatchSampler, SamplingParams

VOCAB = 40


def logits(seed: int) -> torch.Tensor:
    return torch.randn(3, VOCAB, generator=torch.Generator().manual_seed(seed))


PARAMS = [
    SamplingParams(),
    SamplingParams(do_sample=True, seed=3, repetition_penalty=1.4, top_n_tokens=2),
    SamplingParams(do_sample=True, seed=9, temperature=0.7),
]


def test_waiting_gives_what_sample_gives() -> None:
    direct, pending = BatchSampler(), BatchSampler()
    prompts = [[1, 2], [3], [4, 5, 6]]
    for step in range(4):
        first = prompts if step == 0 else None
        want = direct.sample("step", [1, 2, 3], PARAMS, [step] * 3, logits(step), first)
        tokens = pending.sample_on_device(
            "step", [1, 2, 3], PARAMS, [step] * 3, logits(step), first
        )
        assert tokens.token_ids.tolist() == want.token_ids  # on the device before the copy
        assert not tokens.in_transit  # a CPU: nothing runs while the host waits
        got = tokens.wait()
        assert got == want and tokens.wait() is got and tokens.done
    assert want.top_tokens[1] and not want.top_tokens[0]


def test_a_sample_before_the_last_one_was_waited_for_is_refused() -> None:
    sampler = BatchSampler()
    tokens = sampler.sample_on_device("step", [1, 2, 3], PARAMS, [0] * 3, logits(0))
    with pytest.raises(RuntimeError, match="not waited for"):
        sampler.sample_on_device("step", [1, 2, 3], PARAMS, [1] * 3, logits(1))
    tokens.wait()
    sampler.sample_on_device("step", [1, 2, 3], PARAMS, [1] * 3, logits(1)).wait()


def test_a_copy_that_fails_fails_its_wait_and_frees_the_sampler() -> None:
    class Broken:
        def tolist(self) -> list[list[float]]:
            raise RuntimeError("device lost")

    sampler = BatchSampler()
    tokens = sampler.sample_on_device("step", [1, 2, 3], PARAMS, [0] * 3, logits(0))
    tokens._host = Broken()  # type: ignore[assignment]
    for _ in range(2):  # the same error again, not a second copy
        with pytest.raises(RuntimeError, match="device lost"):
            tokens.wait()
    assert tokens.done and not tokens.in_transit
    sampler.sample_on_device("step", [1, 2, 3], PARAMS, [1] * 3, logits(1)).wait()
