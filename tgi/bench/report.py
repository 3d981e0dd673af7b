"""Tables for people: one run's levels, several runs side by side, in the terminal or Markdown.

The comparison's "x" column is each system's output throughput over the baseline's at
the same level, measured in the same session, which is the number that survives a
noisy or shared machine better than absolute throughput does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from rich.table import Table

from tgi.bench.engine import EngineResult
from tgi.bench.metrics import Distribution
from tgi.bench.results import LevelResult, ServeResult

__all__ = [
    "COMPARISON_SCHEMA",
    "Comparison",
    "ComparisonRow",
    "comparison_markdown",
    "comparison_rows",
    "comparison_table",
    "engine_table",
    "failures_table",
    "latency_table",
    "level_key",
    "serve_table",
]


def level_key(level: LevelResult) -> str:
    """How a level is named in tables: `c=8`, `rate=4/s`, or both."""
    parts = []
    if level.max_concurrency is not None:
        parts.append(f"c={level.max_concurrency}")
    if level.request_rate is not None:
        parts.append(f"rate={level.request_rate:g}/s")
    return " ".join(parts) or "unbounded"


def _ms(distribution: Distribution | None, stat: str) -> str:
    if distribution is None:
        return "-"
    return f"{getattr(distribution, stat):.1f}"


_LATENCIES = (("TTFT", "ttft_ms"), ("TPOT", "tpot_ms"), ("ITL", "itl_ms"), ("E2EL", "e2el_ms"))


def serve_table(result: ServeResult) -> Table:
    """One row per level: counts, throughputs, and the median and p99 latencies in ms."""
    table = Table(title=f"{result.label}: {result.parameters.base_url} ({result.parameters.api})")
    headers = ["level", "ok", "failed", "req/s", "out tok/s", "total tok/s", "goodput"]
    headers += [f"{name} {stat}" for name, _ in _LATENCIES for stat in ("p50", "p99")]
    for header in headers:
        table.add_column(header, justify="left" if header == "level" else "right")
    for level in result.levels:
        m = level.metrics
        goodput = "-" if m.request_goodput is None else f"{m.request_goodput:.2f}"
        table.add_row(
            level_key(level),
            str(m.completed),
            f"[red]{m.failed}[/red]" if m.failed else "0",
            f"{m.request_throughput:.2f}",
            f"{m.output_throughput:.1f}",
            f"{m.total_token_throughput:.1f}",
            goodput,
            *(_ms(getattr(m, pick), stat) for _, pick in _LATENCIES for stat in ("p50", "p99")),
        )
    table.caption = "latencies in ms; failed requests never enter a latency"
    return table


def latency_table(result: ServeResult) -> Table:
    """Every latency of every level: mean, std, p50, p90, p99 and max, in ms."""
    table = Table(title=f"{result.label}: latencies (ms)")
    stats = ("mean", "std", "p50", "p90", "p99", "max")
    for header in ("level", "metric", "n", *stats):
        table.add_column(header, justify="left" if header in ("level", "metric") else "right")
    for level in result.levels:
        for name, pick in _LATENCIES:
            distribution: Distribution | None = getattr(level.metrics, pick)
            count = "0" if distribution is None else str(distribution.count)
            table.add_row(
                level_key(level), name, count, *(_ms(distribution, stat) for stat in stats)
            )
        table.add_section()
    table.caption = "TPOT: (latency - TTFT) / (tokens - 1) per request; ITL: every gap"
    return table


def failures_table(result: ServeResult) -> Table | None:
    """Failed requests by level and kind, with an example message; None when none failed."""
    rows = [(level_key(lv), f) for lv in result.levels for f in lv.metrics.failures]
    mismatched = [
        (level_key(lv), lv.metrics.output_len_mismatches)
        for lv in result.levels
        if lv.metrics.output_len_mismatches
    ]
    if not rows and not mismatched:
        return None
    table = Table(title=f"{result.label}: failed requests and short outputs")
    for header in ("level", "kind", "count", "example"):
        table.add_column(header)
    for key, failure in rows:
        table.add_row(key, failure.kind, str(failure.count), failure.example[:100])
    for key, count in mismatched:
        table.add_row(
            key, "output length", str(count), "succeeded, but not with the tokens asked for"
        )
    return table


@dataclass(frozen=True, slots=True)
class ComparisonRow:
    """One system at one level, with its throughput relative to the baseline's."""

    level: str
    system: str
    completed: int
    failed: int
    request_throughput: float
    output_throughput: float
    ratio: float | None  # output_throughput / the baseline's at this level
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    tpot_p50_ms: float | None
    tpot_p99_ms: float | None
    itl_p50_ms: float | None
    e2el_p50_ms: float | None
    e2el_p99_ms: float | None


def _stat(distribution: Distribution | None, stat: str) -> float | None:
    return None if distribution is None else float(getattr(distribution, stat))


