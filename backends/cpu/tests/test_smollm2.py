"""The CPU backend on the real SmolLM2-135M-Instruct: greedy tokens equal transformers'.

The model is the embedded GGUF converted once into `.cache/tgi-test` at the repository
root (the directory tests/models uses too, so the ~50 s conversion is shared and kept
between runs).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu.backend import TransformersCpuBackend

from tgi.backend.contract import Limits, WarmupReport
from tgi.errors import ModelNotFound
from tgi.testing.driver import Driver
from tgi.testing.reference import ReferenceModel

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

CACHE_DIR = Path(__file__).resolve().parents[3] / ".cache" / "tgi-test"
MAX_NEW_TOKENS = 24
LIMITS = Limits(
    max_input_tokens=1024,
    max_total_tokens=2048,
    max_batch_prefill_tokens=1074,
    max_batch_total_tokens=16384,
    max_batch_size=None,
)
CHATS: tuple[list[dict[str, str]], ...] = (
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [
        {"role": "system", "content": "You answer in one short sentence."},
        {"role": "user", "content": "Name three primary colors."},
    ],
)
# Plain-text rows that share the batch with the chats, each of another length.
OTHERS = (
    "The quick brown fox",
    "Once upon a time, in a small village by the mountains, there lived an old clockmaker who",
)


@pytest.fixture(scope="module")
def model_dir() -> Path:
    fixtures = pytest.importorskip("tgi.testing.fixtures")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = CACHE_DIR / ".gitignore"
    if not ignore.exists():
        ignore.write_text("# converted test models; never commit\n*\n", encoding="utf-8")
    try:
        return Path(fixtures.smollm2_files(CACHE_DIR).path)
    except ModelNotFound as exc:
        pytest.skip(f"the embedded SmolLM2 is not installed: {exc}")


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def reference(model_dir: Path) -> ReferenceModel:
    return ReferenceModel(model_dir)


@pytest.fixture(scope="module")
def prompts(tokenizer: Any) -> list[list[int]]:
    """The three chats with the assistant prompt opened, then the plain-text rows."""
    chats = [
        list(
            tokenizer.apply_chat_template(
                chat, add_generation_prompt=True, tokenize=True, return_dict=False
            )
        )
        for chat in CHATS
    ]
    return chats + [tokenizer(text).input_ids for text in OTHERS]


@pytest.fixture(scope="module")
def expected(reference: ReferenceModel, prompts: list[list[int]]) -> list[list[int]]:
    return [reference.greedy(prompt, MAX_NEW_TOKENS) for prompt in prompts]


@pytest.fixture(scope="module")
def warm_backend(model_dir: Path) -> Iterator[tuple[TransformersCpuBackend, WarmupReport]]:
    backend = TransformersCpuBackend(model_dir, dtype=torch.float32)
    try:
        yield backend, backend.warmup(LIMITS)
    finally:
        backend.close()


@pytest.fixture
def driver(warm_backend: tuple[TransformersCpuBackend, WarmupReport]) -> Iterator[Driver]:
    backend, report = warm_backend
    driver = Driver(backend, report)
    try:
        yield driver
    finally:
        driver.release(list(driver.seqs))


def test_reference_answers_sensibly(tokenizer: Any, expected: list[list[int]]) -> None:
    # Guards the oracle itself: a broken conversion would make every comparison vacuous.
    assert "Paris" in tokenizer.decode(expected[0])
    assert [len(tokens) for tokens in expected[1:3]] == [MAX_NEW_TOKENS, MAX_NEW_TOKENS]


@pytest.mark.parametrize("index", range(len(CHATS)))
def test_chat_prompt_alone_matches_generate(
    driver: Driver, prompts: list[list[int]], expected: list[list[int]], index: int
) -> None:
    seq_id = 10 + index
    driver.prefill({seq_id: prompts[index]})
    driver.generate({seq_id: len(expected[index])})
    assert driver.tokens(seq_id) == expected[index]


def test_chat_prompts_decoded_together_with_others_match_generate(
    driver: Driver, prompts: list[list[int]], expected: list[list[int]]
) -> None:
    assert len({len(prompt) for prompt in prompts}) == len(prompts)  # all lengths differ
    ids = [20 + index for index in range(len(prompts))]
    targets = {seq_id: len(tokens) for seq_id, tokens in zip(ids, expected, strict=True)}
    # Staggered joins: rows enter between decode steps, as the router admits them.
    driver.prefill({ids[0]: prompts[0], ids[3]: prompts[3]})
    driver.generate({ids[0]: 4, ids[3]: 4})
    driver.prefill({ids[1]: prompts[1]})
    driver.generate({ids[0]: 6, ids[1]: 2, ids[3]: 6})
    driver.prefill({ids[2]: prompts[2], ids[4]: prompts[4]})
    driver.generate(targets)
    assert [driver.tokens(seq_id) for seq_id in ids] == expected
    held = sum(len(prompts[i]) + len(expected[i]) - 1 for i in range(len(ids)))
    assert driver.backend.kv_usage().used_tokens == held
    driver.release(ids)
    assert driver.backend.kv_usage().used_tokens == 0
