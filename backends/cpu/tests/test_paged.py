"""The paged CPU engine against transformers' greedy `generate()`, driven by hand-built
contract-v2 plans: alone, in mixed steps (new sequences, chunks and decode rows in one
forward), chunked, with a cached prefix, with drafts, preempted and resumed."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cpu._paged_attention import CpuPagedAttention
from tgi_backend_cpu.paged import BLOCK_SIZE, PagedCpuBackend

from tgi.backend.contract import (
    KvLayout,
    Limits,
    NewSequence,
    RunningSequence,
    StepPlan,
    WarmupReport,
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
    report = backend.warmup(LIMITS)  # warmup twice re-sizes the same
    assert isinstance(report, WarmupReport) and report.seconds > 0
    # tiny models: 2 layers x 2 kv heads x head_dim 16 x (K, V) x 4 bytes
    assert report.kv.bytes_per_token == 512
    assert report.kv.num_blocks == 2**20 // (512 * BLOCK_SIZE) == 128
    assert report.kv.total_tokens == 128 * BLOCK_SIZE
    assert report.kv.block_size == BLOCK_SIZE
    assert backend.kv_usage().seq_ids == frozenset()
    assert backend.kv_usage().capacity_tokens == 128 * BLOCK_SIZE


def test_alone_matches_generate(
    backend: PagedCpuBackend, model_dir: Path, make_driver: Any, reference: Any
) -> None:
    driver = make_driver(backend, num_blocks=128)
    prompt = make_prompt(1, 21, backend.spec.vocab_size)
    driver.step(driver.new(1, prompt))
    while len(driver.tokens(1)) < NUM_NEW:
        driver.step(driver.decode(1))
    assert driver.tokens(1) == reference.greedy(model_dir, prompt, NUM_NEW)
    usage = backend.kv_usage()
    assert usage.seq_ids == {1} and usage.used_tokens == 21 + NUM_NEW - 1
    backend.release([1, 99])
    assert backend.kv_usage().seq_ids == frozenset()


def test_mixed_steps_match_generate(
    backend: PagedCpuBackend, model_dir: Path, make_driver: Any, reference: Any
) -> None:
    """New sequences, prompt chunks and decode rows (with and without drafts) share one
    forward; one prompt is chunked, one starts past a shared cached prefix."""
    vocab = backend.spec.vocab_size
    prompts = {
        1: make_prompt(1, 5, vocab),
        2: make_prompt(2, 37, vocab),
        3: make_prompt(3, 19, vocab),
    }
    prompts[4] = prompts[2][:32] + make_prompt(4, 6, vocab)  # shares 2 full blocks with seq 2
    want = {
        seq: reference.greedy(model_dir, prompt, NUM_NEW + 8) for seq, prompt in prompts.items()
    }
    driver = make_driver(backend, num_blocks=128)

    def drafts(seq: int, count: int) -> list[int]:  # the true next tokens
        done = len(driver.tokens(seq))
        return want[seq][done : done + count]

    driver.step(driver.new(1, prompts[1]))
    driver.step(driver.decode(1))
    # seq 2's 37 tokens in two chunks: 20 (no logits) next to a decode row, then 17
    # next to seq 3's whole prompt and the decode row, all in one forward
    driver.step(driver.new(2, prompts[2], end=20), driver.decode(1))
    assert backend.kv_usage().seq_ids == {1, 2}
    driver.step(driver.new(3, prompts[3]), driver.chunk(2), driver.decode(1))
    driver.step(driver.decode(1), driver.decode(2), driver.decode(3))
    # seq 4 reuses seq 2's two full prompt blocks: only its last 6 tokens run
    new4 = driver.new(4, prompts[4], start=32, shared_from=2)
    driver.step(new4, driver.decode(3), driver.decode(1), driver.decode(2))
    driver.step(*(driver.decode(seq, drafts(seq, 2)) for seq in (1, 2, 3, 4)))
    # rows of different widths: logits padded to the widest
    driver.step(
        driver.decode(4, drafts(4, 2)),
        driver.decode(3),
        driver.decode(2, drafts(2, 1)),
        driver.decode(1),
    )
    driver.release([2])  # leaves a hole among the rows that go on
    driver.step(driver.decode(1), driver.decode(3), driver.decode(4))
    driver.step(driver.decode(4, drafts(4, 1)), driver.decode(1))
    for seq in prompts:
        tokens = driver.tokens(seq)
        assert tokens == want[seq][: len(tokens)], f"seq {seq}"
    assert min(len(driver.tokens(seq)) for seq in prompts) >= 6
    usage = backend.kv_usage()
    assert usage.seq_ids == {1, 3, 4}
    held = sum(len(prompts[s]) + len(driver.tokens(s)) - 1 for s in (1, 3, 4))
    assert usage.used_tokens == held


def test_rejected_drafts_are_rewound(
    backend: PagedCpuBackend, model_dir: Path, make_driver: Any, reference: Any
) -> None:
    vocab = backend.spec.vocab_size
    prompt = make_prompt(8, 18, vocab)
    want = reference.greedy(model_dir, prompt, 6)
    driver = make_driver(backend, num_blocks=128)
    driver.step(driver.new(5, prompt))
    wrong = (want[1] + 1) % vocab
    # drafts: one wrong token, then junk; only the first prediction counts
    driver.step(driver.decode(5, (wrong, 3)))
    assert backend.kv_usage().used_tokens == 21
    # the next step restarts at the first rejected position, overwriting the junk KV
    assert driver.seqs[5].in_kv == 19
    driver.step(driver.decode(5))
    assert driver.tokens(5) == want[:3]
    assert backend.kv_usage().used_tokens == 20


def test_prompt_logits_match_transformers(
    backend: PagedCpuBackend, model_dir: Path, make_driver: Any, reference: Any
) -> None:
    prompt = make_prompt(9, 17, backend.spec.vocab_size)
    driver = make_driver(backend, num_blocks=128)
    driver.step(driver.new(1, prompt[:4]))
    out = driver.step(driver.new(2, prompt, want_prompt_logits=True), driver.decode(1))
    expected = reference.logits(model_dir, prompt)
    assert out.seq_ids == (2, 1) and set(out.prompt_logits) == {2}
    assert out.logits is not None
    torch.testing.assert_close(out.prompt_logits[2], expected, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits[0, 0], expected[-1], atol=2e-4, rtol=1e-4)


def test_finished_and_preempted_leave_before_the_forward(
    backend: PagedCpuBackend, model_dir: Path, make_driver: Any, reference: Any
) -> None:
    vocab = backend.spec.vocab_size
    prompts = {1: make_prompt(11, 9, vocab), 2: make_prompt(12, 23, vocab)}
    driver = make_driver(backend, num_blocks=128)
    driver.step(driver.new(1, prompts[1]), driver.new(2, prompts[2]))
    driver.step(driver.decode(1), driver.decode(2))
    driver.step(driver.decode(2), preempted=[1])
    assert backend.kv_usage().seq_ids == {2}
    # seq 1 comes back under its id, recomputed from scratch, and goes on as if nothing
    # had happened; seq 2 finishes in the same step
    driver.step(driver.resume(1), finished=[2])
    assert backend.kv_usage().seq_ids == {1}
    for _ in range(3):
        driver.step(driver.decode(1))
    assert driver.tokens(1) == reference.greedy(model_dir, prompts[1], 5)
    assert driver.tokens(2) == reference.greedy(model_dir, prompts[2], 3)
    driver.step(finished=[1])  # a plan with no rows only releases
    assert backend.kv_usage().seq_ids == frozenset()


def test_one_step_runs_each_layer_once(
    backend: PagedCpuBackend, make_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of a new prompt, a later chunk and decode rows with and without drafts is
    ONE forward: each layer's attention op and fused QKV projection run exactly once."""
    vocab = backend.spec.vocab_size
    driver = make_driver(backend, num_blocks=128)
    driver.step(driver.new(1, make_prompt(1, 7, vocab)), driver.new(2, make_prompt(2, 30, vocab)))
    driver.step(driver.new(3, make_prompt(3, 40, vocab), end=16))
    calls: Counter[tuple[str, int]] = Counter()
    attend = CpuPagedAttention.__call__

    def counted(self: CpuPagedAttention, layer_index: int, *args: Any) -> torch.Tensor:
        calls["attention", layer_index] += 1
        return attend(self, layer_index, *args)

    monkeypatch.setattr(CpuPagedAttention, "__call__", counted)
    model = backend.runner.model
    hooks = [
        layer.qkv_proj.register_forward_hook(lambda *_, index=index: calls.update([("qkv", index)]))
        for index, layer in enumerate(model.layers)
    ]
    try:
        out = driver.step(
            driver.new(4, make_prompt(4, 12, vocab)),
            driver.chunk(3),
            driver.decode(1, (5, 6)),
            driver.decode(2),
        )
    finally:
        for hook in hooks:
            hook.remove()
    assert out.seq_ids == (4, 3, 1, 2)
    num_layers = backend.spec.num_layers
    expected = {(kind, i): 1 for kind in ("attention", "qkv") for i in range(num_layers)}
    assert dict(calls) == expected