def comparison_rows(
    results: Sequence[ServeResult], baseline: str | None = None
) -> list[ComparisonRow]:
    """Rows grouped by level (in the first result's order), systems in the given order."""
    if not results:
        return []
    base_label = baseline or results[0].label
    by_system = {r.label: {level_key(lv): lv for lv in r.levels} for r in results}
    keys: list[str] = []
    for result in results:
        keys.extend(k for k in (level_key(lv) for lv in result.levels) if k not in keys)
    rows = []
    for key in keys:
        base = by_system.get(base_label, {}).get(key)
        for result in results:
            level = by_system[result.label].get(key)
            if level is None:
                continue
            m = level.metrics
            ratio = None
            if base is not None and base.metrics.output_throughput > 0:
                ratio = m.output_throughput / base.metrics.output_throughput
            rows.append(
                ComparisonRow(
                    level=key,
                    system=result.label,
                    completed=m.completed,
                    failed=m.failed,
                    request_throughput=m.request_throughput,
                    output_throughput=m.output_throughput,
                    ratio=ratio,
                    ttft_p50_ms=_stat(m.ttft_ms, "p50"),
                    ttft_p99_ms=_stat(m.ttft_ms, "p99"),
                    tpot_p50_ms=_stat(m.tpot_ms, "p50"),
                    tpot_p99_ms=_stat(m.tpot_ms, "p99"),
                    itl_p50_ms=_stat(m.itl_ms, "p50"),
                    e2el_p50_ms=_stat(m.e2el_ms, "p50"),
                    e2el_p99_ms=_stat(m.e2el_ms, "p99"),
                )
            )
    return rows


_COMPARISON_HEADERS = (
    "level",
    "system",
    "ok",
    "failed",
    "req/s",
    "out tok/s",
    "x baseline",
    "TTFT p50",
    "TTFT p99",
    "TPOT p50",
    "TPOT p99",
    "ITL p50",
    "E2EL p50",
    "E2EL p99",
)


def _cells(row: ComparisonRow) -> list[str]:
    def fmt(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    return [
        row.level,
        row.system,
        str(row.completed),
        str(row.failed),
        fmt(row.request_throughput, 2),
        fmt(row.output_throughput),
        "-" if row.ratio is None else f"{row.ratio:.2f}x",
        fmt(row.ttft_p50_ms),
        fmt(row.ttft_p99_ms),
        fmt(row.tpot_p50_ms),
        fmt(row.tpot_p99_ms),
        fmt(row.itl_p50_ms),
        fmt(row.e2el_p50_ms),
        fmt(row.e2el_p99_ms),
    ]


def comparison_table(rows: Sequence[ComparisonRow], baseline: str) -> Table:
    table = Table(title=f"side by side (x baseline: output tok/s over {baseline}'s)")
    for header in _COMPARISON_HEADERS:
        table.add_column(header, justify="left" if header in ("level", "system") else "right")
    previous = None
    for row in rows:
        if previous is not None and row.level != previous:
            table.add_section()
        table.add_row(*_cells(row))
        previous = row.level
    table.caption = "latencies in ms"
    return table


def comparison_markdown(rows: Sequence[ComparisonRow], baseline: str) -> str:
    """The comparison as a GitHub Markdown table (latencies in ms)."""
    headers = [h if h != "x baseline" else f"x {baseline}" for h in _COMPARISON_HEADERS]
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" if i < 2 else "---:" for i in range(len(headers))) + " |",
    ]
    lines.extend("| " + " | ".join(_cells(row)) + " |" for row in rows)
    return "\n".join(lines) + "\n"


COMPARISON_SCHEMA = "tgi-bench-comparison/1"


@dataclass(frozen=True, slots=True)
class Comparison:
    """Several serve results side by side: the table's rows and every result in full."""

    created: str
    baseline: str  # the label ratios are relative to
    rows: tuple[ComparisonRow, ...]
    results: tuple[ServeResult, ...]
    schema: str = COMPARISON_SCHEMA


def engine_table(result: EngineResult) -> Table:
    """One row per batch size: prefill and decode step latencies (ms) and throughputs."""
    p = result.parameters
    table = Table(
        title=f"{result.label} on {result.model_id}: {p.input_len} prompt tokens, "
        f"{p.decode_steps} decode steps, {p.runs} runs"
    )
    headers = (
        "batch",
        "prefill p50",
        "prefill p90",
        "prefill p99",
        "prefill tok/s",
        "step mean",
        "step p50",
        "step p90",
        "step p99",
        "decode tok/s",
    )
    for header in headers:
        table.add_column(header, justify="right")
    for level in result.levels:
        table.add_row(
            str(level.batch_size),
            f"{level.prefill_ms.p50:.1f}",
            f"{level.prefill_ms.p90:.1f}",
            f"{level.prefill_ms.p99:.1f}",
            f"{level.prefill_tokens_per_s:.0f}",
            f"{level.decode_step_ms.mean:.1f}",
            f"{level.decode_step_ms.p50:.1f}",
            f"{level.decode_step_ms.p90:.1f}",
            f"{level.decode_step_ms.p99:.1f}",
            f"{level.decode_tokens_per_s:.1f}",
        )
    table.caption = "latencies in ms; a decode step gives one token to every row"
    return table
