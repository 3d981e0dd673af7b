"""Percentiles and vLLM's metric definitions on hand-made outcomes."""

from __future__ import annotations

import pytest

from tgi.bench.metrics import SLO, Distribution, compute_metrics, percentile
from tgi.bench.records import FailureKind

from .conftest import failed_outcome, ok_outcome


def test_percentile_interpolates_linearly_between_ranks() -> None:
    values = [float(v) for v in range(1, 101)]  # 1..100
    assert percentile(values, 50) == pytest.approx(50.5)
    assert percentile(values, 90) == pytest.approx(90.1)
    assert percentile(values, 99) == pytest.approx(99.01)
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 100.0


def test_percentile_of_unsorted_small_arrays() -> None:
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([10.0, 0.0], 90) == pytest.approx(9.0)
    assert percentile([7.0], 99) == 7.0


def test_percentile_rejects_empty_and_out_of_range() -> None:
    with pytest.raises(ValueError):
        percentile([], 50)
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_distribution_is_in_milliseconds() -> None:
    dist = Distribution.from_seconds([0.001, 0.002, 0.003, 0.004])
    assert dist is not None
    assert dist.count == 4
    assert dist.mean == pytest.approx(2.5)
    assert dist.p50 == pytest.approx(2.5)
    assert dist.p90 == pytest.approx(3.7)
    assert dist.p99 == pytest.approx(3.97)
    assert dist.min == pytest.approx(1.0)
    assert dist.max == pytest.approx(4.0)
    assert dist.std == pytest.approx(1.118034, rel=1e-5)
    assert Distribution.from_seconds([]) is None


def test_metrics_follow_vllm_definitions() -> None:
    outcomes = [
        ok_outcome(0, 0.100, [0.010, 0.010, 0.010]),  # 4 tokens, latency 0.130
        ok_outcome(1, 0.200, [0.020, 0.040]),  # 3 tokens, latency 0.260
        ok_outcome(2, 0.050, []),  # 1 token: no TPOT, no ITL
        failed_outcome(3, FailureKind.HTTP, 429, "HTTP 429: overloaded"),
        failed_outcome(4, FailureKind.CONNECTION, error="reset"),
        failed_outcome(5, FailureKind.HTTP, 429, "HTTP 429: again"),
    ]
    m = compute_metrics(outcomes, duration_s=2.0)
    assert (m.num_requests, m.completed, m.failed) == (6, 3, 3)
    assert [(f.kind, f.count, f.example) for f in m.failures] == [
        ("http_429", 2, "HTTP 429: overloaded"),
        ("connection", 1, "reset"),
    ]
    assert m.total_output_tokens == 8
    assert m.total_input_tokens == 30  # successful requests only
    assert m.output_throughput == pytest.approx(4.0)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.total_token_throughput == pytest.approx(19.0)
    assert m.ttft_ms is not None and m.ttft_ms.mean == pytest.approx(350.0 / 3)
    # TPOT = (latency - ttft) / (tokens - 1): 10 ms and 30 ms; the 1-token request has none
    assert m.tpot_ms is not None and m.tpot_ms.count == 2
    assert m.tpot_ms.mean == pytest.approx(20.0)
    # ITL pools every gap of every request
    assert m.itl_ms is not None and m.itl_ms.count == 5
    assert m.itl_ms.mean == pytest.approx(18.0)
    assert m.e2el_ms is not None and m.e2el_ms.p50 == pytest.approx(130.0)
    assert m.good_requests is None and m.request_goodput is None
    assert m.output_len_mismatches == 0


def test_goodput_counts_requests_meeting_every_slo() -> None:
    outcomes = [
        ok_outcome(0, 0.100, [0.010] * 3),  # ttft 100, tpot 10
        ok_outcome(1, 0.300, [0.010] * 3),  # ttft too slow
        ok_outcome(2, 0.100, [0.050] * 3),  # tpot too slow
        ok_outcome(3, 0.150, []),  # one token: tpot counts as 0, as in vLLM
    ]
    m = compute_metrics(outcomes, 4.0, SLO.parse(["ttft:200", "tpot:20"]))
    assert m.good_requests == 2
    assert m.request_goodput == pytest.approx(0.5)


def test_output_length_mismatch_is_counted() -> None:
    outcomes = [ok_outcome(0, 0.1, [0.01] * 4, output_len=16), ok_outcome(1, 0.1, [0.01] * 4)]
    assert compute_metrics(outcomes, 1.0).output_len_mismatches == 1


def test_all_failed_level_has_no_latencies() -> None:
    m = compute_metrics([failed_outcome(0, FailureKind.TIMEOUT)], 1.0)
    assert (m.completed, m.failed, m.ttft_ms, m.output_throughput) == (0, 1, None, 0.0)


def test_slo_parse() -> None:
    assert SLO.parse(["ttft:500 tpot:50", "e2el:2000"]) == SLO(500.0, 50.0, 2000.0)
    assert SLO.parse([]).empty
    for bad in (["ttft"], ["itl:5"], ["ttft:-1"]):
        with pytest.raises(ValueError):
            SLO.parse(bad)