def test_running_rows_carry_only_appended_blocks(
    backend: PagedCpuBackend, make_driver: Any
) -> None:
    """The runner keeps each table: a running row names only the blocks appended to it."""
    driver = make_driver(backend, num_blocks=128)
    driver.step(driver.new(1, make_prompt(5, 15, backend.spec.vocab_size)))
    rows = [driver.decode(1)]
    driver.step(rows[0])
    rows.append(driver.decode(1))  # position 16: the first position of a second block
    driver.step(rows[1])
    assert [row.new_block_ids for row in rows] == [(), (driver.seqs[1].blocks[1],)]
    tables = backend.runner._warm.tables  # type: ignore[union-attr]
    assert tables.blocks(1) == driver.seqs[1].blocks
    assert tables.tensor[tables.row(1), :2].tolist() == driver.seqs[1].blocks


def test_broken_plans_raise_backend_error(backend: PagedCpuBackend, make_driver: Any) -> None:
    driver = make_driver(backend, num_blocks=128)
    driver.step(driver.new(1, (1, 2, 3)))
    for plan, message in (
        (StepPlan(running=(RunningSequence(9, 0, (1,)),)), "seq 9 runs at position 0"),
        (StepPlan(running=(RunningSequence(1, 4, (1,)),)), "holds 3 of its tokens"),
        (StepPlan(new=(NewSequence(1, (1,), block_ids=(5,)),)), "already live"),
        (StepPlan(running=(RunningSequence(1, 3, decode=True),)), "no last token"),
    ):
        with pytest.raises(BackendError, match=message):
            backend.step(plan)
    # a table too short for its tokens: refused before it writes into another's block
    with pytest.raises(BackendError, match="seq 2 needs 17 positions but has 1 blocks"):
        backend.step(StepPlan(new=(NewSequence(2, (1,) * 17, block_ids=(0,)),)))
    assert 2 not in backend.kv_usage().seq_ids
    with pytest.raises(BackendError, match="seq 1 needs 17 positions but has 1 blocks"):
        backend.step(StepPlan(running=(RunningSequence(1, 3, (1,) * 14),)))


