"""The paged engine on the real SmolLM2-135M-Instruct: greedy tokens equal transformers'
`generate()`, alone and in a mixed batch (rows joining, a chunked prefill, T=3 drafts)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu.paged import BLOCK_SIZE, PagedCpuBackend

from tgi.backend.contract import DecodeBatch, DecodeRow, Limits, PrefillBatch, PrefillRow
from tgi.errors import ModelNotFound

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
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    out: dict[int, tuple[list[int], list[int]]] = {}
    for seq_id, text in enumerate(TEXTS):
        prompt = tokenizer(text)["input_ids"]
        with torch.inference_mode():
            ids = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=NUM_NEW,
                min_new_tokens=NUM_NEW,
                do_sample=False,
            )
        out[seq_id] = (prompt, ids[0, len(prompt) :].tolist())
    return out


@pytest.fixture(scope="module")
def backend(model_dir: Path) -> Any:
    backend = PagedCpuBackend(model_dir, dtype=torch.float32)
    backend.warmup(LIMITS)
    yield backend
    backend.close()


def _table(seq_id: int, num_tokens: int) -> tuple[int, ...]:
    first = seq_id * 16  # 16 blocks = 256 positions per sequence
    return tuple(range(first, first + -(-num_tokens // BLOCK_SIZE)))


def test_alone_matches_generate(
    backend: PagedCpuBackend, expected: dict[int, tuple[list[int], list[int]]]
) -> None:
    prompt, want = expected[1]
    out = backend.prefill(PrefillBatch((PrefillRow(9, tuple(prompt), 0, None, _table(9, 200)),)))
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < NUM_NEW:
        row = DecodeRow(9, (tokens[-1],), len(prompt) + len(tokens) - 1, None, _table(9, 200))
        tokens.append(int(backend.decode(DecodeBatch((row,))).logits[0, -1].argmax()))
    backend.release([9])
    assert tokens == want


def test_mixed_batch_matches_generate(
    backend: PagedCpuBackend, expected: dict[int, tuple[list[int], list[int]]]
) -> None:
    got: dict[int, list[int]] = {}

    def prefill(*rows: PrefillRow) -> None:
        out = backend.prefill(PrefillBatch(rows))
        for seq_id, logits in zip(out.seq_ids, out.logits, strict=True):
            got[seq_id] = [int(logits[-1].argmax())]

    def decode(seq_ids: Sequence[int], num_drafts: int = 0) -> None:
        rows = []
        for seq in seq_ids:
            prompt, want = expected[seq]
            drafts = want[len(got[seq]) : len(got[seq]) + num_drafts]
            position = len(prompt) + len(got[seq]) - 1
            rows.append(DecodeRow(seq, (got[seq][-1], *drafts), position, None, _table(seq, 200)))
        out = backend.decode(DecodeBatch(tuple(rows)))
        for row, logits in zip(rows, out.logits, strict=True):
            picked = logits.argmax(dim=-1).tolist()  # [T]
            assert picked[:-1] == list(row.token_ids[1:])
            got[row.seq_id].extend(picked)

    prompts = {seq: expected[seq][0] for seq in expected}
    prefill(PrefillRow(0, tuple(prompts[0]), 0, None, _table(0, 200)))
    decode([0])
    half = len(prompts[1]) // 2
    prefill(PrefillRow(1, tuple(prompts[1][:half]), 0, None, _table(1, 200), want_logits=False))
    decode([0])
    prefill(
        PrefillRow(1, tuple(prompts[1][half:]), half, None, _table(1, 200)),
        PrefillRow(2, tuple(prompts[2]), 0, None, _table(2, 200)),
    )
    for _ in range(3):
        decode([2, 0, 1])
    decode([0, 1, 2], num_drafts=2)
    decode([0, 1, 2], num_drafts=2)
    backend.release([0, 1, 2])
    for seq, tokens in got.items():
        assert tokens == expected[seq][1][: len(tokens)], f"seq {seq}"
    assert min(len(tokens) for tokens in got.values()) >= 8
