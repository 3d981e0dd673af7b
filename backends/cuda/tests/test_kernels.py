"""The paged attention kernels against each other and against a naive per-row loop.

The Triton kernels run on the CPU under Triton's interpreter: TRITON_INTERPRET must be
set before triton is imported (its `jit` reads it when the kernels are defined), hence
the one environment write at import.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import dataclasses
import importlib.util
import math
import random
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from tgi_backend_cuda.kernels import paged_attention_torch

AttentionFn = Callable[..., torch.Tensor]
POISON = 30.0  # every slot no row owns below its length: a kernel reading one is far off
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass(frozen=True, slots=True)
class Step:
    """One step's inputs, as the backend would pass them to a layer."""

    q: torch.Tensor  # [N, H, D]
    key_cache: torch.Tensor  # [num_slots, KVH, D]
    value_cache: torch.Tensor
    block_tables: torch.Tensor  # [R, max_blocks]
    query_start: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_size: int
    k_scale: float
    v_scale: float

    def run(self, fn: AttentionFn, window: int | None = None, **kwargs: Any) -> torch.Tensor:
        return fn(
            self.q,
            self.key_cache,
            self.value_cache,
            self.block_tables,
            self.query_start,
            self.seq_lens,
            block_size=self.block_size,
            scale=1 / math.sqrt(self.q.shape[-1]),
            window=window,
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            **kwargs,
        )


