"""Milliseconds per engine step on the CPU: the paged engine against the generic one.

Runs each backend in-process (no HTTP, no sampling): one prefill of `--prompt` tokens,
then decode steps of 1, 8 and 32 rows whose sequences hold `--context` tokens. Short by
design (a few steps per shape) because the machine is shared.

    .venv/bin/python benchmarks/engine_step.py [--model DIR] [--rows 1,8,32]
        [--engines paged,generic] [--dtype float32|bfloat16] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tgi.backend.contract import DecodeBatch, DecodeRow, Limits, PrefillBatch, PrefillRow

CACHE_DIR = Path(__file__).resolve().parents[1] / ".cache" / "tgi-test"


def _timed(fn: Any, repeat: int) -> float:
    """Median milliseconds of `repeat` calls after one untimed call."""
    fn()
    samples = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - started) * 1000)
    return statistics.median(samples)


def _backend(
    engine: str, model_dir: Path, dtype: torch.dtype, threads: int, quantize: str | None
) -> Any:
    if engine == "paged":
        from tgi_backend_cpu.paged import PagedCpuBackend

        return PagedCpuBackend(
            model_dir,
            dtype=dtype,
            num_threads=threads,
            kv_cache_memory=2 * 2**30,
            quantize=quantize,
        )
    from tgi_backend_cpu.backend import TransformersCpuBackend

    return TransformersCpuBackend(
        model_dir, dtype=dtype, num_threads=threads, kv_cache_memory=2 * 2**30
    )


def run(
    engine: str,
    model_dir: Path,
    rows: list[int],
    context: int,
    prompt: int,
    repeat: int,
    dtype: torch.dtype,
    threads: int,
    quantize: str | None = None,
) -> None:
    backend = _backend(engine, model_dir, dtype, threads, quantize)
    limits = Limits(context + 64, context + 128, max(prompt, context) + 64, None, None)
    capacity = backend.warmup(limits)
    block_size = capacity.block_size or 1
    blocks_per_seq = -(-(context + 64) // block_size)
    vocab = 1000

    def table(seq_id: int) -> tuple[int, ...]:
        first = seq_id * blocks_per_seq
        return tuple(range(first, first + blocks_per_seq)) if capacity.block_size else ()

    def prefill(seq_id: int, num_tokens: int) -> Any:
        ids = tuple((seq_id * 7 + i) % vocab for i in range(num_tokens))
        return backend.prefill(PrefillBatch((PrefillRow(seq_id, ids, 0, None, table(seq_id)),)))

    prefill_ms = _timed(lambda: (backend.release([40]), prefill(40, prompt)), repeat)
    backend.release([40])
    print(f"{engine:8s} prefill {prompt:4d} tokens: {prefill_ms:8.1f} ms")
    for num_rows in rows:
        for seq in range(num_rows):
            prefill(seq, context)
        positions = dict.fromkeys(range(num_rows), context)

        def step(positions: dict[int, int] = positions) -> None:
            batch = DecodeBatch(
                tuple(DecodeRow(s, (s % vocab,), p, None, table(s)) for s, p in positions.items())
            )
            backend.decode(batch)
            for s in positions:
                positions[s] += 1

        ms = _timed(step, repeat)
        print(
            f"{engine:8s} decode {num_rows:3d} rows @ ~{context} ctx: {ms:8.1f} ms/step "
            f"({num_rows * 1000 / ms:6.1f} tok/s)"
        )
        backend.release(list(range(num_rows)))
    print(f"{engine:8s} KV bytes per token: {capacity.bytes_per_token}")
    backend.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="model dir (default: SmolLM2)")
    parser.add_argument("--engines", default="paged,generic")
    parser.add_argument("--rows", default="1,8,32")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--quantize", choices=["int8", "int4"], default=None, help="paged only")
    args = parser.parse_args()
    model_dir = args.model
    if model_dir is None:
        from tgi.testing.fixtures import smollm2_files

        model_dir = smollm2_files(CACHE_DIR).path
    rows = [int(n) for n in args.rows.split(",")]
    for engine in args.engines.split(","):
        run(
            engine,
            model_dir,
            rows,
            args.context,
            args.prompt,
            args.repeat,
            getattr(torch, args.dtype),
            args.threads,
            args.quantize,
        )


if __name__ == "__main__":
    main()
