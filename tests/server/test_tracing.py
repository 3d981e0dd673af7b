"""OpenTelemetry traces: TGI's span names, recorded in memory (no collector, no network)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

# the otel extra, which the test extra includes
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tgi.config import resolve_config
from tgi.errors import ConfigError
from tgi.server.app import create_app
from tgi.server.tracing import Tracing, setup_tracing

GENERATE = {"inputs": "hello", "parameters": {"max_new_tokens": 3}}
TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


@pytest.fixture
def exporter() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    yield exporter
    exporter.clear()


@pytest.fixture
async def traced_client(make_state: Any, exporter: InMemorySpanExporter) -> Any:
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    app = create_app(make_state(), tracing=Tracing(provider))
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tgi")
    try:
        yield client
    finally:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


def by_name(spans: tuple[ReadableSpan, ...]) -> dict[str, list[ReadableSpan]]:
    named: dict[str, list[ReadableSpan]] = {}
    for span in spans:
        named.setdefault(span.name, []).append(span)
    return named


@pytest.mark.parametrize("path", ["/generate", "/generate_stream"])
async def test_a_generation_is_one_trace_with_tgis_span_names(
    traced_client: Any, exporter: InMemorySpanExporter, path: str
) -> None:
    response = await traced_client.post(path, json=GENERATE, headers={"x-request-id": "r1"})
    assert response.status_code == 200
    spans = by_name(exporter.get_finished_spans())
    steps = [*spans.pop("prefill", []), *spans.pop("decode", [])]
    assert sorted(spans) == sorted([f"POST {path}", "validate", "queued", "infer"])
    # each engine step is a span of its own, as in TGI's batching loop
    assert steps and all(step.parent is None for step in steps)
    assert all((step.attributes or {}).get("batch_size") == 1 for step in steps)
    (root,) = spans[f"POST {path}"]
    assert root.parent is None
    assert root.attributes is not None
    assert root.attributes["http.route"] == path
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["request_id"] == "r1"
    (validate,) = spans["validate"]
    (queued,) = spans["queued"]
    (infer,) = spans["infer"]
    for child in (validate, queued, infer):
        assert child.parent is not None
        assert child.parent.span_id == root.context.span_id
        assert child.context.trace_id == root.context.trace_id
    assert queued.end_time is not None and infer.start_time is not None
    assert queued.end_time == infer.start_time
    assert root.start_time is not None and root.end_time is not None
    assert root.start_time <= validate.start_time  # type: ignore[operator]
    assert infer.end_time <= root.end_time  # type: ignore[operator]


async def test_a_callers_traceparent_is_continued(
    traced_client: Any, exporter: InMemorySpanExporter
) -> None:
    await traced_client.post("/generate", json=GENERATE, headers={"traceparent": TRACEPARENT})
    (root,) = by_name(exporter.get_finished_spans())["POST /generate"]
    assert format(root.context.trace_id, "032x") == TRACE_ID
    assert root.parent is not None and format(root.parent.span_id, "016x") == "b7ad6b7169203331"


async def test_a_request_that_generates_nothing_has_only_its_root_span(
    traced_client: Any, exporter: InMemorySpanExporter
) -> None:
    assert (await traced_client.get("/health")).status_code == 200
    assert [span.name for span in exporter.get_finished_spans()] == ["GET /health"]


def test_otlp_endpoint_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk", None)
    with pytest.raises(ConfigError, match=r"pip install 'tgi-server\[otel\]'"):
        resolve_config({"otlp_endpoint": "http://collector:4317"}, {})
    with pytest.raises(ConfigError, match=r"OTLP_ENDPOINT.*tgi-server\[otel\]"):
        resolve_config({}, {"OTLP_ENDPOINT": "http://collector:4317"})


def test_setup_tracing_without_the_extra_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(ConfigError, match=r"pip install 'tgi-server\[otel\]'"):
        setup_tracing("http://collector:4317", "tgi")


def test_otlp_settings_keep_tgis_names_and_default() -> None:
    config = resolve_config(
        {}, {"OTLP_ENDPOINT": "http://collector:4317", "OTLP_SERVICE_NAME": "my-llm"}
    )
    assert (config.otlp_endpoint, config.otlp_service_name) == ("http://collector:4317", "my-llm")
    assert resolve_config({}, {}).otlp_service_name == "text-generation-inference.router"


def test_a_step_that_only_releases_kv_gets_no_span(exporter: InMemorySpanExporter) -> None:
    """A plan without rows (the KV of ended sequences freed) runs no forward: no span,
    so a trace's step spans are its forwards only."""
    from tgi.backend.contract import NewSequence, StepPlan

    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing = Tracing(provider)
    tracing.record_step(StepPlan(finished=(1,)), 0.001)
    assert exporter.get_finished_spans() == ()
    tracing.record_step(StepPlan(new=(NewSequence(2, (5, 6)),)), 0.001)
    (span,) = exporter.get_finished_spans()
    assert (span.name, (span.attributes or {}).get("batch_size")) == ("prefill", 1)
