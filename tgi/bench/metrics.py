"""Serving metrics from request outcomes, defined as vLLM's `benchmark_serving` defines them.

NOTE: the definitions, for one level (all requests sent at one concurrency or rate):

- duration: from the first request sent to the last one finished (wall clock);
- output tokens/s = sum(output tokens of successful requests) / duration;
- total tokens/s = (sum(prompt tokens) + sum(output tokens)) / duration, successful only;
- requests/s = successful requests / duration;
- TTFT: time from sending to the first token event;
- TPOT = (latency - TTFT) / (output tokens - 1), for requests with more than one token;
- ITL: every gap between two consecutive token events, pooled across requests;
- E2EL: time from sending to the last token event;
- goodput = successful requests meeting every SLO given / duration, where a request of
  one token has a TPOT of 0 (as in vLLM);
- failures are never part of a latency; they are counted, by kind.

Percentiles use linear interpolation between closest ranks (numpy's default, as vLLM).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from tgi.bench.records import RequestOutcome

__all__ = ["SLO", "Distribution", "FailureCount", "LevelMetrics", "compute_metrics", "percentile"]


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of `values`, interpolating linearly between ranks."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile {q} is outside 0..100")
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass(frozen=True, slots=True)
class Distribution:
    """Summary of one latency, in milliseconds."""

    count: int  # samples summarised
    mean: float
    std: float
    min: float
    p50: float
    p90: float
    p99: float
    max: float

    @classmethod
    def from_seconds(cls, values_s: Sequence[float]) -> Distribution | None:
        """Summarise seconds as milliseconds; None when there is nothing to summarise."""
        if not values_s:
            return None
        ms = np.asarray(values_s, dtype=np.float64) * 1000.0
        p50, p90, p99 = np.percentile(ms, [50.0, 90.0, 99.0])
        return cls(
            count=int(ms.size),
            mean=float(ms.mean()),
            std=float(ms.std()),
            min=float(ms.min()),
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            max=float(ms.max()),
        )


@dataclass(frozen=True, slots=True)
class SLO:
    """Per-request service-level objectives for goodput, in milliseconds; None: no limit."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2el_ms: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_ms is None and self.tpot_ms is None and self.e2el_ms is None

    @classmethod
    def parse(cls, specs: Sequence[str]) -> SLO:
        """From vLLM's `--goodput` form: `ttft:500 tpot:50 e2el:2000` (milliseconds)."""
        values: dict[str, float] = {}
        for spec in specs:
            for item in spec.replace(",", " ").split():
                name, sep, raw = item.partition(":")
                if not sep or name not in ("ttft", "tpot", "e2el"):
                    raise ValueError(f"bad SLO {item!r}: use ttft:MS, tpot:MS or e2el:MS")
                value = float(raw)
                if value <= 0:
                    raise ValueError(f"SLO {name} must be positive, got {raw}")
                values[f"{name}_ms"] = value
        return cls(**values)

    def met_by(self, ttft_s: float, tpot_s: float, e2el_s: float) -> bool:
        """Whether one successful request meets every objective that is set."""
        checks = ((self.ttft_ms, ttft_s), (self.tpot_ms, tpot_s), (self.e2el_ms, e2el_s))
        return all(limit is None or value * 1000.0 <= limit for limit, value in checks)


@dataclass(frozen=True, slots=True)
class FailureCount:
    """How many requests failed for one reason, with one example message."""

    kind: str  # RequestOutcome.failure_key: "http_429", "connection", ...
    count: int
    example: str  # the first message of that kind


@dataclass(frozen=True, slots=True)
class LevelMetrics:
    """Everything one level of load measured. Latencies in ms, throughputs per second."""

    duration_s: float
    num_requests: int  # sent
    completed: int  # succeeded
    failed: int  # num_requests - completed
    failures: tuple[FailureCount, ...]  # by kind, most frequent first
    total_input_tokens: int  # prompt tokens of successful requests
    total_output_tokens: int  # generated tokens of successful requests
    request_throughput: float
    output_throughput: float
    total_token_throughput: float
    output_len_mismatches: int  # successful requests whose token count differs from asked
    ttft_ms: Distribution | None
    tpot_ms: Distribution | None
    itl_ms: Distribution | None
    e2el_ms: Distribution | None
    good_requests: int | None = None  # None when no SLO was given
    request_goodput: float | None = None


def _failures(outcomes: Sequence[RequestOutcome]) -> tuple[FailureCount, ...]:
    counts: Counter[str] = Counter()
    examples: dict[str, str] = {}
    for outcome in outcomes:
        key = outcome.failure_key
        if key is None:
            continue
        counts[key] += 1
        examples.setdefault(key, outcome.error or key)
    return tuple(FailureCount(kind, n, examples[kind]) for kind, n in counts.most_common())


def compute_metrics(
    outcomes: Sequence[RequestOutcome], duration_s: float, slo: SLO | None = None
) -> LevelMetrics:
    """The level's metrics; `duration_s` is the wall time from first send to last finish."""
    if duration_s <= 0:
        raise ValueError(f"duration must be positive, got {duration_s}")
    ok = [o for o in outcomes if o.success and o.ttft_s is not None and o.latency_s is not None]
    ttfts = [o.ttft_s for o in ok if o.ttft_s is not None]
    e2els = [o.latency_s for o in ok if o.latency_s is not None]
    tpots: list[float] = []
    all_tpots: list[float] = []  # 0 for one-token requests: goodput counts them (vLLM)
    for outcome, ttft, e2el in zip(ok, ttfts, e2els, strict=True):
        tpot = (e2el - ttft) / (outcome.output_tokens - 1) if outcome.output_tokens > 1 else 0.0
        if outcome.output_tokens > 1:
            tpots.append(tpot)
        all_tpots.append(tpot)
    itls = [gap for o in ok for gap in o.itl_s]
    total_in = sum(o.prompt_len for o in ok)
    total_out = sum(o.output_tokens for o in ok)
    good: int | None = None
    if slo is not None and not slo.empty:
        good = sum(slo.met_by(t, p, e) for t, p, e in zip(ttfts, all_tpots, e2els, strict=True))
    return LevelMetrics(
        duration_s=duration_s,
        num_requests=len(outcomes),
        completed=len(ok),
        failed=len(outcomes) - len(ok),
        failures=_failures(outcomes),
        total_input_tokens=total_in,
        total_output_tokens=total_out,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_out / duration_s,
        total_token_throughput=(total_in + total_out) / duration_s,
        output_len_mismatches=sum(o.output_tokens != o.output_len for o in ok),
        ttft_ms=Distribution.from_seconds(ttfts),
        tpot_ms=Distribution.from_seconds(tpots),
        itl_ms=Distribution.from_seconds(itls),
        e2el_ms=Distribution.from_seconds(e2els),
        good_requests=good,
        request_goodput=None if good is None else good / duration_s,
    )