def make_step(
    rows: Sequence[tuple[int, int]],  # (cached, new) tokens per row
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int = 64,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    cache_dtype: torch.dtype | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    table_dtype: torch.dtype = torch.int32,
    garbage: int | None = None,
    seed: int = 0,
) -> Step:
    """Rows' blocks drawn from a shuffled pool; every slot past a row's length holds
    POISON, and so do the blocks that table columns past a row's length name (random
    ids, or `garbage`: an id no pool has)."""
    gen = torch.Generator().manual_seed(seed)
    lens = [cached + new for cached, new in rows]
    needed = [-(-length // block_size) for length in lens]
    num_blocks = sum(needed) + 3
    order = torch.randperm(num_blocks, generator=gen)
    width = max(needed) + 2
    tables = torch.randint(0, num_blocks, (len(rows), width), generator=gen)
    shape = (num_blocks * block_size, num_kv_heads, head_dim)
    cache_dtype = cache_dtype or dtype
    keys, values = torch.full(shape, POISON), torch.full(shape, POISON)
    first = 0
    for row, (length, count) in enumerate(zip(lens, needed, strict=True)):
        tables[row, :count] = order[first : first + count]
        if garbage is not None:
            tables[row, count:] = garbage
        first += count
        pos = torch.arange(length)
        slots = tables[row, pos // block_size] * block_size + pos % block_size
        keys[slots] = torch.randn((length, *shape[1:]), generator=gen) / k_scale
        values[slots] = torch.randn((length, *shape[1:]), generator=gen) / v_scale
    counts = torch.tensor([new for _, new in rows])
    query_start = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    q = torch.randn((int(counts.sum()), num_heads, head_dim), generator=gen)
    return Step(
        q=q.to(dtype),
        key_cache=keys.to(cache_dtype),
        value_cache=values.to(cache_dtype),
        block_tables=tables.to(table_dtype),
        query_start=query_start.to(torch.int32),
        seq_lens=torch.tensor(lens, dtype=torch.int32),
        block_size=block_size,
        k_scale=k_scale,
        v_scale=v_scale,
    )


def naive_attention(step: Step, window: int | None = None) -> torch.Tensor:
    """[N, H, D] float32: each row on its own, dense keys gathered slot by slot, GQA by
    repeat_interleave, softmax over explicit float32 scores."""
    q = step.q.float()
    num_heads, head_dim = q.shape[1:]
    group = num_heads // step.key_cache.shape[1]
    out = torch.zeros_like(q)
    starts = step.query_start.tolist()
    for row, length in enumerate(step.seq_lens.tolist()):
        first, end = starts[row], starts[row + 1]
        if first == end:
            continue
        table = step.block_tables[row].tolist()
        slots = [table[j // step.block_size] * step.block_size + j % step.block_size
                 for j in range(length)]  # fmt: skip
        k = step.key_cache[slots].float().repeat_interleave(group, dim=1) * step.k_scale
        v = step.value_cache[slots].float().repeat_interleave(group, dim=1) * step.v_scale
        scores = torch.einsum("nhd,lhd->hnl", q[first:end], k) / math.sqrt(head_dim)
        pos = torch.arange(length - (end - first), length)[:, None]  # [n, 1]
        keys = torch.arange(length)[None, :]
        visible = keys <= pos
        if window is not None:
            visible &= keys > pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[first:end] = torch.einsum("hnl,lhd->nhd", scores.softmax(-1), v)
    return out


def assert_close(actual: torch.Tensor, expected: torch.Tensor, step: Step) -> None:
    """Within float32 rounding for float32 queries; for 16-bit ones, within the rounding
    of the weights to q's dtype (the kernels' P @ V) and of the output."""
    assert actual.dtype == step.q.dtype
    tol = 1e-4 if step.q.dtype == torch.float32 else 3e-2
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def random_rows(rng: random.Random, max_rows: int = 5) -> list[tuple[int, int]]:
    """1..max_rows rows of any kind: decode, prefill with and without a cached prefix,
    drafts, no queries; at most ~40 new tokens."""
    kinds = {
        "decode": lambda: (rng.randint(0, 30), 1),
        "prefill": lambda: (0, rng.randint(2, 12)),
        "chunk": lambda: (rng.randint(1, 20), rng.randint(2, 10)),
        "draft": lambda: (rng.randint(1, 25), rng.randint(2, 4)),
        "idle": lambda: (rng.randint(0, 10), 0),
    }
    rows = [kinds[rng.choice(list(kinds))]() for _ in range(rng.randint(1, max_rows))]
    if sum(new for _, new in rows) == 0:
        rows.append((3, 1))
    return rows


# -- the reference -------------------------------------------------------------------------


def test_reference_matches_sdpa_on_dense_causal_prefill() -> None:
    step = make_step([(0, 13)], num_heads=6, num_kv_heads=2, head_dim=32, block_size=4)
    pos = torch.arange(13)
    slots = step.block_tables[0, pos // 4].long() * 4 + pos % 4
    q = step.q.transpose(0, 1)[None]  # [1, H, N, D]
    k = step.key_cache[slots].transpose(0, 1)[None]
    v = step.value_cache[slots].transpose(0, 1)[None]
    expected = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    torch.testing.assert_close(step.run(paged_attention_torch), expected[0].transpose(0, 1))


@pytest.mark.parametrize("seed", range(24))
def test_reference_matches_naive_loop(seed: int) -> None:
    rng = random.Random(seed)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    cache_dtype = rng.choice([dtype, dtype, *FP8])
    num_kv_heads, group = rng.choice([1, 2]), rng.choice([1, 3, 4])
    step = make_step(
        random_rows(rng),
        num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=rng.choice([16, 64, 80]),
        block_size=rng.choice([4, 8, 16]),
        dtype=dtype,
        cache_dtype=cache_dtype,
        k_scale=0.5 if cache_dtype in FP8 else 1.0,
        v_scale=2.0 if cache_dtype in FP8 else 1.0,
        table_dtype=rng.choice([torch.int32, torch.int64]),
        garbage=rng.choice([None, -1]),
        seed=seed,
    )
    window = rng.choice([None, 1, 5])
    assert_close(step.run(paged_attention_torch, window), naive_attention(step, window), step)


def test_reference_takes_host_maxima_and_writes_out() -> None:
    step = make_step([(5, 3), (0, 0), (9, 1)], num_heads=4, num_kv_heads=2)
    out = torch.full_like(step.q, float("nan"))
    result = step.run(paged_attention_torch, max_query_len=3, max_seq_len=10, out=out)
    assert result is out
    assert_close(out, naive_attention(step), step)


# -- the Triton kernels --------------------------------------------------------------------


@pytest.fixture
def triton_attention() -> AttentionFn:
    """`paged_attention_triton`, run by Triton's interpreter here."""
    pytest.importorskip("triton", reason="the Triton kernels' tests need triton")
    from tgi_backend_cuda.kernels import triton_attention

    return triton_attention.paged_attention_triton


BF16 = {"dtype": torch.bfloat16}
FP16 = {"dtype": torch.float16}
VARLEN_CASES: dict[str, tuple[list[tuple[int, int]], dict[str, Any], int | None]] = {
    # name: ((cached, new) per row, make_step options, window)
    "fp32-mha-d64": ([(0, 9), (12, 1), (5, 6), (20, 3)], {"num_heads": 2, "num_kv_heads": 2}, None),
    "fp32-gqa4-d128-window": (
        [(0, 12), (17, 1), (30, 4), (6, 0)],
        {"num_heads": 4, "num_kv_heads": 1, "head_dim": 128},
        5,
    ),
    "bf16-gqa3-d64": (
        [(0, 7), (3, 1), (21, 5), (40, 2)],
        {"num_heads": 6, "num_kv_heads": 2, **BF16},
        None,
    ),
    "bf16-gqa4-window-i64-tables": (
        [(33, 3), (0, 10), (8, 1)],
        {"num_heads": 4, "num_kv_heads": 1, "table_dtype": torch.int64, "garbage": -1, **BF16},
        5,
    ),
    "fp16-gqa2-d96": (
        [(0, 8), (19, 3), (2, 0), (6, 1)],
        {"num_heads": 4, "num_kv_heads": 2, "head_dim": 96, **FP16},
        None,
    ),
    "fp8e4m3-bf16-gqa4-scaled": (
        [(10, 6), (0, 8), (25, 1), (4, 0), (2, 3)],
        {
            "num_heads": 4,
            "num_kv_heads": 1,
            "cache_dtype": torch.float8_e4m3fn,
            "k_scale": 0.5,
            "v_scale": 2.0,
            **BF16,
        },
        None,
    ),
    "fp8e4m3-fp16-window": (
        [(14, 4), (0, 5)],
        {
            "num_heads": 3,
            "num_kv_heads": 1,
            "cache_dtype": torch.float8_e4m3fn,
            "k_scale": 1.5,
            "v_scale": 0.5,
            **FP16,
        },
        5,
    ),
    "fp32-block8-d80": (
        [(0, 11), (14, 2), (3, 1)],
        {"num_heads": 3, "num_kv_heads": 1, "head_dim": 80, "block_size": 8},
        5,
    ),
    "fp32-block32": (
        [(40, 4), (0, 9)],
        {"num_heads": 2, "num_kv_heads": 1, "block_size": 32},
        None,
    ),
    "fp32-two-query-blocks": (
        [(3, 70), (9, 1)],
        {"num_heads": 1, "num_kv_heads": 1, "head_dim": 16},
        9,
    ),
}


@pytest.mark.parametrize("name", list(VARLEN_CASES))
def test_triton_varlen_matches_reference(name: str, triton_attention: AttentionFn) -> None:
    rows, options, window = VARLEN_CASES[name]
    step = make_step(rows, seed=len(name), **options)
    reference = step.run(paged_attention_torch, window)
    assert_close(reference, naive_attention(step, window), step)
    assert_close(step.run(triton_attention, window), reference, step)


DECODE_CASES: dict[str, tuple[list[int], dict[str, Any], int | None]] = {
    # name: (cached tokens per row, make_step options, window)
    "fp32-mha-d64": ([5, 0, 17, 33], {"num_heads": 2, "num_kv_heads": 2}, None),
    "fp32-gqa3-d128-window": ([1, 16, 40], {"num_heads": 3, "num_kv_heads": 1, "head_dim": 128}, 5),
    "bf16-gqa4-d64": ([9, 31, 2], {"num_heads": 8, "num_kv_heads": 2, **BF16}, None),
    "fp16-gqa4-d96-garbage": (
        [20, 3],
        {"num_heads": 4, "num_kv_heads": 1, "head_dim": 96, "garbage": -1, **FP16},
        None,
    ),
    "fp8e5m2-fp32-gqa4-scaled-block8": (
        [12, 0, 26],
        {
            "num_heads": 4,
            "num_kv_heads": 1,
            "cache_dtype": torch.float8_e5m2,
            "k_scale": 2.0,
            "v_scale": 0.25,
            "block_size": 8,
        },
        3,
    ),
    "fp8e4m3-bf16-gqa3": (
        [7, 22],
        {
            "num_heads": 6,
            "num_kv_heads": 2,
            "cache_dtype": torch.float8_e4m3fn,
            "k_scale": 0.5,
            **BF16,
        },
        None,
    ),
    "fp32-d80-block32": (
        [0, 45],
        {"num_heads": 2, "num_kv_heads": 1, "head_dim": 80, "block_size": 32},
        None,
    ),
}


@pytest.mark.parametrize("name", list(DECODE_CASES))
def test_triton_decode_matches_reference(name: str, triton_attention: AttentionFn) -> None:
    """One query per row, a row without a query among them."""
    cached, options, window = DECODE_CASES[name]
    rows = [(length, 1) for length in cached] + [(7, 0)]
    step = make_step(rows, seed=len(name), **options)
    reference = step.run(paged_attention_torch, window, max_query_len=1)
    assert_close(reference, naive_attention(step, window), step)
    assert_close(step.run(triton_attention, window, max_query_len=1), reference, step)


def test_triton_decode_graph_padding_rows(triton_attention: AttentionFn) -> None:
    """A CUDA graph's padding rows (one query, one key in a shared scratch block) beside a
    real one: each attends to its single key, whose value it returns."""
    step = make_step([(20, 1), (0, 1), (0, 1)], num_heads=4, num_kv_heads=2, seed=3)
    tables = step.block_tables.clone()
    tables[2] = tables[1]  # both padding rows read the same scratch block
    step = dataclasses.replace(step, block_tables=tables)
    out = step.run(triton_attention)
    assert_close(out, naive_attention(step), step)
    scratch_value = step.value_cache[int(tables[1, 0]) * step.block_size]  # [KVH, D]
    assert_close(out[1:], scratch_value.repeat_interleave(2, dim=0).expand(2, -1, -1), step)


@pytest.mark.parametrize("seed", range(10))
def test_triton_random_steps(seed: int, triton_attention: AttentionFn) -> None:
    rng = random.Random(100 + seed)
    dtype = rng.choice([torch.float32, torch.bfloat16, torch.float16])
    cache_dtype = rng.choice([dtype, dtype, torch.float8_e4m3fn])
    num_kv_heads, group = rng.choice([(1, 1), (1, 3), (1, 4), (2, 2)])
    step = make_step(
        random_rows(rng, max_rows=4),
        num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=rng.choice([32, 64, 80]),
        dtype=dtype,
        cache_dtype=cache_dtype,
        k_scale=0.5 if cache_dtype in FP8 else 1.0,
        block_size=rng.choice([8, 16]),
        seed=seed,
    )
    window = rng.choice([None, 5])
    assert_close(step.run(triton_attention, window), naive_attention(step, window), step)


def test_triton_writes_out_in_place(triton_attention: AttentionFn) -> None:
    step = make_step([(4, 5), (11, 1)], num_heads=2, num_kv_heads=1)
    out = torch.full_like(step.q, float("nan"))
    result = step.run(triton_attention, out=out, max_query_len=5)
    assert result is out
    assert_close(out, naive_attention(step), step)


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_heads_must_split_over_kv_heads(impl: str, request: pytest.FixtureRequest) -> None:
    fn = paged_attention_torch if impl == "torch" else request.getfixturevalue("triton_attention")
    step = make_step([(0, 2)], num_heads=3, num_kv_heads=3)
    with pytest.raises(ValueError, match="do not split"):
        dataclasses.replace(step, q=step.q[:, :2]).run(fn)
    with pytest.raises(ValueError, match="window"):
        step.run(fn, window=0)


def test_package_import_leaves_triton_alone() -> None:
    """The backend must import where Triton is missing: the package loads it on demand."""
    code = "import sys, tgi_backend_cuda.kernels as k; assert 'triton' not in sys.modules"
    if importlib.util.find_spec("triton") is not None:
        code += "; k.paged_attention_triton; assert 'triton' in sys.modules"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# Compiles the kernels for a Hopper GPU without one (Triton ships ptxas): the interpreter
# runs constructs the compiler rejects, and this runs in CI, which has no GPU.
_COMPILE = """
import sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tgi_backend_cuda.kernels import triton_attention as ta

POINTERS = {"q_ptr": 0, "out_ptr": 0, "k_ptr": 1, "v_ptr": 1}
for name, q_type, kv_type, head_dim, extra in [
    ("_decode_kernel", "bf16", "bf16", 128, {"BLOCK_G": 16, "BLOCK_N": 16}),
    ("_varlen_kernel", "fp16", "fp8e4nv", 80, {"BLOCK_M": 64, "BLOCK_N": 32}),
    ("_varlen_kernel", "fp32", "fp32", 64, {"BLOCK_M": 64, "BLOCK_N": 32}),
]:
    kernel = getattr(ta, name)
    meta = {"GROUP": 4, "HEAD_DIM": head_dim, "BLOCK_SIZE": 16, "HAS_WINDOW": True,
            "DOT_F32": q_type == "fp32", "BLOCK_D": triton.next_power_of_2(head_dim), **extra}
    signature = {}
    for arg in kernel.arg_names:
        if arg in meta:
            signature[arg] = "constexpr"
        elif arg in POINTERS:
            signature[arg] = "*" + (q_type, kv_type)[POINTERS[arg]]
        elif arg.endswith("_ptr"):
            signature[arg] = "*i32"
        else:
            signature[arg] = "fp32" if arg.endswith("scale") else "i32"
    constexprs = {(kernel.arg_names.index(k),): v for k, v in meta.items()}
    triton.compile(ASTSource(kernel, signature, constexprs), target=GPUTarget("cuda", 90, 32))
"""


def test_triton_kernels_compile_for_hopper() -> None:
    """Both kernels through Triton's whole NVIDIA pipeline (down to a cubin for sm_90)."""
    triton = pytest.importorskip("triton", reason="compiling the kernels needs triton")
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        pytest.skip(f"this triton has no bundled ptxas ({ptxas})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    subprocess.run([sys.executable, "-c", _COMPILE], check=True, env=env, timeout=300)
