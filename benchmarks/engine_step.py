"""Milliseconds per engine step on the CPU: the paged engine against the generic one.

Runs each backend in-process (no HTTP, no sampling) on contract-v2 step plans: one new
sequence of `--prompt` tokens, then decode steps of 1, 8 and 32 rows whose sequences
hold `--context` tokens (decode `RunningSequence`s: the backend keeps each table, a row
names only a block appended at a block boundary), then one mixed step (a new prompt next
to the decode rows, one forward). Short by design (a few steps per shape) because the
machine is shared.

    .venv/bin/python benchmarks/engine_step.py [--model DIR] [--rows 1,8,32]
        [--engines paged,generic] [--dtype float32|bfloat16] [--threads N]
        [--decode-kernel]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from tgi.backend.contract import Limits, NewSequence, RunningSequence, StepPlan

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
    engine: str,
    model_dir: Path,
    dtype: torch.dtype,
    threads: int,
    quantize: str | None,
    decode_kernel: bool = False,
) -> Any:
    if engine == "paged":
        from tgi_backend_cpu._native import load_decode_attention
        from tgi_backend_cpu.paged import PagedCpuBackend

        kernel = None
        if decode_kernel:
            kernel, how = load_decode_attention(CACHE_DIR, "engine_step")
            print(f"decode kernel: {how}")
        return PagedCpuBackend(
            model_dir,
            dtype=dtype,
            num_threads=threads,
            kv_cache_memory=2 * 2**30,
            quantize=quantize,
            decode_kernel=kernel,
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
    decode_kernel: bool = False,
) -> None:
    backend = _backend(engine, model_dir, dtype, threads, quantize, decode_kernel)
    limits = Limits(context + 64, context + 128, max(prompt, context) + 64, None, None)
    capacity = backend.warmup(limits).kv
    block_size = capacity.block_size
    blocks_per_seq = -(-(context + 128) // (block_size or 1))
    vocab = 1000

    def blocks(seq_id: int, num_tokens: int) -> tuple[int, ...]:
        """The first blocks of `seq_id`'s own run, covering `num_tokens` positions."""
        if block_size is None:
            return ()
        first = seq_id * blocks_per_seq
        return tuple(range(first, first + -(-num_tokens // block_size)))

    def new(seq_id: int, num_tokens: int) -> NewSequence:
        ids = tuple((seq_id * 7 + i) % vocab for i in range(num_tokens))
        return NewSequence(seq_id, ids, block_ids=blocks(seq_id, num_tokens))

    def decode(seq_id: int, position: int) -> RunningSequence:
        """A decode row at `position`, naming the block it starts, if any."""
        starts_block = block_size is not None and position % block_size == 0
        appended = blocks(seq_id, position + 1)[-1:] if starts_block else ()
        return RunningSequence(
            seq_id, position, decode=True, last_token=seq_id % vocab, new_block_ids=appended
        )

    alone = max(rows)  # the prompt's seq id: the decode rows use 0 .. max(rows) - 1

    def prefill_once() -> None:
        backend.step(StepPlan(new=(new(alone, prompt),)))
        backend.release([alone])

    prefill_ms = _timed(prefill_once, repeat)
    print(f"{engine:8s} prefill {prompt:4d} tokens: {prefill_ms:8.1f} ms")
    for num_rows in rows:
        backend.step(StepPlan(new=tuple(new(seq, context) for seq in range(num_rows))))
        positions = dict.fromkeys(range(num_rows), context)

        def step(positions: dict[int, int] = positions) -> None:
            backend.step(StepPlan(running=tuple(decode(s, p) for s, p in positions.items())))
            for s in positions:
                positions[s] += 1

        ms = _timed(step, repeat)
        print(
            f"{engine:8s} decode {num_rows:3d} rows @ ~{context} ctx: {ms:8.1f} ms/step "
            f"({num_rows * 1000 / ms:6.1f} tok/s)"
        )
        mixed_ms = _timed(
            lambda positions=positions: (
                backend.step(
                    StepPlan(
                        new=(new(alone, prompt),),
                        running=tuple(decode(s, p) for s, p in positions.items()),
                    )
                ),
                backend.release([alone]),
                positions.update((s, p + 1) for s, p in positions.items()),
            ),
            repeat,
        )
        print(
            f"{engine:8s} mixed  {num_rows:3d} rows + {prompt}-token prompt: "
            f"{mixed_ms:8.1f} ms/step"
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
    parser.add_argument(
        "--decode-kernel", action="store_true", help="paged, bf16: the compiled decode kernel"
    )
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
            args.decode_kernel,
        )


if __name__ == "__main__":
    main()
