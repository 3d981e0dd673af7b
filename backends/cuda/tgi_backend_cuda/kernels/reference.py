"""Paged attention in plain torch: the Triton kernels' reference and the SDPA fallback.

NOTE: one padded batch and one `scaled_dot_product_attention` call per step. Rows are
padded to T_max queries and L_max keys; every index is built with tensor ops, so with
`max_query_len` and `max_seq_len` given the call never syncs with the device:

    query_start [0 3 3 4]  seq_lens [5 9 2]  block_size 4    (row 1 has no queries)
    queries  [R, T_max]  q[query_start[r] + t]     real while t < n_r
    keys     [R, L_max]  slot bt[r, j // 4] * 4 + j % 4     real while j < seq_lens[r]
    query t of row r sits at position seq_lens[r] - n_r + t and sees key j iff
    j <= position and (window w) j > position - w

GQA without copying keys: each KV head's G query heads become G * T queries of plain
attention, `[R, KVH, G * T, D]` (head-major, so a decode step's `[R, 1, 1, L]` mask
broadcasts over the group as is). SDPA's `enable_gqa` would take the KV heads as they
are, but on CUDA it pairs with a mask only in the math kernel, which materialises every
score (ComfyUI PR 15135 met it as an out-of-memory error on long prompts).

A mixed step (a long chunk beside many decode rows) pads each decode row to the chunk's
length; a caller that plans its rows on the host can call this once per group instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["check_args", "paged_attention_torch"]


def check_args(num_heads: int, num_kv_heads: int, window: int | None) -> int:
    """G, the query heads per KV head; ValueError unless H is a multiple of KVH and the
    window holds at least the query itself."""
    if num_kv_heads <= 0 or num_heads % num_kv_heads:
        raise ValueError(f"{num_heads} query heads do not split over {num_kv_heads} KV heads")
    if window is not None and window < 1:
        raise ValueError(f"window must be at least 1 token, got {window}")
    return num_heads // num_kv_heads


def paged_attention_torch(
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
    """Causal (optionally windowed) attention of each row's queries over its paged keys.

    The step's k/v must already be in the caches. fp8 caches are read as `stored * k_scale`
    (`v_scale`): the scales fold into the softmax scale and the output. `max_query_len` /
    `max_seq_len` default to a device sync each. Writes `out` in place when given.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = key_cache.shape[1]
    group = check_args(num_heads, num_kv_heads, window)
    if out is None:
        out = torch.empty_like(q)
    num_rows = seq_lens.shape[0]
    if num_tokens == 0 or num_rows == 0:
        return out
    device = q.device
    starts = query_start.to(device=device, dtype=torch.long)  # [R + 1]
    counts = starts[1:] - starts[:-1]  # [R]
    lens = seq_lens.to(device=device, dtype=torch.long)  # [R]
    if max_query_len is None:
        max_query_len = int(counts.max())
    if max_seq_len is None:
        max_seq_len = int(lens.max())
    num_queries, num_keys = max(max_query_len, 1), max(max_seq_len, 1)

    key, value = _gather_keys(key_cache, value_cache, block_tables, lens, num_keys, block_size)
    key, value = key.to(q.dtype).transpose(1, 2), value.to(q.dtype).transpose(1, 2)

    t = torch.arange(num_queries, device=device)
    query_index = (starts[:-1, None] + t).clamp_(max=num_tokens - 1)  # [R, T]
    query = q[query_index]  # [R, T, H, D]
    query = query.view(num_rows, num_queries, num_kv_heads, group, head_dim)
    query = query.permute(0, 2, 3, 1, 4).reshape(num_rows, num_kv_heads, -1, head_dim)

    mask = _mask(counts, lens, num_queries, num_keys, window)  # [R, T, L]
    if num_queries == 1:
        mask = mask[:, None]  # [R, 1, 1, L]: broadcasts over the group's G queries
    else:
        mask = mask[:, None, None].expand(-1, 1, group, -1, -1)
        mask = mask.reshape(num_rows, 1, group * num_queries, num_keys)
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale * k_scale
    )  # [R, KVH, G * T, D]
    attended = attended.view(num_rows, num_kv_heads, group, num_queries, head_dim)
    attended = attended.permute(0, 3, 1, 2, 4).reshape(num_rows, num_queries, num_heads, -1)
    if v_scale != 1.0:
        attended = attended * v_scale

    token = torch.arange(num_tokens, device=device)
    row_of = torch.searchsorted(starts[1:], token, right=True)  # [N] rows with 0 skip
    return out.copy_(attended[row_of, token - starts[row_of]])


def _gather_keys(
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,  # [R, max_blocks]
    lens: torch.Tensor,  # [R]
    num_keys: int,
    block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[R, L, KVH, D] each row's keys and values; positions past a row's length read slot
    0 (table columns there may hold anything)."""
    device = key_cache.device
    pos = torch.arange(num_keys, device=device)  # [L]
    cols = (pos // block_size).clamp_(max=block_tables.shape[1] - 1)
    blocks = block_tables.to(device=device, dtype=torch.long)[:, cols]  # [R, L]
    slots = blocks * block_size + pos % block_size
    slots = torch.where(pos < lens[:, None], slots, 0)
    return key_cache[slots], value_cache[slots]


def _mask(
    counts: torch.Tensor,  # [R] queries per row
    lens: torch.Tensor,  # [R] keys per row
    num_queries: int,
    num_keys: int,
    window: int | None,
) -> torch.Tensor:  # [R, T, L] bool
    """Which keys each padded query sees. A padding query (t >= n_r) may see none: its
    output, NaN or not, is dropped."""
    device = counts.device
    t = torch.arange(num_queries, device=device)
    key_pos = torch.arange(num_keys, device=device)
    query_pos = (lens - counts)[:, None] + t  # [R, T]
    mask = key_pos <= query_pos[..., None]
    if window is not None:
        mask &= key_pos > query_pos[..., None] - window
    return mask
