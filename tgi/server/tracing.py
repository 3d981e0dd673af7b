"""OpenTelemetry traces (`--otlp-endpoint`, `--otlp-service-name`), with TGI's span names.

NOTE: one trace per HTTP request. Its root span is the server span `"{METHOD} {route}"`
(what TGI's OtelAxumLayer names it), continuing a `traceparent` the client sent. Its
children carry TGI's names: `validate` (tokenizing and checking, TGI's
`Validation::validate`), `queued` (arrival to the first scheduled step, TGI's queue
span) and `infer` (first scheduled step to the last token, TGI's per-entry batch span),
one `queued` and `infer` pair per generated sequence. They are recorded when the
request's final event arrives, from the durations the router measured
(`FinalEvent.queued_s`, `inference_s`). Each engine step is a span of its own, as TGI's
batching loop has them: `prefill` when the step computes prompt tokens, else `decode`,
with the batch size (`Router.on_step`).

The opentelemetry SDK and its OTLP exporter are the optional `otel` extra; they are
imported only when tracing is on.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from tgi.errors import ConfigError

__all__ = ["OTEL_EXTRA_HINT", "Tracing", "setup_tracing"]

OTEL_EXTRA_HINT = "OpenTelemetry traces need the otel extra: pip install 'tgi-server[otel]'"


class Tracing:
    """Starts and ends the spans of HTTP requests on one tracer provider."""

    def __init__(self, provider: Any) -> None:
        self._provider = provider
        self._tracer = provider.get_tracer("tgi.server")

    def start_request(self, method: str, path: str, headers: Mapping[str, str]) -> Any:
        """The root span of one request, a child of the caller's `traceparent` if any."""
        from opentelemetry import propagate
        from opentelemetry.trace import SpanKind

        return self._tracer.start_span(
            f"{method} {path}",
            context=propagate.extract(dict(headers)),
            kind=SpanKind.SERVER,
            attributes={"http.request.method": method, "url.path": path},
        )

    def end_request(self, span: Any, route: str, status: int, request_id: str) -> None:
        """Name the span after the matched route (not the raw path) and end it."""
        from opentelemetry.trace import Status, StatusCode

        span.update_name(f"{span.attributes.get('http.request.method', '')} {route}".strip())
        span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        span.set_attribute("request_id", request_id)
        if status >= 500:
            span.set_status(Status(StatusCode.ERROR))
        span.end()

    def record_phase(self, parent: Any, name: str, start_ns: int, end_ns: int) -> None:
        """A finished child span of `parent`, from measured times (ns since the epoch)."""
        from opentelemetry import trace

        context = trace.set_span_in_context(parent)
        span = self._tracer.start_span(name, context=context, start_time=start_ns)
        span.end(end_time=end_ns)

    def record_generation(self, parent: Any, queued_s: float, inference_s: float) -> None:
        """`queued` then `infer`, ending now: one generated sequence's time in the router."""
        end_ns = time.time_ns()
        infer_start_ns = end_ns - int(inference_s * 1e9)
        self.record_phase(parent, "queued", infer_start_ns - int(queued_s * 1e9), infer_start_ns)
        self.record_phase(parent, "infer", infer_start_ns, end_ns)

    def record_step(self, plan: Any, seconds: float) -> None:
        """One engine step, ending now: `prefill` if it computes prompt tokens (new rows
        or prompt chunks), else `decode`. A step without rows (it only releases the KV of
        sequences that ended) runs no forward and gets no span, as in TGI."""
        if not plan.rows:
            return
        prefill = bool(plan.new) or any(not row.decode for row in plan.running)
        end_ns = time.time_ns()
        span = self._tracer.start_span(
            "prefill" if prefill else "decode",
            start_time=end_ns - int(seconds * 1e9),
            attributes={"batch_size": len(plan.rows), "step": plan.step_index},
        )
        span.end(end_time=end_ns)

    def shutdown(self) -> None:
        """Flush what is buffered and stop exporting (at server exit)."""
        self._provider.shutdown()


def setup_tracing(endpoint: str, service_name: str) -> Tracing:
    """A `Tracing` exporting over OTLP/gRPC to `endpoint` in batches, as TGI does.

    Raises `ConfigError` naming the `otel` extra when the SDK is not installed.
    """
    try:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:
        raise ConfigError(f"{OTEL_EXTRA_HINT} ({exc})") from None
    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint)))
    return Tracing(provider)
