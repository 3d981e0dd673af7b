"""The paged CPU engine split over ranks (tgi.parallel): each rank in its own process
with its slice of the weights and KV, gloo between them, against one unsharded backend
on the same weights: greedy tokens of a mixed batch and the first step's logits."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tgi_backend_cpu.paged import PagedCpuBackend

from tgi.models.quantize import quantize_weight
from tgi.testing.ranks import greedy_on_ranks, greedy_steps
from tgi.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.once  # see pyproject.toml

FACTORY = "tgi_backend_cpu.paged:PagedCpuBackend"
PROMPTS = ([1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [100, 200, 50, 60, 70, 80, 90, 10, 11])
NEW_TOKENS = 8

CASES = {
    # KV heads split 2 -> 1 per rank; 259-token vocabulary padded to 260 for two ranks
    "llama": {"architecture": "llama", "num_kv_heads": 2},
    # one KV head replicated on both ranks; tied embeddings; q/k/v biases
    "qwen2-tied-one-kv-head": {
        "architecture": "qwen2",
        "num_kv_heads": 1,
        "tie_word_embeddings": True,
    },
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_two_ranks_give_the_greedy_tokens_and_logits_of_one(case: str, tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / case, seed=1, **CASES[case])  # type: ignore[arg-type]
    want = greedy_steps(PagedCpuBackend(model_dir, num_threads=1), PROMPTS, NEW_TOKENS)
    got = greedy_on_ranks(2, FACTORY, model_dir, PROMPTS, NEW_TOKENS, num_threads=1)
    assert got.tokens == want.tokens
    torch.testing.assert_close(got.first_logits, want.first_logits, rtol=1e-4, atol=1e-4)


def test_int4_row_parallel_slices_quantize_to_the_groups_of_the_whole_weight() -> None:
    """A rank quantizes its own slice of a row-parallel weight (input columns); a slice
    that is a whole number of int4 groups has exactly the groups of the unsharded one."""
    weight = torch.randn(128, 256)
    whole = quantize_weight(weight, "int4").dequantized()
    halves = [quantize_weight(weight[:, i * 128 : (i + 1) * 128], "int4") for i in range(2)]
    assert torch.equal(torch.cat([half.dequantized() for half in halves], dim=1), whole)


def test_int4_shards_generate_the_tokens_of_one(tmp_path: Path) -> None:
    """Each rank quantizes its own slices (the int4 kernel computes in bf16, so logits
    agree to its precision, tokens exactly)."""
    model_dir = build_tiny_model(tmp_path / "llama", seed=1)
    kwargs = {"num_threads": 1, "quantize": "int4", "dtype": torch.float32}
    want = greedy_steps(PagedCpuBackend(model_dir, **kwargs), PROMPTS, NEW_TOKENS)  # type: ignore[arg-type]
    got = greedy_on_ranks(2, FACTORY, model_dir, PROMPTS, NEW_TOKENS, **kwargs)
    assert got.tokens == want.tokens
    torch.testing.assert_close(got.first_logits, want.first_logits, rtol=0.05, atol=0.1)
