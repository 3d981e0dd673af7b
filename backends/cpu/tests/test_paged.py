"""The paged CPU engine against transformers' greedy `generate()`, driven by hand-built
block tables: alone, in mixed batches, chunked, with a cached prefix, and with drafts."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu.paged import BLOCK_SIZE, PagedCpuBackend

from tgi.backend.contract import (
    DecodeBatch,
    DecodeRow,
    KvLayout,
    Limits,
    PrefillBatch,
    PrefillRow,
)
from tgi.errors import BackendError
from tgi.testing.tiny_models import build_tiny_model

LIMITS = Limits(
    max_input_tokens=64,
    max_total_tokens=96,
    max_batch_prefill_tokens=256,
    max_batch_total_tokens=None,
    max_batch_size=None,
)
NUM_NEW = 10


def greedy_reference(model_dir: Path, prompt: Sequence[int], num_new: int) -> list[int]:
    """transformers' greedy continuation of `prompt` (new tokens only)."""
    import transformers

    model = _reference_model(model_dir)
    with torch.inference_mode():
        out = model.generate(
            torch.tensor([list(prompt)]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=num_new,
            min_new_tokens=num_new,
            do_sample=False,
            generation_config=transformers.GenerationConfig(pad_token_id=0),
        )
    return [int(t) for t in out[0, len(prompt) :]]


_MODELS: dict[Path, Any] = {}


def _reference_model(model_dir: Path) -> Any:
    import transformers

    if model_dir not in _MODELS:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        _MODELS[model_dir] = model.eval()
    return _MODELS[model_dir]


class Blocks:
    """The router's half, by hand: a free list and one block table per sequence."""

    def __init__(self, num_blocks: int) -> None:
        self.free = list(range(num_blocks - 1, -1, -1))  # hand out high ids first
        self.tables: dict[int, list[int]] = {}

    def cover(self, seq_id: int, num_tokens: int, shared: Sequence[int] = ()) -> tuple[int, ...]:
        table = self.tables.setdefault(seq_id, list(shared))
        while len(table) * BLOCK_SIZE < num_tokens:
            table.append(self.free.pop())
        return tuple(table)


def make_prompt(seed: int, length: int, vocab_size: int) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (length,), generator=generator).tolist()


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def model_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = build_tiny_model(tmp_path_factory.mktemp(request.param), request.param, seed=7)
    if request.param == "mistral":  # a window short enough to matter at these lengths
        config = json.loads((path / "config.json").read_text())
        config["sliding_window"] = 12
        (path / "config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(params=["dense", "gather", "tight"])
def backend(request: pytest.FixtureRequest, model_dir: Path) -> PagedCpuBackend:
    # "gather": no dense copy, every step reads keys out of the pool's blocks; "tight": a
    # dense copy of two 64-token rows, so steps switch between the two and rows refill
    dense_kv_bytes = {"dense": None, "gather": 0, "tight": 2 * 64 * 512}[request.param]
    backend = PagedCpuBackend(
        model_dir, dtype=torch.float32, kv_cache_memory=2**20, dense_kv_bytes=dense_kv_bytes
    )
    backend.warmup(LIMITS)
    return backend


def test_capacity_and_usage_follow_the_contract(backend: PagedCpuBackend) -> None:
    caps = backend.capabilities
    assert caps.kv_layout is KvLayout.PAGED and caps.block_size == BLOCK_SIZE
    capacity = backend.warmup(LIMITS)  # warmup twice re-sizes the same
    # tiny models: 2 layers x 2 kv heads x head_dim 16 x (K, V) x 4 bytes
    assert capacity.bytes_per_token == 512
    assert capacity.num_blocks == 2**20 // (512 * BLOCK_SIZE) == 128
    assert capacity.max_total_tokens == 128 * BLOCK_SIZE
    assert backend.kv_usage().seq_ids == frozenset()


def test_alone_matches_generate(backend: PagedCpuBackend, model_dir: Path) -> None:
    vocab = backend.spec.vocab_size
    prompt = make_prompt(1, 21, vocab)
    blocks = Blocks(128)
    out = backend.prefill(
        PrefillBatch((PrefillRow(1, tuple(prompt), 0, None, blocks.cover(1, 21)),))
    )
    tokens = [int(out.logits[0, -1].argmax())]
    while len(tokens) < NUM_NEW:
        position = len(prompt) + len(tokens) - 1
        row = DecodeRow(1, (tokens[-1],), position, None, blocks.cover(1, position + 1))
        tokens.append(int(backend.decode(DecodeBatch((row,))).logits[0, -1].argmax()))
    assert tokens == greedy_reference(model_dir, prompt, NUM_NEW)
    usage = backend.kv_usage()
    assert usage.seq_ids == {1} and usage.used_tokens == 21 + NUM_NEW - 1
    backend.release([1, 99])
    assert backend.kv_usage().seq_ids == frozenset()


def test_mixed_batch_matches_generate(backend: PagedCpuBackend, model_dir: Path) -> None:
    """Rows of different lengths join mid-way; one prefill is chunked, one starts past a
    shared cached prefix; the last steps decode T=3 rows whose drafts are the true tokens."""
    vocab = backend.spec.vocab_size
    prompts = {
        1: make_prompt(1, 5, vocab),
        2: make_prompt(2, 37, vocab),
        3: make_prompt(3, 19, vocab),
    }
    prompts[4] = prompts[2][:32] + make_prompt(4, 6, vocab)  # shares 2 full blocks with seq 2
    want = {
        seq: greedy_reference(model_dir, prompt, NUM_NEW + 8) for seq, prompt in prompts.items()
    }
    blocks = Blocks(128)
    got: dict[int, list[int]] = {}

    def prefill(*rows: PrefillRow) -> None:
        out = backend.prefill(PrefillBatch(rows))
        wanted = tuple(row.seq_id for row in rows if row.want_logits)
        assert out.seq_ids == wanted and out.logits.shape == (len(wanted), 1, vocab)
        for seq_id, logits in zip(out.seq_ids, out.logits, strict=True):
            got[seq_id] = [int(logits[-1].argmax())]

    def decode(seq_ids: Sequence[int], num_drafts: int = 0) -> None:
        rows = []
        for seq in seq_ids:
            position = len(prompts[seq]) + len(got[seq]) - 1
            drafts = want[seq][len(got[seq]) : len(got[seq]) + num_drafts]
            token_ids = (got[seq][-1], *drafts)
            rows.append(
                DecodeRow(
                    seq, token_ids, position, None, blocks.cover(seq, position + len(token_ids))
                )
            )
        out = backend.decode(DecodeBatch(tuple(rows)))
        assert out.logits.shape == (len(rows), 1 + num_drafts, vocab)
        for row, logits in zip(rows, out.logits, strict=True):
            picked = logits.argmax(dim=-1).tolist()  # [T]
            assert picked[:-1] == list(row.token_ids[1:])  # every true draft is confirmed
            got[row.seq_id].extend(picked)

    prefill(PrefillRow(1, tuple(prompts[1]), 0, None, blocks.cover(1, 5)))
    decode([1])
    decode([1])
    # seq 2's 37 tokens in two chunks: 20 (no logits), then 17 alongside seq 3
    prefill(PrefillRow(2, tuple(prompts[2][:20]), 0, None, blocks.cover(2, 20), want_logits=False))
    decode([1])
    assert backend.kv_usage().seq_ids == {1, 2}
    prefill(
        PrefillRow(2, tuple(prompts[2][20:]), 20, None, blocks.cover(2, 37)),
        PrefillRow(3, tuple(prompts[3]), 0, None, blocks.cover(3, 19)),
    )
    decode([1, 2, 3])
    # seq 4 reuses seq 2's two full prompt blocks: only its last 6 tokens run
    shared = blocks.tables[2][:2]
    prefill(PrefillRow(4, tuple(prompts[4][32:]), 32, None, blocks.cover(4, 38, shared)))
    decode([3, 1, 4, 2])
    decode([1, 2, 3, 4], num_drafts=2)
    decode([4, 3, 2, 1], num_drafts=2)
    backend.release([2])  # leaves a hole among the rows that go on
    decode([1, 3, 4])
    decode([4, 1], num_drafts=1)
    for seq, tokens in got.items():
        assert tokens == want[seq][: len(tokens)], f"seq {seq}"
    assert min(len(tokens) for tokens in got.values()) >= 6
    usage = backend.kv_usage()
    assert usage.seq_ids == {1, 3, 4}
    assert usage.used_tokens == sum(len(prompts[s]) + len(got[s]) - 1 for s in (1, 3, 4))


def test_rejected_drafts_are_rewound(backend: PagedCpuBackend, model_dir: Path) -> None:
    vocab = backend.spec.vocab_size
    prompt = make_prompt(8, 18, vocab)
    want = greedy_reference(model_dir, prompt, 6)
    blocks = Blocks(128)
    out = backend.prefill(
        PrefillBatch((PrefillRow(5, tuple(prompt), 0, None, blocks.cover(5, 18)),))
    )
    first = int(out.logits[0, -1].argmax())
    wrong = (want[1] + 1) % vocab
    # drafts: one wrong token, then junk; only the first prediction counts
    row = DecodeRow(5, (first, wrong, 3), 18, None, blocks.cover(5, 21))
    second = int(backend.decode(DecodeBatch((row,))).logits[0, 0].argmax())
    assert backend.kv_usage().used_tokens == 21
    # the router restarts at the first rejected position, overwriting the junk KV
    row = DecodeRow(5, (second,), 19, None, blocks.cover(5, 20))
    third = int(backend.decode(DecodeBatch((row,))).logits[0, 0].argmax())
    assert [first, second, third] == want[:3]
    assert backend.kv_usage().used_tokens == 20


def test_prompt_logits_match_transformers(backend: PagedCpuBackend, model_dir: Path) -> None:
    prompt = make_prompt(9, 17, backend.spec.vocab_size)
    blocks = Blocks(128)
    rows = (
        PrefillRow(1, tuple(prompt[:4]), 0, None, blocks.cover(1, 4)),
        PrefillRow(2, tuple(prompt), 0, None, blocks.cover(2, 17), want_prompt_logits=True),
    )
    out = backend.prefill(PrefillBatch(rows))
    with torch.inference_mode():
        expected = _reference_model(model_dir)(torch.tensor([prompt])).logits[0]
    assert out.seq_ids == (1, 2) and set(out.prompt_logits) == {2}
    torch.testing.assert_close(out.prompt_logits[2], expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[1, 0], expected[-1], atol=2e-4, rtol=1e-4)


def test_bad_rows_are_refused_before_any_kv_changes(backend: PagedCpuBackend) -> None:
    blocks = Blocks(128)
    good = PrefillRow(1, (1, 2, 3), 0, None, blocks.cover(1, 3))
    for bad, message in (
        (PrefillRow(2, (1,) * 17, 0, None, (0,)), "needs 17 positions"),
        (PrefillRow(2, (1,), 0, None, (128,)), "outside the pool"),
        (PrefillRow(2, (10**6,), 0, None, (0,)), "outside the vocabulary"),
        (PrefillRow(2, (1,) * 97, 0, None, tuple(range(7))), "past --max-total-tokens"),
    ):
        with pytest.raises(BackendError, match=message):
            backend.prefill(PrefillBatch((good, bad)))
        assert backend.kv_usage().seq_ids == frozenset()
    with pytest.raises(BackendError, match="not live"):
        backend.decode(DecodeBatch((DecodeRow(3, (1,), 0, None, (0,)),)))


def test_warmup_refuses_a_pool_smaller_than_one_sequence(model_dir: Path) -> None:
    backend = PagedCpuBackend(model_dir, dtype=torch.float32, kv_cache_memory=512 * 64)
    with pytest.raises(BackendError, match="--max-total-tokens 96"):
        backend.warmup(LIMITS)
    sized = PagedCpuBackend(model_dir, dtype=torch.float32)
    capacity = sized.warmup(Limits(8, 24, 16, max_batch_total_tokens=100, max_batch_size=None))
    assert capacity.num_blocks == 7 and capacity.max_total_tokens == 112


def test_bf16_kv_storage_halves_bytes_per_token(model_dir: Path) -> None:
    backend = PagedCpuBackend(
        model_dir, dtype=torch.float32, kv_dtype=torch.bfloat16, kv_cache_memory=2**20
    )
    capacity = backend.warmup(LIMITS)
    assert capacity.bytes_per_token == 256
    backend.health()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.health()
