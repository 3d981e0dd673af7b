"""The GPU backend's attention over the runner's paged KV pool: FlashInfer, the project's
Triton kernels, or torch SDPA.

NOTE: every implementation reads the pool where the runner's slot arithmetic put each
token (`tgi.runner._kv`), one layer `[num_blocks * block_size, kv_heads, head_dim]`, and
gets the same per-step metadata (`PagedMetadata`), planned once per step and shared by
every layer:

    rows          seq 4: chunk of 3 at 16    seq 9: decode at 40
    query_start   [0, 3, 4]                  row r's queries: q[query_start[r]:query_start[r+1]]
    seq_lens      [19, 41]                   keys after the step; queries are the last ones
    block_tables  [R, ceil(L_max / bs)]      rows of the tables' device copy, gathered there

The step's own k/v are written into the pool first (one `index_copy_` per layer at the
planned slots), so a row attends over its cached prefix and its new tokens alike. The
host sends the step's small index tensors in one copy (`upload`); block tables live on
the device and grow by appends (`BlockTables.device_tensor`), never re-sent whole.

Which implementation runs: `TGI_ATTENTION` / `--backend-option attention=` when set,
else the first of the platform's list that is importable on this device (FlashInfer on
CUDA, then Triton, then SDPA, which always works).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

import torch

from tgi.errors import ConfigError
from tgi.runner import KvPool, StepLayout
from tgi_backend_cuda.platform import CUDA, GpuPlatform

logger = logging.getLogger(__name__)

__all__ = [
    "ATTENTION_ENV",
    "KernelAttention",
    "PagedMetadata",
    "available_attention",
    "choose_attention",
    "make_attention",
]

ATTENTION_ENV = "TGI_ATTENTION"

# upload(host tensors) -> the same on the device, in one copy where it can
Upload = Callable[[Sequence[torch.Tensor]], list[torch.Tensor]]


def available_attention(
    device: torch.device | str, platform: GpuPlatform = CUDA, dtype: torch.dtype = torch.bfloat16
) -> list[str]:
    """The attention implementations usable on `device` for a `dtype` model, best first."""
    device = torch.device(device)
    usable = []
    for name in platform.attention:
        if name == "flashinfer":
            ok = device.type == "cuda" and importlib.util.find_spec("flashinfer") is not None
            ok = ok and dtype in (torch.float16, torch.bfloat16)  # its kernels' dtypes
        elif name == "triton":
            # on a CPU only under the interpreter: the test mode's way to run the kernels
            interpreted = os.environ.get("TRITON_INTERPRET") == "1"
            ok = importlib.util.find_spec("triton") is not None and (
                device.type == "cuda" or interpreted
            )
        else:
            ok = True
        if ok:
            usable.append(name)
    return usable


def choose_attention(
    asked: str | None,
    device: torch.device | str,
    platform: GpuPlatform = CUDA,
    dtype: torch.dtype = torch.bfloat16,
) -> tuple[str, str]:
    """(implementation, why); ConfigError when `asked` is not usable here."""
    usable = available_attention(device, platform, dtype)
    if asked:
        if asked not in platform.attention:
            raise ConfigError(
                f"attention {asked!r} ({ATTENTION_ENV}): the {platform.name} backend offers "
                f"{', '.join(platform.attention)}"
            )
        if asked not in usable:
            raise ConfigError(
                f"attention {asked!r} ({ATTENTION_ENV}) is not usable on {device}: "
                + _why_not(asked)
                + f"; usable here: {', '.join(usable)}"
            )
        return asked, f"asked for ({ATTENTION_ENV})"
    name = usable[0]
    skipped = [n for n in platform.attention[: platform.attention.index(name)]]
    why = "the best available" + (
        "; not usable: " + "; ".join(f"{n}: {_why_not(n)}" for n in skipped) if skipped else ""
    )
    return name, why


def _why_not(name: str) -> str:
    if name == "flashinfer":
        return "needs a CUDA device, an fp16/bf16 model and flashinfer-python (its extra)"
    if name == "triton":
        return "needs Triton and a GPU (on a CPU: TRITON_INTERPRET=1)"
    return "unavailable"


@dataclass(slots=True)
class PagedMetadata:
    """One step's attention metadata (see the module NOTE), on the device."""

    num_rows: int  # R
    slots: torch.Tensor  # [N] pool slot of each new token
    query_start: torch.Tensor  # [R + 1] int32
    seq_lens: torch.Tensor  # [R] int32
    block_tables: torch.Tensor  # [R, blocks] block ids
    max_query_len: int  # host-known, so no kernel launch waits on the device
    max_seq_len: int
    host_seq_lens: list[int] | None = None  # FlashInfer plans from host lengths
    plans: Any = None  # FlashInfer: its planned wrappers per sliding window


