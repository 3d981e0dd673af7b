"""The compute dtype by measurement: time the model's own matmul shapes on this CPU.

NOTE: which dtype is faster depends on the CPU more than on its flags. AVX512-BF16
without AMX measured slower than float32 on one Intel host, and 1.96x faster at 32
streams on an AMD EPYC one (issue #14). So when `--dtype` is unset (and nothing is
quantized), the backend times the linears a step of this model runs (every layer's
projections and the LM head, at 1, 16 and 128 rows) in float32 and in bfloat16, and
takes bfloat16 only when it is faster by `MARGIN` (geometric mean over the row counts);
float32 stays the default otherwise. The answer is cached per CPU model, torch version,
thread count and model shape (`<cache>/cpu-dtype/*.json`), so a restart never flips the
dtype (which would change greedy output) and costs nothing. The timings go to the log
and to `/info`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["MARGIN", "DtypeMeasurement", "choose_by_measurement", "time_step_linears"]

MARGIN = 1.10  # bfloat16 must be this many times faster than float32 to be chosen
ROWS = (1, 16, 128)  # decode of one stream, decode of a batch, a prefill chunk
_REPEATS = 7

# (rows, dtype name) -> seconds of one step's linears
Timer = Callable[[int, torch.dtype], float]


@dataclass(frozen=True, slots=True)
class DtypeMeasurement:
    """What was measured and what it chose; also what the cache file holds."""

    dtype: str  # "float32" or "bfloat16"
    seconds: dict[str, dict[str, float]]  # dtype -> rows -> seconds per step's linears
    speedup: float  # float32 time / bfloat16 time, geometric mean over the row counts
    cached: bool = False

    def reason(self) -> str:
        timings = "; ".join(
            f"{rows} rows {self.seconds['float32'][rows] * 1e3:.2f} vs "
            f"{self.seconds['bfloat16'][rows] * 1e3:.2f} ms"
            for rows in self.seconds["float32"]
        )
        verdict = (
            f"bfloat16 is {self.speedup:.2f}x float32 (>= {MARGIN:.2f}x needed)"
            if self.dtype == "bfloat16"
            else f"bfloat16 is {self.speedup:.2f}x float32 (< {MARGIN:.2f}x: keep float32)"
        )
        where = "cached measurement" if self.cached else "measured"
        return f"{where} on this CPU: {verdict}; float32 vs bfloat16 linears: {timings}"


def time_step_linears(
    shapes: Sequence[tuple[int, int, int]],
    packed: Callable[[torch.dtype], bool] = lambda dtype: False,
) -> Timer:
    """A timer of one step's linears: `shapes` are (out, in, times per step) triples.
    Each shape runs once per repeat with random weights at the dtype and row count asked,
    packed for oneDNN where `packed(dtype)` says the engine packs them; the step's time
    is the sum of each shape's median times its count (every layer has the same shapes,
    so one layer is timed, not all of them: seconds even for 70B)."""

    def timer(rows: int, dtype: torch.dtype) -> float:
        generator = torch.Generator().manual_seed(0)
        total = 0.0
        with torch.inference_mode():
            for out, inp, times in shapes:
                weight = torch.randn(out, inp, generator=generator).to(dtype)
                x = torch.randn(rows, inp, generator=generator).to(dtype)
                linear = _linear_as_run(weight, packed(dtype))
                linear(x)  # fault in the weight, warm the kernel
                samples = []
                for _ in range(_REPEATS):
                    started = time.perf_counter()
                    linear(x)
                    samples.append(time.perf_counter() - started)
                total += times * statistics.median(samples)
        return total

    return timer


def _linear_as_run(weight: torch.Tensor, pack: bool) -> Callable[[torch.Tensor], torch.Tensor]:
    """The linear the engine will run for `weight`: packed for oneDNN or `F.linear`."""
    from tgi_backend_cpu._packed import pack_weight, packed_linear

    if pack:
        packed = pack_weight(weight)
        return lambda x: packed_linear(x, packed, None)
    return lambda x: torch.nn.functional.linear(x, weight)


def choose_by_measurement(
    timer: Timer, cache_file: Path, *, rows: Sequence[int] = ROWS
) -> DtypeMeasurement:
    """float32 unless bfloat16 is `MARGIN` faster; read from `cache_file` if it exists,
    else measured with `timer` and written there."""
    try:
        cached = json.loads(cache_file.read_text())
        return DtypeMeasurement(**{**cached, "cached": True})
    except (OSError, ValueError, TypeError):
        pass
    seconds = {
        name: {str(n): timer(n, dtype) for n in rows}
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16))
    }
    speedup = statistics.geometric_mean(
        seconds["float32"][str(n)] / max(seconds["bfloat16"][str(n)], 1e-9) for n in rows
    )
    measurement = DtypeMeasurement(
        dtype="bfloat16" if speedup >= MARGIN else "float32", seconds=seconds, speedup=speedup
    )
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        partial = cache_file.with_suffix(".tmp")
        partial.write_text(json.dumps({**asdict(measurement), "cached": False}, indent=2))
        partial.replace(cache_file)  # atomic: a concurrent start reads all or nothing
    except OSError as exc:
        logger.warning("cannot cache the dtype measurement at %s: %s", cache_file, exc)
    return measurement


def cache_key(parts: Mapping[str, object]) -> str:
    """A file name for the measurement of `parts` (CPU, torch, threads, model shape)."""
    text = json.dumps(dict(parts), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16] + ".json"
