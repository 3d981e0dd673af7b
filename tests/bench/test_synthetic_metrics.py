"""End to end over loopback: measured metrics equal the delays a synthetic server was given,
and failures are counted without stopping the run."""

from __future__ import annotations

import math

import httpx
import pytest

from tgi.bench.client import Api, StreamClient
from tgi.bench.loadgen import Level, run_level
from tgi.bench.metrics import LevelMetrics, compute_metrics
from tgi.bench.records import BenchRequest
from tgi.bench.synthetic import Fault, SyntheticSpec, serve_in_thread

TTFT_S = 0.08
ITL_S = 0.02
TOKENS = 8


def _close(measured_ms: float, given_s: float) -> bool:
    """Never below what the server waited; above it only by loopback and scheduling."""
    given_ms = given_s * 1000.0
    return given_ms - 1.0 <= measured_ms <= given_ms * 1.3 + 5.0


async def _run(url: str, api: Api, num: int, concurrency: int) -> LevelMetrics:
    requests = [BenchRequest("hello", 5, TOKENS)] * num
    async with StreamClient(url, api, timeout_s=10.0) as client:
        run = await run_level(client, requests, Level(math.inf, concurrency, num))
    return compute_metrics(run.outcomes, run.duration_s)


@pytest.mark.parametrize("api", list(Api))
async def test_metrics_match_known_delays(api: Api) -> None:
    spec = SyntheticSpec(ttft_s=TTFT_S, itl_s=ITL_S)
    with serve_in_thread(spec) as (url, _):
        m = await _run(url, api, num=8, concurrency=4)
    assert (m.completed, m.failed, m.output_len_mismatches) == (8, 0, 0)
    assert m.total_output_tokens == 8 * TOKENS
    assert m.ttft_ms is not None and m.tpot_ms is not None
    assert m.itl_ms is not None and m.e2el_ms is not None
    assert _close(m.ttft_ms.p50, TTFT_S), m.ttft_ms
    assert _close(m.tpot_ms.p50, ITL_S), m.tpot_ms
    assert _close(m.itl_ms.p50, ITL_S), m.itl_ms
    assert m.itl_ms.count == 8 * (TOKENS - 1)
    assert _close(m.e2el_ms.p50, TTFT_S + (TOKENS - 1) * ITL_S), m.e2el_ms
    # two waves of 4 concurrent requests, each wave one request's latency long
    wave_s = TTFT_S + (TOKENS - 1) * ITL_S
    assert 2 * wave_s <= m.duration_s <= 2 * wave_s * 1.5 + 0.1
    assert m.output_throughput == pytest.approx(8 * TOKENS / m.duration_s)


async def test_failures_are_counted_and_the_run_finishes() -> None:
    faults = (
        Fault.NONE,
        Fault.HTTP_429,
        Fault.DROP_MID_STREAM,
        Fault.DROP_BEFORE_RESPONSE,
        Fault.ERROR_EVENT,
        Fault.TRUNCATE,
        Fault.HTTP_500,
    )
    spec = SyntheticSpec(ttft_s=0.01, itl_s=0.002, faults=faults)
    with serve_in_thread(spec) as (url, server):
        m = await _run(url, Api.TGI, num=14, concurrency=1)  # one at a time: faults in order
    assert dict(server.faults_served) == {fault: 2 for fault in faults}
    assert (m.num_requests, m.completed, m.failed) == (14, 2, 12)
    assert {f.kind: f.count for f in m.failures} == {
        "http_429": 2,
        "http_500": 2,
        "connection": 4,  # dropped before the status line and in the middle of the body
        "server_error": 2,
        "incomplete": 2,
    }
    assert m.ttft_ms is not None and m.ttft_ms.count == 2  # failures never enter latencies


async def test_dropping_server_under_concurrency() -> None:
    spec = SyntheticSpec(ttft_s=0.01, itl_s=0.002, faults=(Fault.NONE, Fault.DROP_MID_STREAM))
    with serve_in_thread(spec) as (url, _):
        m = await _run(url, Api.OPENAI, num=20, concurrency=5)
    assert m.completed + m.failed == 20
    assert m.failed == 10
    assert [f.kind for f in m.failures] == ["connection"]


async def test_unreachable_server_fails_every_request() -> None:
    with serve_in_thread(SyntheticSpec()) as (url, _):
        pass  # started and stopped: nothing listens on that port now
    m = await _run(url, Api.TGI, num=3, concurrency=3)
    assert (m.completed, m.failed) == (0, 3)
    assert m.failures[0].kind == "connection"


async def test_ignore_eos_and_lengths_are_sent() -> None:
    captured: list[dict[str, object]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        import json

        captured.append(json.loads(request.content))
        body = (
            'data: {"token": {"id": 1, "text": "a"}, "generated_text": null}\n\n'
            'data: {"token": {"id": 2, "text": "b"}, "generated_text": "ab",'
            ' "details": {"generated_tokens": 2}}\n\n'
        )
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    async with StreamClient("http://tgi", Api.TGI, http=http) as client:
        outcome = await client.send(BenchRequest("hi", 1, 2))
    assert outcome.success and outcome.output_tokens == 2
    assert captured == [
        {
            "inputs": "hi",
            "parameters": {
                "max_new_tokens": 2,
                "do_sample": False,
                "details": True,
                "ignore_eos": True,
            },
        }
    ]
