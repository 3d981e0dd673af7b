"""The paged engine on the real SmolLM2-135M-Instruct: greedy tokens equal transformers'
`generate()`, alone and in mixed steps (rows joining next to decode rows, a chunked
prompt, T=3 drafts), each step one forward."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu.paged import PagedCpuBackend

from tgi.backend.contract import Limits
from tgi.errors import ModelNotFound
from tgi.testing.reference import ReferenceModel

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

CACHE_DIR = Path(__file__).resolve().parents[3] / ".cache" / "tgi-test"
NUM_NEW = 16
LIMITS = Limits(256, 512, 512, max_batch_total_tokens=4096, max_batch_size=None)
TEXTS = (
    "The capital of France is",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
    "def fibonacci(n):",
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    fixtures = pytest.importorskip("tgi.testing.fixtures")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    try:
        return Path(fixtures.smollm2_files(CACHE_DIR).path)
    except ModelNotFound as exc:
        pytest.skip(f"the embedded SmolLM2 is not installed: {exc}")


@pytest.fixture(scope="module")
def expected(model_dir: Path) -> dict[int, tuple[list[int], list[int]]]:
    """seq_id -> (prompt, transformers' greedy continuation)."""
    reference = ReferenceModel(model_dir, torch.float32)
    prompts = [_tokenize(model_dir, text) for text in TEXTS]
    return {
        seq_id: (prompt, reference.greedy(prompt, NUM_NEW, stop_at_eos=False))
        for seq_id, prompt in enumerate(prompts)
    }


def _tokenize(model_dir: Path, text: str) -> list[int]:
    import transformers

    return list(transformers.AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"])


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> Iterator[PagedCpuBackend]:
    backend = PagedCpuBackend(model_dir, dtype=torch.float32)
    backend.warmup(LIMITS)
    yield backend
    backend.close()


def test_alone_matches_generate(
    backend: PagedCpuBackend,
    expected: dict[int, tuple[list[int], list[int]]],
    make_driver: Any,
) -> None:
    prompt, want = expected[1]
    driver = make_driver(backend, num_blocks=256)
    driver.step(driver.new(9, prompt))
    while len(driver.tokens(9)) < NUM_NEW:
        driver.step(driver.decode(9))
    driver.release([9])
    assert driver.tokens(9) == want


def test_mixed_steps_match_generate(
    backend: PagedCpuBackend,
    expected: dict[int, tuple[list[int], list[int]]],
    make_driver: Any,
) -> None:
    driver = make_driver(backend, num_blocks=256)
    prompts = {seq: expected[seq][0] for seq in expected}

    def drafts(seq: int, count: int) -> list[int]:  # the true next tokens
        done = len(driver.tokens(seq))
        return expected[seq][1][done : done + count]

    driver.step(driver.new(0, prompts[0]))
    half = len(prompts[1]) // 2
    driver.step(driver.new(1, prompts[1], end=half), driver.decode(0))
    driver.step(driver.new(2, prompts[2]), driver.chunk(1), driver.decode(0))
    for _ in range(3):
        driver.step(driver.decode(2), driver.decode(0), driver.decode(1))
    for _ in range(2):
        driver.step(*(driver.decode(seq, drafts(seq, 2)) for seq in (0, 1, 2)))
    driver.step(driver.decode(0, drafts(0, 2)), driver.decode(1), driver.decode(2, drafts(2, 1)))
    driver.release([0, 1, 2])
    for seq in expected:
        tokens = driver.tokens(seq)
        assert tokens == expected[seq][1][: len(tokens)], f"seq {seq}"
    assert min(len(driver.tokens(seq)) for seq in expected) >= 8


def test_three_shards_match_generate_alone_and_in_a_mixed_batch(
    model_dir: Path, expected: dict[int, tuple[list[int], list[int]]]
) -> None:
    """`--num-shard 3` (9 heads and 3 KV heads: one KV head per rank) in three processes
    over gloo: the greedy tokens of transformers, for one prompt alone and for all three
    prefilled in one step and decoded together."""
    from tgi.testing.ranks import greedy_on_ranks

    prompts = [expected[seq_id][0] for seq_id in sorted(expected)]
    run = greedy_on_ranks(
        3,
        "tgi_backend_cpu.paged:PagedCpuBackend",
        model_dir,
        prompts,
        NUM_NEW,
        dtype=torch.float32,
        num_threads=1,
    )
    assert run.alone == expected[0][1]
    assert run.tokens == [expected[seq_id][1] for seq_id in sorted(expected)]


NEAR_TIE = 0.1  # transformers' top-2 logit margin under which bf16 rounding may pick either


@pytest.mark.parametrize("attention", ["sdpa", "compiled"])
def test_bfloat16_matches_generate_in_bfloat16_up_to_near_ties(
    model_dir: Path, attention: str, tmp_path: Path
) -> None:
    """The dtype the backend may choose by measurement on a CPU with fast bf16, with
    torch's ops and SDPA, or with the compiled decode kernel and layer ops (its default
    in bf16): greedy
    tokens equal transformers' `generate()` in bf16, alone and in a mixed batch, except
    where transformers itself is at a near-tie: at the first token that differs, its
    top-2 margin is under `NEAR_TIE` and our token is one of its top 2."""
    from tgi_backend_cpu._layer_ops import load_layer_ops
    from tgi_backend_cpu._native import load_decode_attention

    from tgi.testing.ranks import greedy_steps

    kernel = layer_ops = None
    if attention == "compiled":
        kernel, why = load_decode_attention(tmp_path, "test")
        layer_ops, why_not = load_layer_ops(tmp_path, "test")
        if kernel is None or layer_ops is None:
            pytest.skip(f"no compiled kernels: {why}; {why_not}")
    reference = ReferenceModel(model_dir, torch.bfloat16)
    prompts = [_tokenize(model_dir, text) for text in TEXTS]
    backend = PagedCpuBackend(
        model_dir, dtype=torch.bfloat16, decode_kernel=kernel, layer_ops=layer_ops
    )
    try:
        run = greedy_steps(backend, prompts, NUM_NEW)
    finally:
        backend.close()
    for prompt, got in [(prompts[0], run.alone), *zip(prompts, run.tokens, strict=True)]:
        want = reference.greedy(prompt, NUM_NEW, stop_at_eos=False)
        if got == want:
            continue
        first = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
        logits = reference.prompt_logits([*prompt, *want[:first]])[-1]
        top = torch.topk(logits, 2)
        margin = float(top.values[0] - top.values[1])
        assert margin < NEAR_TIE and got[first] in top.indices.tolist(), (
            f"token {first}: ours {got[first]}, transformers {want[first]} "
            f"(top-2 margin {margin:.3f})"
        )
