"""The paged CPU engine: `tgi.runner.PagedModelRunner` with the CPU's side of its seam.

NOTE: the runner owns the step (block tables kept per sequence, one flattened forward
over every row of a plan, logits for the rows that want them); this module supplies what
is CPU-specific (`CpuDevice`): SDPA over dense rows (`_paged_attention`), the int8/int4
linears of `tgi.models.quantize`, and a KV pool sized from `--max-batch-total-tokens`,
`--kv-cache-memory` or a share of MemAvailable. `PagedCpuBackend` is the
`tgi.backend.Backend` around the two.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from tgi.backend.contract import (
    Limits,
    StepConstraints,
)
from tgi.errors import BackendError, ConfigError
from tgi.models.llama import LlamaForCausalLM, LlamaSpec, load_llama, quantize_model_
from tgi.parallel import joined_group
from tgi.runner import DEFAULT_BLOCK_SIZE, KvPool, ModelForward, PagedModelRunner, RunnerBackend
from tgi_backend_cpu._host import (
    KV_MEMORY_SETTING,
    MEMINFO,
    CpuInfo,
    DtypeChoice,
    check_kv_fits,
    choose_dtype,
    choose_threads,
    kv_budget_bytes,
    read_cpu_info,
)
from tgi_backend_cpu._layer_ops import CpuLayerOps, load_layer_ops
from tgi_backend_cpu._native import KERNEL_DTYPES, DecodeAttentionKernel, load_decode_attention
from tgi_backend_cpu._packed import (
    PACKED_DTYPES,
    PackedLinear,
    pack_linears_,
    packing_available,
)
from tgi_backend_cpu._paged_attention import CpuPagedAttention, DenseRows

if TYPE_CHECKING:
    from collections.abc import Sequence

    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles
    from tgi.parallel.group import ShardGroup

logger = logging.getLogger(__name__)

__all__ = ["BLOCK_SIZE", "CpuDevice", "PagedCpuBackend"]

BLOCK_SIZE = DEFAULT_BLOCK_SIZE
# Share of MemAvailable (after the weights loaded) given to the pool when nothing sizes
# it: the pool is allocated up front, and gather buffers and activations need room too.
KV_MEMORY_FRACTION = 0.3


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CpuDevice:
    """`tgi.runner.RunnerDevice` for the CPU."""

    device = torch.device("cpu")
    kv_memory_setting = KV_MEMORY_SETTING

    def __init__(
        self,
        *,
        kv_dtype: torch.dtype,
        quantize: str | None = None,
        kv_cache_memory: int | None = None,
        dense_kv_bytes: int | None = None,
        meminfo: Path = MEMINFO,
        host_ranks: int = 1,
        decode_kernel: DecodeAttentionKernel | None = None,
        layer_ops: CpuLayerOps | None = None,
        pack_float32: bool = True,
    ) -> None:
        """`kv_cache_memory`: the pool's budget in bytes, None: a share of MemAvailable
        (split between the `host_ranks` ranks on this host); `dense_kv_bytes`: the dense
        copy's budget, None: as many bytes as the pool, 0: off; `layer_ops`: compiled
        norms, rotary, SiLU-multiply and KV writes for bf16 and float32 models;
        `pack_float32`: float32 linears by oneDNN too (`_packed`'s NOTE), False keeps
        MKL's `F.linear`."""
        self.host_ranks = host_ranks
        self.kv_dtype = kv_dtype
        self.quantize = quantize
        self.kv_cache_memory = kv_cache_memory
        self.dense_kv_bytes = dense_kv_bytes
        self.decode_kernel = decode_kernel
        self.layer_ops = layer_ops
        self.meminfo = meminfo
        self.pack_float32 = pack_float32

    def prepare_model(self, model: LlamaForCausalLM) -> ModelForward:
        """Quantize the linears if asked, else pack them for oneDNN (`_packed`); bf16 and
        float32 layers get the compiled layer ops; the model itself runs each step (eager)."""
        if self.quantize is None and _packs(model.dtype, self.pack_float32):
            logger.info(
                "paged cpu engine packed %d %s linears for oneDNN",
                pack_linears_(model, model.dtype),
                str(model.dtype).removeprefix("torch."),
            )
        if self.layer_ops is not None and model.dtype in KERNEL_DTYPES:
            model.ops = self.layer_ops
        if self.quantize is not None:
            # Decode reads the quantized weights; prefill (48+ rows, where the int kernels
            # lose to float GEMM) keeps a float copy instead of rebuilding it every call:
            # 128-token prefill of SmolLM2 in int4 (bf16) went from ~476 ms to 215-230 ms.
            quantize_model_(model, self.quantize, keep_prefill_weights=True)  # type: ignore[arg-type]
        return model

    def upload(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Host tensors are already where the CPU computes."""
        return list(tensors)

    def prepare_steps(
        self, forward: ModelForward, attention: Any, limits: Limits
    ) -> tuple[ModelForward, StepConstraints]:
        """Eager steps of any shape."""
        return forward, StepConstraints()

    def num_blocks(self, limits: Limits, block_size: int, bytes_per_token: int) -> int:
        """Blocks the budget allows: the router's token count, else a byte budget."""
        bytes_per_block = bytes_per_token * block_size
        if limits.max_batch_total_tokens is not None:
            num_blocks = -(-limits.max_batch_total_tokens // block_size)
            # every rank on this host allocates its pool from the same memory
            host_bytes = num_blocks * bytes_per_block * self.host_ranks
            check_kv_fits(limits.max_batch_total_tokens, host_bytes, self.meminfo)
            return num_blocks
        budget, source = kv_budget_bytes(self.kv_cache_memory, self.meminfo, KV_MEMORY_FRACTION)
        if self.kv_cache_memory is None and self.host_ranks > 1:
            budget //= self.host_ranks
            source = f"{source}, split between {self.host_ranks} ranks on this host"
        logger.info("paged cpu engine KV budget %d bytes (%s)", budget, source)
        return budget // bytes_per_block

    def allocate_kv(self, spec: LlamaSpec, num_blocks: int, block_size: int) -> KvPool:
        return KvPool(
            spec.num_layers, num_blocks, block_size, spec.num_kv_heads, spec.head_dim, self.kv_dtype
        )

    def attention(self, pool: KvPool, spec: LlamaSpec, max_length: int) -> CpuPagedAttention:
        """SDPA over `pool` with a dense copy of live rows (see `_paged_attention`'s NOTE)."""
        dense_bytes = self.dense_kv_bytes
        if dense_bytes is None:  # as many bytes as the pool
            dense_bytes = sum(t.numel() * t.element_size() for t in (*pool.keys, *pool.values))
        kernel = self.decode_kernel
        if kernel is not None and kernel.fits(spec.num_heads, spec.num_kv_heads, spec.head_dim):
            # decode reads the pool in place: no dense copy
            return CpuPagedAttention(
                pool, spec.layer_windows, kernel=kernel, layer_ops=self.layer_ops
            )
        dense = DenseRows(pool, max_length, dense_bytes) if dense_bytes else None
        return CpuPagedAttention(pool, spec.layer_windows, dense, layer_ops=self.layer_ops)


class PagedCpuBackend(RunnerBackend):
    """`tgi.backend.Backend` over `tgi.models.llama` with a paged KV pool on the CPU."""

    def __init__(
        self,
        model: Path | Any,
        *,
        dtype: torch.dtype = torch.float32,
        kv_dtype: torch.dtype | None = None,
        num_threads: int | None = None,
        kv_cache_memory: int | None = None,
        quantize: str | None = None,
        dense_kv_bytes: int | None = None,
        meminfo: Path = MEMINFO,
        group: ShardGroup | None = None,
        decode_kernel: DecodeAttentionKernel | None = None,
        layer_ops: CpuLayerOps | None = None,
        pack_float32: bool = True,
    ) -> None:
        """Load a Llama-family checkpoint (dir, ModelFiles or .gguf); quantize if asked.

        `kv_cache_memory` is the pool's budget in bytes (`ServeConfig.kv_cache_memory`);
        None sizes the pool from MemAvailable at warmup. `group`: load this rank's shard
        (`tgi.parallel`); every rank's budget is its own, the pool the smallest.
        `pack_float32`: see `CpuDevice`.
        """
        if quantize is not None and quantize not in ("int8", "int4"):
            raise ConfigError(f"--quantize {quantize} is not supported by the cpu backend")
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        started = time.perf_counter()
        try:
            loaded = load_llama(model, dtype, group=group, quantize=quantize)
        except (OSError, KeyError, ValueError) as exc:
            raise BackendError(f"cannot load a Llama-family model from {model}: {exc}") from exc
        self.spec = loaded.spec
        self.dtype = dtype
        self.dtype_reason: str | None = None  # why this dtype, when the backend chose it
        self.kv_dtype = kv_dtype or dtype
        if decode_kernel is not None and (dtype != self.kv_dtype or dtype not in KERNEL_DTYPES):
            raise ConfigError(
                f"the decode kernel runs bf16 or float32 models with KV of their dtype, not "
                f"{dtype} with {self.kv_dtype} KV"
            )
        self.device = CpuDevice(
            kv_dtype=self.kv_dtype,
            quantize=quantize,
            kv_cache_memory=kv_cache_memory,
            dense_kv_bytes=dense_kv_bytes,
            meminfo=meminfo,
            decode_kernel=decode_kernel,
            layer_ops=layer_ops,
            host_ranks=_host_ranks(group),
            pack_float32=pack_float32,
        )
        self.runner = PagedModelRunner(loaded, self.device, block_size=BLOCK_SIZE)
        logger.info(
            "paged cpu engine loaded %s (%s, %d layers, %s%s) in %.2f s with %d threads",
            getattr(model, "path", model),
            self.spec.architecture,
            self.spec.num_layers,
            dtype,
            f", {quantize}" if quantize else "",
            time.perf_counter() - started,
            torch.get_num_threads(),
        )

    @classmethod
    def from_config(
        cls, config: ServeConfig, model: ModelFiles, *, world_size: int = 1
    ) -> PagedCpuBackend:
        """Choose dtype, KV dtype and threads from `config` and the host, then load; with
        several ranks, this process's shard over the rank group its worker joined."""
        group = joined_group(world_size)
        cpu = read_cpu_info()
        threads, threads_why = choose_threads(config.cpu_threads, cpu)
        if world_size > 1 and config.source_of("cpu_threads") in ("default", "backend cpu"):
            # the ranks share this host's cores: oversubscribed threads slow every step
            threads = max(1, threads // world_size)
            threads_why = f"{threads_why}, shared by {world_size} ranks"
        torch.set_num_threads(threads)  # before measuring: the dtype is timed as it will run
        pack_float32 = bool(config.backend_options.get("onednn_float32", True))
        asked = config.dtype if config.source_of("dtype") != "backend cpu" else None
        if asked is None and config.quantize is None:
            dtype = _measured_dtype(config, model, cpu, threads, group, pack_float32)
        else:
            dtype = choose_dtype(asked, cpu, quantized=config.quantize is not None)
        logger.info("paged cpu engine computes in %s because %s", dtype.dtype, dtype.reason)
        logger.info("paged cpu engine uses %d threads (%s)", threads, threads_why)
        kv_dtype = _DTYPES[config.kv_cache_dtype] if config.kv_cache_dtype else None
        kernel, layer_ops = None, None
        cpu_key = f"{cpu.model_name}|{','.join(sorted(cpu.flags))}"
        # float32's kernels vectorise with AVX-512 only; without it torch's ops are faster
        compiled = dtype.dtype == torch.bfloat16 or (
            dtype.dtype == torch.float32 and "avx512f" in cpu.flags
        )
        kernel_dtype = compiled and (kv_dtype or dtype.dtype) == dtype.dtype
        if kernel_dtype and config.backend_options.get("decode_kernel", True):
            kernel, how = load_decode_attention(config.resolved_cache_dir, cpu_key)
            logger.info(
                "paged cpu engine decode attention: %s",
                f"compiled kernel, {how}" if kernel else f"SDPA ({how})",
            )
        if compiled and config.backend_options.get("layer_kernels", True):
            layer_ops, how = load_layer_ops(config.resolved_cache_dir, cpu_key)
            logger.info(
                "paged cpu engine layer ops: %s",
                f"compiled kernels, {how}" if layer_ops else f"torch ({how})",
            )
        backend = cls(
            model.path,
            dtype=dtype.dtype,
            kv_dtype=kv_dtype,
            num_threads=threads,
            kv_cache_memory=config.kv_cache_memory,
            quantize=config.quantize,
            group=group,
            decode_kernel=kernel,
            layer_ops=layer_ops,
            pack_float32=pack_float32,
        )
        backend.dtype_reason = dtype.reason
        return backend

    @property
    def engine_details(self) -> dict[str, str]:
        """How steps run, for /info (`engine.details`)."""
        model = self.runner.model
        packed = any(isinstance(m, PackedLinear) for m in model.modules())
        return {
            "decode_attention": "compiled kernel"
            if self.device.decode_kernel is not None
            else "sdpa",
            "linears": self.device.quantize or ("onednn-packed" if packed else "f.linear"),
            "layer_ops": "compiled" if isinstance(model.ops, CpuLayerOps) else "torch",
        }

    def _require_model(self) -> LlamaForCausalLM:
        return self.runner.model


def _host_ranks(group: ShardGroup | None) -> int:
    """Ranks sharing this host's memory: torchrun's LOCAL_WORLD_SIZE, else all of them."""
    if group is None:
        return 1
    import os

    local = os.environ.get("LOCAL_WORLD_SIZE", "")
    return int(local) if local.isdigit() and int(local) > 0 else group.world_size


def _measured_dtype(
    config: ServeConfig,
    model: ModelFiles,
    cpu: CpuInfo,
    threads: int,
    group: ShardGroup | None,
    pack_float32: bool,
) -> DtypeChoice:
    """float32 or bfloat16, by timing this model's linears on this CPU (`_dtype_probe`'s
    NOTE), cached; with several ranks rank 0 decides for all (they must agree)."""
    from tgi.models.source import read_model_config
    from tgi.parallel.sharding import plan_shard
    from tgi_backend_cpu._dtype_probe import cache_key, choose_by_measurement, time_step_linears

    if group is not None and group.rank != 0:
        name, reason = group.broadcast_bytes(None).decode().split("\n", 1)
        return DtypeChoice(_DTYPES[name], reason)
    spec = LlamaSpec.from_hf(read_model_config(Path(model.path)))
    vocab_rows = spec.vocab_size
    if group is not None:  # one rank's shapes: what each rank multiplies
        plan = plan_shard(spec, 0, group.world_size)
        spec, vocab_rows = plan.local_spec(spec), plan.vocab[1] - plan.vocab[0]
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    hidden, layers = spec.hidden_size, spec.num_layers
    shapes = [  # (out, in, per step) of the fused linears, then the LM head
        (q + 2 * kv, hidden, layers),
        (hidden, q, layers),
        (2 * spec.intermediate_size, hidden, layers),
        (hidden, spec.intermediate_size, layers),
        (vocab_rows, hidden, 1),
    ]
    key = cache_key(
        {
            "cpu": cpu.model_name,
            "flags": sorted(cpu.flags),
            "torch": torch.__version__,
            "threads": threads,
            "bf16_linears": "onednn-packed" if _packs(torch.bfloat16, pack_float32) else "plain",
            "float32_linears": "onednn-packed" if _packs(torch.float32, pack_float32) else "plain",
            "shapes": shapes,
        }
    )
    timer = time_step_linears(shapes, packed=lambda dtype: _packs(dtype, pack_float32))
    measurement = choose_by_measurement(timer, config.resolved_cache_dir / "cpu-dtype" / key)
    choice = DtypeChoice(_DTYPES[measurement.dtype], measurement.reason())
    if group is not None:
        group.broadcast_bytes(f"{measurement.dtype}\n{choice.reason}".encode())
    return choice


def _packs(dtype: torch.dtype, pack_float32: bool) -> bool:
    """Whether the engine runs `dtype`'s linears packed for oneDNN (`_packed`)."""
    if dtype == torch.float32 and not pack_float32:
        return False
    return dtype in PACKED_DTYPES and packing_available(dtype)
