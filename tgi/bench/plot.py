"""PNG plots that compare result files: throughput and latency percentiles against load.

One colour per system (result file); solid lines are medians, dashed lines p99. The x
axis is the concurrency cap for a concurrency sweep, else the request rate. Throughput
points carry their value, so the picture and the table can be checked against each
other.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from tgi.bench.metrics import Distribution
from tgi.bench.results import LevelResult, ServeResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = ["plot_engine", "plot_serve"]


def _x(level: LevelResult, by_rate: bool) -> float:
    if by_rate:
        return float(level.request_rate or 0.0)
    return float(level.max_concurrency or 0)


def _by_rate(results: Sequence[ServeResult]) -> bool:
    """Rate on the x axis when any level has a finite rate and concurrency does not vary."""
    caps = {lv.max_concurrency for r in results for lv in r.levels}
    rates = {lv.request_rate for r in results for lv in r.levels}
    return len(caps) <= 1 and any(rate is not None for rate in rates)


def _latency_panel(
    axes: Axes,
    results: Sequence[ServeResult],
    name: str,
    pick: str,
    by_rate: bool,
    colours: list[str],
) -> None:
    for colour, result in zip(colours, results, strict=False):
        for stat, style in (("p50", "-"), ("p99", "--")):
            points = []
            for level in result.levels:
                distribution: Distribution | None = getattr(level.metrics, pick)
                if distribution is not None:
                    points.append((_x(level, by_rate), getattr(distribution, stat)))
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                axes.plot(xs, ys, style, marker="o", color=colour, label=f"{result.label} {stat}")
    axes.set_ylabel("ms")
    low, high = _value_range(axes)
    if low > 0 and high / low > _LOG_SPAN:
        # milliseconds next to minutes: a linear axis would flatten every small value
        axes.set_yscale("log")
        axes.set_title(f"{name} (ms, log scale, solid p50, dashed p99)")
    else:
        axes.set_ylim(bottom=0)  # a truncated axis makes small differences look large
        axes.set_title(f"{name} (ms, solid p50, dashed p99)")


_LOG_SPAN = 50.0  # largest over smallest value above which a latency axis turns logarithmic


def _value_range(axes: Axes) -> tuple[float, float]:
    values = [float(y) for line in axes.get_lines() for y in np.asarray(line.get_ydata())]
    return (min(values), max(values)) if values else (0.0, 0.0)


def plot_serve(results: Sequence[ServeResult], path: Path, title: str | None = None) -> Path:
    """Write a 2x2 PNG: output tokens/s, TTFT, TPOT and end-to-end latency against load."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not results:
        raise ValueError("nothing to plot")
    by_rate = _by_rate(results)
    colours = [f"C{i}" for i in range(len(results))]
    figure, grid = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    throughput = grid[0][0]
    for rank, (colour, result) in enumerate(zip(colours, results, strict=True)):
        points = sorted(
            (_x(lv, by_rate), lv.metrics.output_throughput, lv.metrics.failed)
            for lv in result.levels
        )
        xs = [p[0] for p in points]
        ys = [p[1] for p in points]
        throughput.plot(xs, ys, "-", marker="o", color=colour, label=result.label)
        for x, y, failed in points:
            note = f"{y:.0f}" + (f" ({failed} failed)" if failed else "")
            throughput.annotate(
                note,
                (x, y),
                textcoords="offset points",
                xytext=(0, 6 + 10 * rank),  # stacked, so close values stay readable
                ha="center",
                fontsize=8,
                color=colour,
            )
    throughput.set_title("output tokens/s (higher is better)")
    throughput.set_ylabel("tokens/s")
    highest = max((lv.metrics.output_throughput for r in results for lv in r.levels), default=0)
    # from 0, and room above the highest point for the stacked labels
    throughput.set_ylim(0, max(highest, 1.0) * (1.15 + 0.08 * len(results)))
    panels = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("end-to-end latency", "e2el_ms"))
    for axes, (name, pick) in zip((grid[0][1], grid[1][0], grid[1][1]), panels, strict=True):
        _latency_panel(axes, results, name, pick, by_rate, colours)
    for axes in (grid[0][0], grid[0][1], grid[1][0], grid[1][1]):
        axes.set_xlabel("request rate (req/s)" if by_rate else "concurrency")
        if not by_rate:
            axes.set_xscale("log", base=2)
            ticks = sorted({_x(lv, False) for r in results for lv in r.levels})
            axes.set_xticks(ticks, [f"{t:g}" for t in ticks])
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    figure.suptitle(title or " vs ".join(r.label for r in results))
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def plot_engine(
    labels: Sequence[str],
    batch_sizes: Sequence[Sequence[int]],
    prefill_ms: Sequence[Sequence[float]],
    decode_ms: Sequence[Sequence[float]],
    path: Path,
) -> Path:
    """Write a PNG of median prefill latency and decode step latency against batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for i, label in enumerate(labels):
        left.plot(batch_sizes[i], prefill_ms[i], "-o", color=f"C{i}", label=label)
        right.plot(batch_sizes[i], decode_ms[i], "-o", color=f"C{i}", label=label)
    left.set_title("prefill latency p50 (ms)")
    right.set_title("decode step latency p50 (ms)")
    for axes in (left, right):
        axes.set_xlabel("batch size")
        axes.set_ylabel("ms")
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
