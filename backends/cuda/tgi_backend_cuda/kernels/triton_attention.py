"""Paged attention in Triton: a decode kernel and a varlen (prefill, drafts) kernel.

NOTE: both kernels walk a row's keys in tiles of BLOCK_N positions and find each key's
pool slot from the block table, one table entry per key (so a tile may span several
pages, or part of one: BLOCK_N and block_size are independent):

    block_size 4, BLOCK_N 8, table [7 2 9]   keys 0..7 of the tile starting at 0
    slot(j) = table[j // 4] * 4 + j % 4   -> 28 29 30 31 | 8 9 10 11

Query t of row r sits at position seq_lens[r] - n_r + t and sees key j iff j <= its
position and (window w) j > position - w; the loops start at the first tile a window
reaches and stop after the last query's position. Softmax is online (FlashAttention's
running max and sum) in float32, in base 2 with log2(e) folded into the scale.

- `_decode_kernel`, every row one query (or none): one program per (row, KV head) takes
  that head's G query heads as the rows of one `tl.dot`, so each key tile is read once
  per group; G is padded to 16, `tl.dot`'s smallest M.
- `_varlen_kernel`: one program per (row, BLOCK_M queries, query head); programs past a
  row's queries return at once (the grid is sized from the longest row).

Both read fp8 caches as their raw values (exact in bf16/fp16) and apply k_scale to the
scores and v_scale to the output. Head dims that are not a power of two are padded to
one and masked.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tgi_backend_cuda.kernels.reference import check_args

__all__ = ["paged_attention_triton"]

_LOG2E = 1.4426950408889634
_MIN_DOT = 16  # tl.dot needs every dimension >= 16


@triton.jit
def _dot(a, b, DOT_F32: tl.constexpr):
    """a @ b accumulated in float32; DOT_F32 multiplies in float32 too (IEEE, not TF32)."""
    if DOT_F32:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b)
    return c


@triton.jit
def _key_slots(bt_row_ptr, offs_n, key_real, BLOCK_SIZE: tl.constexpr):
    """[BLOCK_N] int64 pool slots of key positions offs_n (0 where not key_real)."""
    blocks = tl.load(bt_row_ptr + offs_n // BLOCK_SIZE, mask=key_real, other=0).to(tl.int64)
    return blocks * BLOCK_SIZE + offs_n % BLOCK_SIZE


@triton.jit
def _online_softmax_step(s, visible, m_i, l_i, acc):
    """Fold one tile's base-2 scores s [M, BLOCK_N] into the running max, sum and
    rescaled accumulator; returns (p, m_i, l_i, acc) with p the tile's weights, still to
    be multiplied by V into acc. A query with nothing visible yet keeps m = -inf."""
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    return p, m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    bt_ptr,
    query_start_ptr,
    seq_lens_ptr,
    qk_scale,  # scale * k_scale * log2(e)
    v_scale,
    window,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,  # query heads per KV head
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,  # page size
    HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_G: tl.constexpr,  # GROUP padded to a power of two >= 16
    BLOCK_D: tl.constexpr,  # HEAD_DIM padded to a power of two
    BLOCK_N: tl.constexpr,  # keys per tile
):
    row = tl.program_id(0)
    kv_head = tl.program_id(1)
    token = tl.load(query_start_ptr + row)
    if tl.load(query_start_ptr + row + 1) == token:
        return  # a row without queries
    seq_len = tl.load(seq_lens_ptr + row)
    token = token.to(tl.int64)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    head_real = offs_g < GROUP
    dim_real = offs_d < HEAD_DIM
    heads = kv_head * GROUP + offs_g
    q_mask = head_real[:, None] & dim_real[None, :]
    q_ptrs = q_ptr + token * stride_qn + heads[:, None] * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BLOCK_G, BLOCK_D]

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(seq_len - window, 0) // BLOCK_N * BLOCK_N
    bt_row_ptr = bt_ptr + row.to(tl.int64) * stride_bt
    for tile in range(start, seq_len, BLOCK_N):
        keys = tile + offs_n
        visible = keys < seq_len
        if HAS_WINDOW:
            visible &= keys >= seq_len - window
        slots = _key_slots(bt_row_ptr, keys, visible, BLOCK_SIZE)
        k_mask = visible[None, :] & dim_real[:, None]
        k_ptrs = k_ptr + slots[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None]
        k = tl.load(k_ptrs, mask=k_mask, other=0.0).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        s = _dot(q, k, DOT_F32) * qk_scale  # [BLOCK_G, BLOCK_N]
        p, m_i, l_i, acc = _online_softmax_step(s, visible[None, :], m_i, l_i, acc)
        v_ptrs = v_ptr + slots[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :]
        v_mask = visible[:, None] & dim_real[None, :]
        v = tl.load(v_ptrs, mask=v_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc += _dot(p.to(q.dtype), v, DOT_F32)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc * (v_scale / l_i[:, None])
    o_ptrs = out_ptr + token * stride_on + heads[:, None] * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


@triton.jit
def _varlen_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    out_ptr,
    bt_ptr,
    query_start_ptr,
    seq_lens_ptr,
    qk_scale,  # scale * k_scale * log2(e)
    v_scale,
    window,
    stride_qn,
    stride_qh,
    stride_kn,
    stride_kh,
    stride_vn,
    stride_vh,
    stride_on,
    stride_oh,
    stride_bt,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    DOT_F32: tl.constexpr,
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0)
    query_block = tl.program_id(1)
    head = tl.program_id(2)
    first_token = tl.load(query_start_ptr + row)
    num_queries = tl.load(query_start_ptr + row + 1) - first_token
    if query_block * BLOCK_M >= num_queries:
        return
    seq_len = tl.load(seq_lens_ptr + row)
    kv_head = head // GROUP

    offs_m = query_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    query_real = offs_m < num_queries
    dim_real = offs_d < HEAD_DIM
    positions = seq_len - num_queries + offs_m  # [BLOCK_M]
    tokens = first_token.to(tl.int64) + offs_m
    q_mask = query_real[:, None] & dim_real[None, :]
    q_ptrs = q_ptr + tokens[:, None] * stride_qn + head * stride_qh + offs_d[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)  # [BLOCK_M, BLOCK_D]

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first_pos = seq_len - num_queries + query_block * BLOCK_M
    end = tl.minimum(first_pos + BLOCK_M, seq_len)  # past the block's last query position
    start = 0
    if HAS_WINDOW:
        start = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
    bt_row_ptr = bt_ptr + row.to(tl.int64) * stride_bt
    for tile in range(start, end, BLOCK_N):
        keys = tile + offs_n
        key_real = keys < end
        slots = _key_slots(bt_row_ptr, keys, key_real, BLOCK_SIZE)
        k_mask = key_real[None, :] & dim_real[:, None]
        k_ptrs = k_ptr + slots[None, :] * stride_kn + kv_head * stride_kh + offs_d[:, None]
        k = tl.load(k_ptrs, mask=k_mask, other=0.0).to(q.dtype)  # [BLOCK_D, BLOCK_N]
        s = _dot(q, k, DOT_F32) * qk_scale  # [BLOCK_M, BLOCK_N]
        visible = key_real[None, :] & (keys[None, :] <= positions[:, None])
        if HAS_WINDOW:
            visible &= keys[None, :] > positions[:, None] - window
        p, m_i, l_i, acc = _online_softmax_step(s, visible, m_i, l_i, acc)
        v_ptrs = v_ptr + slots[:, None] * stride_vn + kv_head * stride_vh + offs_d[None, :]
        v_mask = key_real[:, None] & dim_real[None, :]
        v = tl.load(v_ptrs, mask=v_mask, other=0.0).to(q.dtype)  # [BLOCK_N, BLOCK_D]
        acc += _dot(p.to(q.dtype), v, DOT_F32)

    l_i = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc * (v_scale / l_i[:, None])
    o_ptrs = out_ptr + tokens[:, None] * stride_on + head * stride_oh + offs_d[None, :]
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=q_mask)


def paged_attention_triton(
    q: torch.Tensor,  # [N, H, D]
    key_cache: torch.Tensor,  # [num_slots, KVH, D]
    value_cache: torch.Tensor,  # [num_slots, KVH, D]
    block_tables: torch.Tensor,  # [R, max_blocks]
    query_start: torch.Tensor,  # [R + 1]
    seq_lens: torch.Tensor,  # [R]
    *,
    block_size: int,
    scale: float,
    window: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:  # [N, H, D] in q.dtype
    """`paged_attention_torch`'s contract in Triton: the decode kernel when every row has
    at most one query (`max_query_len` 1), else the varlen kernel. `max_query_len` sizes
    the varlen grid (a device sync when not given); `max_seq_len` is not needed."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[1]
    group = check_args(num_heads, num_kv_heads, window)
    if out is None:
        out = torch.empty_like(q)
    num_rows = seq_lens.shape[0]
    if num_tokens == 0 or num_rows == 0:
        return out
    if max_query_len is None:
        max_query_len = int((query_start[1:] - query_start[:-1]).max())
    q, key_cache, value_cache, block_tables, query_start, seq_lens = (
        _last_dim_dense(x) for x in (q, key_cache, value_cache, block_tables, query_start, seq_lens)
    )
    target = out if out.stride(-1) == 1 else torch.empty_like(q)

    args = (
        q,
        key_cache,
        value_cache,
        target,
        block_tables,
        query_start,
        seq_lens,
        scale * k_scale * _LOG2E,
        v_scale,
        window or 0,
        q.stride(0),
        q.stride(1),
        key_cache.stride(0),
        key_cache.stride(1),
        value_cache.stride(0),
        value_cache.stride(1),
        target.stride(0),
        target.stride(1),
        block_tables.stride(0),
    )
    meta = {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_SIZE": block_size,
        "HAS_WINDOW": window is not None,
        "DOT_F32": _dot_in_f32(q.dtype, _decode_kernel),
        "BLOCK_D": max(triton.next_power_of_2(head_dim), _MIN_DOT),
    }
    if max_query_len <= 1:
        block_g = max(triton.next_power_of_2(group), _MIN_DOT)
        block_n = _key_tile(block_size, least=_MIN_DOT)
        grid: tuple[int, ...] = (num_rows, num_kv_heads)
        _decode_kernel[grid](*args, BLOCK_G=block_g, BLOCK_N=block_n, **meta)
    else:
        # a query tile of 64 (32 past head dim 128 keeps q, acc and a key tile in registers)
        block_m = 64 if meta["BLOCK_D"] <= 128 else 32
        block_n = _key_tile(block_size, least=32)
        grid = (num_rows, triton.cdiv(max_query_len, block_m), num_heads)
        _varlen_kernel[grid](*args, BLOCK_M=block_m, BLOCK_N=block_n, **meta)
    if target is not out:
        out.copy_(target)
    return out


def _key_tile(block_size: int, least: int) -> int:
    """Keys per tile: the page when it is a power of two in least..64, else the nearest
    such (a tile may cover several small pages or part of a large one)."""
    return min(max(triton.next_power_of_2(block_size), least), 64)


def _dot_in_f32(dtype: torch.dtype, kernel: object) -> bool:
    """Multiply in float32 for float32 queries (exactly, not in TF32) and for bf16 under
    Triton's interpreter, whose `tl.dot` multiplies bf16 as the integers it stores them
    in (triton 3.9's `create_dot`)."""
    interpreted = type(kernel).__name__ == "InterpretedFunction"
    return dtype == torch.float32 or (interpreted and dtype == torch.bfloat16)


def _last_dim_dense(x: torch.Tensor) -> torch.Tensor:
    """`x` itself when its last dim is contiguous (the kernels index it with stride 1);
    a copy is a no-op for the tensors the backend passes."""
    return x if x.stride(-1) == 1 else x.contiguous()
