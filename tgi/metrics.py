"""Prometheus metrics with TGI's names, in a registry per server (tests stay isolated)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["Metrics"]

_DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)


class Metrics:
    """Every metric the router and server record; exposed on `/metrics`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.request_count = Counter("tgi_request_count", "Requests received", registry=r)
        self.request_success = Counter(
            "tgi_request_success", "Requests that ended well", registry=r
        )
        self.request_failure = Counter(
            "tgi_request_failure", "Requests that failed", ["err"], registry=r
        )
        self.queue_size = Gauge("tgi_queue_size", "Requests waiting", registry=r)
        self.batch_current_size = Gauge(
            "tgi_batch_current_size", "Rows in the running batch", registry=r
        )
        self.batch_current_max_tokens = Gauge(
            "tgi_batch_current_max_tokens", "KV tokens reserved by the running batch", registry=r
        )
        self.kv_used_tokens = Gauge(
            "tgi_kv_cache_used_tokens", "KV tokens the backend holds now", registry=r
        )
        self.kv_capacity_tokens = Gauge(
            "tgi_kv_cache_capacity_tokens", "KV tokens the backend can hold", registry=r
        )
        self.request_duration = Histogram(
            "tgi_request_duration", "End-to-end seconds", buckets=_DURATION_BUCKETS, registry=r
        )
        self.request_queue_duration = Histogram(
            "tgi_request_queue_duration",
            "Seconds waiting before the first step",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_inference_duration = Histogram(
            "tgi_request_inference_duration",
            "Seconds from first step to end",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_mean_time_per_token_duration = Histogram(
            "tgi_request_mean_time_per_token_duration",
            "Seconds per generated token",
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
        self.request_generated_tokens = Histogram(
            "tgi_request_generated_tokens",
            "Tokens generated per request",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.request_input_length = Histogram(
            "tgi_request_input_length",
            "Prompt tokens per request",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.batch_forward_duration = Histogram(
            "tgi_batch_forward_duration",
            "Seconds per backend call",
            ["method"],
            buckets=_DURATION_BUCKETS,
            registry=r,
        )