class KernelAttention:
    """`tgi.runner.AttentionBackend` over a function of `paged_attention`'s signature
    (`tgi_backend_cuda.kernels`): the Triton kernels, or the SDPA reference."""

    # CUDA graphs replay fixed launches: only kernels whose work does not depend on
    # host-known lengths may be captured (the SDPA path's shapes follow max_seq_len)
    graphable = False

    def __init__(
        self,
        pool: KvPool,
        layer_windows: Sequence[int | None],
        head_dim: int,
        kernel: Callable[..., torch.Tensor] | None,
        upload: Upload,
        *,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> None:
        self.pool = pool
        self.layer_windows = tuple(layer_windows)
        self.scale = head_dim**-0.5
        self.kernel = kernel
        self.upload = upload
        self.k_scale, self.v_scale = k_scale, v_scale

    def plan(self, layout: StepLayout) -> PagedMetadata:
        rows = layout.rows
        num_rows = len(rows.seq_ids)
        seq_lens = [start + n for start, n in zip(rows.starts, rows.counts, strict=True)]
        query_start = [0, *accumulate(rows.counts)]
        table_rows = [layout.tables.row(seq_id) for seq_id in rows.seq_ids]
        packed = torch.tensor(query_start + seq_lens + table_rows, dtype=torch.long)
        slots, packed = self.upload([layout.slots, packed])
        num_blocks = -(-layout.max_keys // layout.block_size)
        tables = layout.tables.device_tensor
        if num_blocks > tables.shape[1]:
            raise IndexError(f"a row reads {num_blocks} blocks; tables hold {tables.shape[1]}")
        return PagedMetadata(
            num_rows=num_rows,
            slots=slots,
            query_start=packed[: num_rows + 1].to(torch.int32),
            seq_lens=packed[num_rows + 1 : 2 * num_rows + 1].to(torch.int32),
            block_tables=tables.index_select(0, packed[2 * num_rows + 1 :])[:, :num_blocks],
            max_query_len=layout.max_queries,
            max_seq_len=layout.max_keys,
            host_seq_lens=seq_lens,
        )

    def release(self, seq_ids: Sequence[int]) -> None:
        """Nothing is kept per sequence: tables belong to the runner."""

    def write_kv(
        self, layer: int, k: torch.Tensor, v: torch.Tensor, metadata: PagedMetadata
    ) -> None:
        """The step's k/v into the pool at their slots (scaled into an fp8 pool)."""
        pool = self.pool
        if self.k_scale != 1.0:
            k = k / self.k_scale
        if self.v_scale != 1.0:
            v = v / self.v_scale
        if pool.dtype.itemsize == 1:  # fp8 does not saturate: an outlier would turn NaN
            largest = torch.finfo(pool.dtype).max
            k, v = k.clamp(-largest, largest), v.clamp(-largest, largest)
        keys, values, k, v = (
            pool.keys[layer],
            pool.values[layer],
            k.to(pool.dtype),
            v.to(pool.dtype),
        )
        if pool.dtype.itemsize == 1:  # fp8: index_copy_ has no fp8 kernel; its bytes do
            keys, values, k, v = (t.view(torch.uint8) for t in (keys, values, k, v))
        keys.index_copy_(0, metadata.slots, k)
        values.index_copy_(0, metadata.slots, v)

    def __call__(
        self,
        layer_index: int,
        q: torch.Tensor,  # [N, H, D]
        k: torch.Tensor,  # [N, KVH, D]
        v: torch.Tensor,
        metadata: PagedMetadata,
    ) -> torch.Tensor:  # [N, H, D]
        self.write_kv(layer_index, k, v, metadata)
        assert self.kernel is not None  # only FlashInfer's subclass has none, and overrides
        return self.kernel(
            q,
            self.pool.keys[layer_index],
            self.pool.values[layer_index],
            metadata.block_tables,
            metadata.query_start,
            metadata.seq_lens,
            block_size=self.pool.block_size,
            scale=self.scale,
            window=self.layer_windows[layer_index],
            k_scale=self.k_scale,
            v_scale=self.v_scale,
            max_query_len=metadata.max_query_len,
            max_seq_len=metadata.max_seq_len,
        )


class TritonAttention(KernelAttention):
    """The project's Triton kernels: their launches depend only on the row count and
    the captured max length bound, so decode steps can replay as graphs."""

    graphable = True


class FlashInferAttention(KernelAttention):
    """FlashInfer's paged wrappers: one plan per step and sliding window, on the host's
    lengths; the pool is FlashInfer's NHD layout viewed as `[pages, page_size, KVH, D]`.

    Not run here (no GPU in this project's CI): written against FlashInfer's documented
    `BatchPrefillWithPagedKVCacheWrapper` / `BatchDecodeWithPagedKVCacheWrapper`, and
    checked by the GPU check (`backends/cuda/gpu_check`) where a GPU is lent.
    """

    WORKSPACE_BYTES = 128 * 2**20

    def __init__(
        self,
        pool: KvPool,
        layer_windows: Sequence[int | None],
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        upload: Upload,
        q_dtype: torch.dtype,
        **scales: float,
    ) -> None:
        super().__init__(pool, layer_windows, head_dim, None, upload, **scales)
        import flashinfer

        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.q_dtype = q_dtype
        device = pool.keys[0].device
        # one workspace per device, shared by every instance (health checks build their own)
        workspace = _WORKSPACES.get(device)
        if workspace is None:
            workspace = torch.empty(self.WORKSPACE_BYTES, dtype=torch.uint8, device=device)
            _WORKSPACES[device] = workspace
        windows = sorted(set(self.layer_windows), key=lambda w: -1 if w is None else w)
        self._prefill = {
            w: flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD") for w in windows
        }
        # its CUDA-core decode kernels take query groups of 1, 2, 3, 4, 6 or 8 heads only
        tensor_cores = num_heads // num_kv_heads not in (1, 2, 3, 4, 6, 8)
        self._decode = {
            w: flashinfer.BatchDecodeWithPagedKVCacheWrapper(
                workspace, "NHD", use_tensor_cores=tensor_cores
            )
            for w in windows
        }

    def plan(self, layout: StepLayout) -> PagedMetadata:
        metadata = super().plan(layout)
        size = layout.block_size
        assert metadata.host_seq_lens is not None
        pages = [-(-n // size) for n in metadata.host_seq_lens]
        indptr = torch.tensor([0, *accumulate(pages)], dtype=torch.int32)
        last = torch.tensor(
            [n - (p - 1) * size for n, p in zip(metadata.host_seq_lens, pages, strict=True)],
            dtype=torch.int32,
        )
        # the used pages of each row, flattened, gathered on the device (no host tables)
        total = int(indptr[-1])
        # on the device, from its lengths: a copy of `pages` would wait for the device
        pages_t = (metadata.seq_lens.to(torch.long) + size - 1) // size
        row_of = torch.repeat_interleave(
            torch.arange(metadata.num_rows, device=pages_t.device), pages_t, output_size=total
        )
        first = torch.cumsum(pages_t, 0) - pages_t
        column = torch.arange(total, device=pages_t.device) - first[row_of]
        indices = metadata.block_tables[row_of, column].to(torch.int32)
        decode = layout.one_token
        plans = {}
        for window, wrapper in (self._decode if decode else self._prefill).items():
            common = dict(
                page_size=size,
                window_left=-1 if window is None else window - 1,
                sm_scale=self.scale,
                q_data_type=self.q_dtype,
                kv_data_type=self.pool.dtype,
            )
            if decode:
                wrapper.plan(
                    indptr,
                    indices,
                    last,
                    self.num_heads,
                    self.num_kv_heads,
                    self.head_dim,
                    **common,
                )
            else:
                query_start = torch.tensor([0, *accumulate(layout.rows.counts)], dtype=torch.int32)
                wrapper.plan(
                    query_start,
                    indptr,
                    indices,
                    last,
                    self.num_heads,
                    self.num_kv_heads,
                    self.head_dim,
                    causal=True,
                    **common,
                )
            plans[window] = wrapper
        metadata.plans = plans
        return metadata

    def __call__(
        self,
        layer_index: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        metadata: PagedMetadata,
    ) -> torch.Tensor:
        self.write_kv(layer_index, k, v, metadata)
        pool, size = self.pool, self.pool.block_size
        shape = (-1, size, self.num_kv_heads, self.head_dim)
        cache = (pool.keys[layer_index].view(shape), pool.values[layer_index].view(shape))
        wrapper = metadata.plans[self.layer_windows[layer_index]]
        return wrapper.run(q.contiguous(), cache, k_scale=self.k_scale, v_scale=self.v_scale)


_WORKSPACES: dict[torch.device, torch.Tensor] = {}


def make_attention(
    name: str,
    pool: KvPool,
    layer_windows: Sequence[int | None],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    upload: Upload,
    q_dtype: torch.dtype,
) -> KernelAttention:
    """The attention backend called `name` (`choose_attention`'s answer) over `pool`."""
    if name == "flashinfer":
        return FlashInferAttention(
            pool, layer_windows, num_heads, num_kv_heads, head_dim, upload, q_dtype
        )
    if name == "triton":
        from tgi_backend_cuda.kernels.triton_attention import paged_attention_triton

        return TritonAttention(pool, layer_windows, head_dim, paged_attention_triton, upload)
    from tgi_backend_cuda.kernels.reference import paged_attention_torch

    return KernelAttention(pool, layer_windows, head_dim, paged_attention_torch, upload)