def test_a_failed_forward_releases_the_step_rows(
    backend: PagedCpuBackend, make_driver: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = make_driver(backend, num_blocks=128)
    driver.step(driver.new(1, (1, 2, 3)), driver.new(2, (4, 5)))

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backend.runner, "_forward", broken)
    with pytest.raises(BackendError, match="forward of 1 rows failed: out of memory"):
        backend.step(StepPlan(running=(driver.decode(1),)))
    assert backend.kv_usage().seq_ids == {2}


def test_steps_need_warmup_and_stop_after_close(model_dir: Path) -> None:
    backend = PagedCpuBackend(model_dir, dtype=torch.float32, kv_cache_memory=2**20)
    with pytest.raises(BackendError, match="warmup"):
        backend.step(StepPlan(new=(NewSequence(1, (1,), block_ids=(0,)),)))
    backend.warmup(LIMITS)
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.step(StepPlan())


def test_warmup_refuses_a_pool_smaller_than_one_sequence(model_dir: Path) -> None:
    backend = PagedCpuBackend(model_dir, dtype=torch.float32, kv_cache_memory=512 * 64)
    with pytest.raises(BackendError, match=r"--max-total-tokens 96.*--kv-cache-memory"):
        backend.warmup(LIMITS)
    sized = PagedCpuBackend(model_dir, dtype=torch.float32)
    report = sized.warmup(Limits(8, 24, 16, max_batch_total_tokens=100, max_batch_size=None))
    assert report.kv.num_blocks == 7 and report.kv.total_tokens == 112


def test_bf16_kv_storage_halves_bytes_per_token(model_dir: Path) -> None:
    backend = PagedCpuBackend(
        model_dir, dtype=torch.float32, kv_dtype=torch.bfloat16, kv_cache_memory=2**20
    )
    assert backend.warmup(LIMITS).kv.bytes_per_token == 256
    backend.health()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.health()
