"""Prometheus metrics with TGI's names, in a registry per server (tests stay isolated).

NOTE: TGI exports through metrics-rs, whose text format differs from
`prometheus_client.generate_latest` in two ways dashboards notice: a counter is exposed
under its own name (`tgi_request_count 3`, not `tgi_request_count_total 3`), and there
are no `_created` series. `exposition` writes that format from the same registry;
`prometheus_client`'s parser reads it back (it maps such counters to `*_total` samples,
exactly as it does for a real TGI).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["CONTENT_TYPE", "Metrics", "exposition"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# TGI's duration buckets: 35 steps of a geometric sequence from 0.00015 s (router/src/server.rs).
_DURATION_BUCKETS = tuple(0.0001 * 1.5**i for i in range(1, 36))
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)


class Metrics:
    """Every metric the router and server record; exposed on `/metrics`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_count = Counter("tgi_request_count", "Total number of requests", registry=r)
        self.request_success = Counter(
            "tgi_request_success", "Number of successful requests", registry=r
        )
        self.request_failure = Counter(
            "tgi_request_failure", "Number of failed requests, by reason", ["err"], registry=r
        )
        self.queue_size = Gauge("tgi_queue_size", "Current queue size", registry=r)
        self.batch_current_size = Gauge("tgi_batch_current_size", "Current batch size", registry=r)
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "Maximum tokens for the current batch", registry=r
        )
        self.kv_used_tokens = Gauge(
            "tgi_kv_cache_used_tokens", "KV tokens the backend holds now", registry=r
        )
        self.kv_capacity_tokens = Gauge(
            "tgi_kv_cache_capacity_tokens", "KV tokens the backend can hold", registry=r
        )
        self.kv_blocks_used = Gauge(
            "tgi_kv_cache_blocks_used", "Paged KV blocks owned by sequences", registry=r
        )
        self.kv_blocks_free = Gauge(
            "tgi_kv_cache_blocks_free",
            "Paged KV blocks free or evictable (cached prefixes no sequence owns)",
            registry=r,
        )
        self.prefix_cache_queried_tokens = Counter(
            "tgi_prefix_cache_queried_tokens",
            "Prompt tokens looked up in the prefix cache",
            registry=r,
        )
        self.prefix_cache_hit_tokens = Counter(
            "tgi_prefix_cache_hit_tokens",
            "Prompt tokens whose KV came from the prefix cache instead of a prefill",
            registry=r,
        )
        self.preemptions = Counter(
            "tgi_request_preemption",
            "Running requests preempted for lack of KV blocks (recomputed later)",
            registry=r,
        )
        self.speculative_draft_tokens = Counter(
            "tgi_speculative_draft_tokens", "Draft tokens verified by speculation", registry=r
        )
        self.speculative_accepted_tokens = Counter(
            "tgi_speculative_accepted_tokens", "Draft tokens accepted by speculation", registry=r
        )
        self.engine_restarts = Counter(
            "tgi_engine_restarts",
            "Engine worker restarts after the worker died or stopped answering",
            registry=r,
        )
        self.engine_healthy = Gauge(
            "tgi_engine_healthy", "1 while the engine serves, 0 while it restarts", registry=r
        )
        self.engine_detail = Gauge(
            "tgi_engine_detail",
            "How the backend runs, one series per detail /info shows under engine.details "
            "(compiled shapes, attention, graphs); the value is 1",
            ["key", "value"],
            registry=r,
        )
        self.engine_tracked_sequences = Gauge(
            "tgi_engine_tracked_sequences",
            "Sequences whose sampler state the engine holds (as of the last stats call)",
            registry=r,
        )

        def seconds(name: str, doc: str, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, buckets=_DURATION_BUCKETS, registry=r)

        def tokens(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=_TOKEN_BUCKETS, registry=r)

        self.request_duration = seconds("tgi_request_duration", "Request duration")
        self.engine_step_overhead = seconds(
            "tgi_engine_step_overhead_duration",
            "Time a step spends outside the engine: the thread hop, and for a worker "
            "process the encoding and the socket, both ways",
        )
        self.request_validation_duration = seconds(
            "tgi_request_validation_duration", "Request validation duration"
        )
        self.request_queue_duration = seconds(
            "tgi_request_queue_duration", "Request queue duration"
        )
        self.request_inference_duration = seconds(
            "tgi_request_inference_duration", "Request inference duration"
        )
        self.request_mean_time_per_token_duration = seconds(
            "tgi_request_mean_time_per_token_duration", "Mean time per token per request"
        )
        self.request_generated_tokens = tokens(
            "tgi_request_generated_tokens", "Generated tokens per request"
        )
        self.request_input_length = tokens(
            "tgi_request_input_length", "Input token length per request"
        )
        self.request_max_new_tokens = tokens(
            "tgi_request_max_new_tokens", "Maximum new tokens per request"
        )
        self.batch_forward_duration = seconds(
            "tgi_batch_forward_duration",
            "Batch forward duration per method (prefill or decode)",
            ("method",),
        )

    def set_engine_details(self, details: Mapping[str, str]) -> None:
        """Replace the `tgi_engine_detail` series with `details` (an engine restart may
        bring other ones)."""
        self.engine_detail.clear()
        for key, value in details.items():
            self.engine_detail.labels(key=key, value=value).set(1)


def exposition(registry: CollectorRegistry) -> bytes:
    """The registry in Prometheus text format, as TGI's metrics-rs exporter writes it."""
    lines: list[str] = []
    for family in registry.collect():
        samples = [s for s in family.samples if not s.name.endswith("_created")]
        if not samples:
            continue
        lines.append(f"# HELP {family.name} {_escape_help(family.documentation)}")
        lines.append(f"# TYPE {family.name} {family.type}")
        for sample in samples:
            name = sample.name
            if family.type == "counter" and name == family.name + "_total":
                name = family.name
            lines.append(f"{name}{_labels(sample.labels)} {_value(sample.value)}")
    return ("\n".join(lines) + "\n").encode() if lines else b""


def _escape_help(text: str) -> str:
    return text.replace("\\", r"\\").replace("\n", r"\n")


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{key}="{_escape_label(value)}"' for key, value in labels.items()) + "}"


def _escape_label(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


def _value(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == int(value) and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))
