"""The compiled decode attention kernel (`_native`): built once per CPU and cached, equal
to a float reference on random paged layouts, and inside the paged engine equal to the
SDPA path it replaces."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tgi_backend_cpu._native import DecodeAttentionKernel, load_decode_attention
from tgi_backend_cpu.paged import PagedCpuBackend

from tgi.testing.steps import MIXED_STEP_TOKENS, mixed_step_logits
from tgi.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(
    shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler"
)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> DecodeAttentionKernel:
    cache = tmp_path_factory.mktemp("kernels")
    built, how = load_decode_attention(cache, "test-cpu")
    assert built is not None, how
    assert built.build_seconds is not None and "built by" in how
    again, how = load_decode_attention(cache, "test-cpu")  # a restart: from the cache
    assert again is not None and again.build_seconds is None and "cached" in how
    other, _ = load_decode_attention(cache, "another-cpu")  # -march=native: per CPU
    assert other is not None and other.path != built.path
    return built


def _reference(q, keys, values, tables, seq_lens, block_size, window):  # type: ignore[no-untyped-def]
    """Per row: gather its keys through its table, float32 attention of its one query."""
    rows, heads, _ = q.shape
    group = heads // keys.shape[1]
    out = []
    for r in range(rows):
        n = int(seq_lens[r])
        first = max(0, n - window) if window else 0
        pos = torch.arange(first, n)
        slots = tables[r][pos // block_size] * block_size + pos % block_size
        k = keys[slots].float().transpose(0, 1).repeat_interleave(group, 0)  # [H, n, D]
        v = values[slots].float().transpose(0, 1).repeat_interleave(group, 0)
        out.append(F.scaled_dot_product_attention(q[r].float()[:, None], k, v)[:, 0])
    return torch.stack(out)


# (dtype, rtol, atol): bf16 rounds its weights and output; float32 sums in another order
PRECISION = {torch.bfloat16: (2e-2, 1e-2), torch.float32: (1e-5, 1e-5)}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("seed", range(8))
def test_the_kernel_equals_float_attention_on_random_paged_rows(
    kernel: DecodeAttentionKernel, seed: int, dtype: torch.dtype
) -> None:
    rng = random.Random(seed)
    torch.manual_seed(seed)
    kv_heads, group = rng.choice([(1, 1), (3, 3), (2, 4), (4, 1)])
    # 72: no vector path (not a multiple of 16); 80: bf16's scores by the scalar path
    head_dim = rng.choice([64, 72, 80, 128])
    block_size = rng.choice([4, 16])
    rows, max_blocks = rng.randrange(1, 7), 12
    num_blocks = rows * max_blocks + 3
    keys = torch.randn(num_blocks * block_size, kv_heads, head_dim, dtype=dtype)
    values = torch.randn_like(keys)
    tables = torch.randperm(num_blocks)[: rows * max_blocks].view(rows, max_blocks)
    seq_lens = torch.tensor([rng.randrange(1, max_blocks * block_size) for _ in range(rows)])
    # q as a slice of a wider tensor (the fused QKV output): rows are not contiguous
    wide = torch.randn(rows, kv_heads * group + 2 * kv_heads, head_dim, dtype=dtype)
    q = wide[:, : kv_heads * group]
    window = rng.choice([None, 5])
    got = kernel(
        q,
        keys,
        values,
        tables,
        torch.arange(rows),
        seq_lens,
        block_size=block_size,
        scale=head_dim**-0.5,
        window=window,
        max_len=int(seq_lens.max()),
    )
    expected = _reference(q, keys, values, tables, seq_lens, block_size, window)
    assert got.dtype == dtype
    rtol, atol = PRECISION[dtype]
    torch.testing.assert_close(got.float(), expected, rtol=rtol, atol=atol)


def test_rows_read_their_own_row_of_the_runners_tables(kernel: DecodeAttentionKernel) -> None:
    """`table_rows` picks each step row's row of the whole tables tensor."""
    torch.manual_seed(0)
    keys = torch.randn(64, 1, 64, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    tables = torch.tensor([[0, 1], [2, 3], [3, 2]])
    q = torch.randn(2, 1, 64, dtype=torch.bfloat16)
    seq_lens = torch.tensor([20, 20])
    args = dict(block_size=16, scale=0.125, window=None, max_len=20)
    got = kernel(q, keys, values, tables, torch.tensor([2, 1]), seq_lens, **args)  # type: ignore[arg-type]
    expected = _reference(q, keys, values, tables[[2, 1]], seq_lens, 16, None)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("window", [None, 5])
def test_rows_sharing_a_table_in_any_order_read_their_own_keys(
    kernel: DecodeAttentionKernel, window: int | None
) -> None:
    """A thread reuses the key offsets of the table its previous row read (a prompt
    chunk's rows share one): rows of a few tables in random order and lengths, longer
    and shorter than the one before, each still read exactly its own keys."""
    rng = random.Random(7)
    torch.manual_seed(7)
    block_size, max_blocks, num_tables = 4, 10, 3
    keys = torch.randn(num_tables * max_blocks * block_size, 3, 64, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    tables = torch.randperm(num_tables * max_blocks).view(num_tables, max_blocks)
    table_rows = torch.tensor([rng.randrange(num_tables) for _ in range(41)])
    seq_lens = torch.tensor([rng.randrange(1, max_blocks * block_size) for _ in range(41)])
    q = torch.randn(41, 9, 64, dtype=torch.bfloat16)
    args = dict(block_size=block_size, scale=0.125, window=window, max_len=int(seq_lens.max()))
    got = kernel(q, keys, values, tables, table_rows, seq_lens, **args)  # type: ignore[arg-type]
    expected = _reference(q, keys, values, tables[table_rows], seq_lens, block_size, window)
    torch.testing.assert_close(got.float(), expected, rtol=2e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_paged_engine_attends_with_the_kernel_as_with_sdpa(
    kernel: DecodeAttentionKernel, tmp_path: Path, dtype: torch.dtype
) -> None:
    """Engines with and without the kernel: prefill, decode and mixed steps (a chunk
    beside decode rows) agree closely (to float32's rounding in float32); the kernel
    runs every step's attention, one query row per token."""
    model = build_tiny_model(tmp_path / "tiny", "llama")
    calls: list[int] = []

    class Counted:  # the kernel, counting the rows it attends for
        def __init__(self, inner: DecodeAttentionKernel) -> None:
            self.inner = inner

        def fits(self, *shape: int) -> bool:
            return self.inner.fits(*shape)

        def __call__(self, q: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            calls.append(q.shape[0])
            return self.inner(q, *args, **kwargs)

    counted = Counted(kernel)
    engines = [
        PagedCpuBackend(model, dtype=dtype, kv_cache_memory=2**24, decode_kernel=k)
        for k in (counted, None)  # type: ignore[arg-type]
    ]
    outs = [mixed_step_logits(engine) for engine in engines]
    layers = engines[0].spec.num_layers
    # one kernel call per layer per step, one query row per token of the step
    assert calls == [n for n in MIXED_STEP_TOKENS for _ in range(layers)]
    for with_kernel, with_sdpa in zip(*outs, strict=True):
        if dtype == torch.float32:
            torch.testing.assert_close(with_kernel, with_sdpa, rtol=1e-4, atol=1e-4)
            assert torch.equal(with_kernel.argmax(-1), with_sdpa.argmax(-1))
            continue
        torch.testing.assert_close(with_kernel, with_sdpa, rtol=0.05, atol=0.05)
        _same_greedy_up_to_near_ties(with_kernel, with_sdpa)


def _same_greedy_up_to_near_ties(got: torch.Tensor, want: torch.Tensor) -> None:
    """Each row's argmax equal, or SDPA's own top two within 0.05 of each other (a random
    tiny model's logits sit close together; bf16 sums in another order may flip them)."""
    ours, theirs = got.argmax(-1), want.argmax(-1)
    gap = want.gather(-1, theirs[..., None]) - want.gather(-1, ours[..., None])
    assert bool(((ours == theirs) | (gap.squeeze(-1) < 0.05)).all()), (ours, theirs, gap)


def test_loading_the_kernel_leaves_denormals_alone(kernel: DecodeAttentionKernel) -> None:
    """No -ffast-math: its crtfastmath would flush denormals to zero process-wide."""
    tiny = torch.tensor(1e-39, dtype=torch.float32)
    assert float(tiny * 1.0) != 0.0


def test_models_beyond_the_kernels_limits_keep_sdpa(kernel: DecodeAttentionKernel) -> None:
    assert kernel.fits(9, 3, 64) and kernel.fits(32, 1, 256)
    assert not kernel.fits(33, 1, 64) and not kernel.fits(8, 8, 512)


def test_a_cache_that_cannot_be_written_means_sdpa_not_a_crash(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a directory")
    built, why = load_decode_attention(blocked, "another")
    assert built is None and "failed" in why
