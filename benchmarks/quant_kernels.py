"""fp32 `F.linear` against the int8 and int4 weight-only CPU kernels, on SmolLM2-135M's shapes.

    .venv/bin/python benchmarks/quant_kernels.py [--threads 2] [--rows 1 8 32] [--group-size 32]

Prints one row per (shape, M) with the best time of each kernel (from M = 48 rows on
the quantized layers dequantize and call `F.linear`), then a per-token
estimate for a whole decode step at M = 1: the 30 layers' four matmuls plus the
lm_head (attention, norms and sampling excluded: they do not read weights).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from tgi.models.quantize import INT4_GROUP_SIZE, quantize_weight

# (name, in_features, out_features, times per token) for SmolLM2-135M.
_SHAPES = (
    ("o_proj", 576, 576, 30),
    ("qkv (fused)", 576, 960, 30),
    ("gate_up (fused)", 576, 3072, 30),
    ("down", 1536, 576, 30),
    ("lm_head", 576, 49152, 1),
)


def _best_ms(fn: Callable[[], object], *, min_time_s: float = 0.3) -> float:
    """Fastest of repeated calls: on a shared machine the least disturbed run."""
    for _ in range(3):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + min_time_s
    while time.perf_counter() < deadline or len(samples) < 5:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples) * 1e3


def _run_all(layers: list[Callable[[torch.Tensor], torch.Tensor]], x: torch.Tensor) -> None:
    for layer in layers:
        layer(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--group-size", type=int, default=INT4_GROUP_SIZE)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--min-time-s", type=float, default=0.3, help="per kernel and M")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    print(f"threads={args.threads} dtype={args.dtype} int4 group={args.group_size}")
    print("ms per layer; each shape cycles through as many distinct weights as SmolLM2 has,")
    print("so weights come from memory as in a real forward, not from a warm cache.")
    print(f"{'shape':<16} {'K x N':>12} {'M':>4} {'fp32 ms':>9} {'int8 ms':>9} {'int4 ms':>9}")
    per_token = {"fp32": 0.0, "int8": 0.0, "int4": 0.0}
    with torch.inference_mode():
        for name, k, n, count in _SHAPES:
            weights = [torch.randn(n, k) * 0.02 for _ in range(count)]
            layers: dict[str, list[Callable[[torch.Tensor], torch.Tensor]]] = {
                "fp32": [partial(F.linear, weight=w.to(dtype)) for w in weights],
                "int8": [quantize_weight(w, "int8") for w in weights],
                # Falls back to a smaller group where args.group_size does not divide k.
                "int4": [quantize_weight(w, "int4", group_size=args.group_size) for w in weights],
            }
            del weights
            for m in args.rows:
                x = torch.randn(m, k, dtype=dtype)
                times = {
                    mode: _best_ms(partial(_run_all, stack, x), min_time_s=args.min_time_s) / count
                    for mode, stack in layers.items()
                }
                print(
                    f"{name:<16} {f'{k}x{n}':>12} {m:>4} "
                    f"{times['fp32']:>9.3f} {times['int8']:>9.3f} {times['int4']:>9.3f}"
                )
                if m == 1:
                    for mode, ms in times.items():
                        per_token[mode] += ms * count
    if 1 in args.rows:
        print("\nweight matmuls per decoded token (M = 1, 30 layers + lm_head):")
        for mode, ms in per_token.items():
            print(f"  {mode}: {ms:6.2f} ms  (~{1e3 / ms:5.1f} tok/s upper bound)")


if __name__ == "__main__":
    main()
