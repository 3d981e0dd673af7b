"""GET /info, /health, /metrics, /docs, /openapi.json and POST /tokenize."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from tgi.testing.fake_backend import FakeBackend


async def wait_until(condition: Callable[[], Any], timeout_s: float = 10.0) -> None:
    """Yield to the loop until `await condition()` holds, bounded in time (never sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError("condition never held")
        await asyncio.sleep(0)


# ---- /info ------------------------------------------------------------------------------


async def test_info_has_tgis_fields_and_the_backend(
    make_state: Any, serve_state: Any, openapi: dict[str, Any], schemas: Any
) -> None:
    client = await serve_state(make_state(max_concurrent_requests=7))
    response = await client.get("/info")
    assert response.status_code == 200
    info = response.json()
    schemas.validate("Info", info)
    assert set(openapi["components"]["schemas"]["Info"]["required"]) <= set(info)
    assert info["model_id"] == "fake/model"
    assert info["max_concurrent_requests"] == 7
    assert info["max_total_tokens"] == 256
    assert info["max_input_tokens"] == 255
    assert info["router"] == "text-generation-router"
    assert info["backend"] == "fake"
    assert info["backend_capabilities"]["batching"] == "continuous"
    assert info["backend_capabilities"]["kv_layout"] == "per_row"
    engine = info["engine"]
    assert (engine["placement"], engine["restarts"], engine["num_shard"]) == ("thread", 0, 1)
    assert engine["dtype_reason"] is None  # the fake backend chooses no dtype
    assert engine["details"] == {}  # ... and says nothing of how it runs
    assert info["batch"] == {
        "queue_size": 0,
        "current_size": 0,
        "reserved_tokens": 0,
        "kv_live_sequences": 0,
        "kv_used_tokens": 0,
        "kv_capacity_tokens": 4096,
        "kv_bytes_per_token": 4,
    }
    memory = info["memory"]
    assert memory["kv_bytes_per_token"] == 4
    assert memory["kv_capacity_bytes"] == 4 * 4096
    # the test process itself: at least torch and the app are resident
    assert memory["process_resident_bytes"] > 50 * 2**20


async def test_info_kv_returns_to_zero_when_a_stream_is_abandoned(
    make_state: Any, stream_client: Any, byte_tokenizer: Any, step_permits: Any
) -> None:
    permits = step_permits(3)  # prefill and two decodes, then the backend waits
    backend = FakeBackend(vocab_size=len(byte_tokenizer), step_gate=permits)
    state = make_state(backend)
    client = await stream_client(state)
    body = {"inputs": "leave early", "parameters": {"max_new_tokens": 200}}

    async def batch() -> dict[str, Any]:
        return (await client.get("/info")).json()["batch"]

    try:
        async with client.stream("POST", "/generate_stream", json=body) as response:
            first = await anext(response.aiter_lines())
            during = await batch()
        # Leaving the `async with` closed the stream: the client went away.
        permits.grant(10_000)

        async def drained() -> bool:
            return (await batch())["kv_used_tokens"] == 0

        await wait_until(drained)
        after = await batch()
    finally:
        permits.grant(10_000)
    assert first.startswith("data:")
    assert during["kv_live_sequences"] == 1
    assert during["kv_used_tokens"] >= len("leave early")
    assert during["reserved_tokens"] == len("leave early") + 200
    assert after["kv_live_sequences"] == 0
    assert after["current_size"] == 0
    (seq_id,) = backend.calls[0][1]
    assert backend.released == [seq_id]
    assert not backend.kv
    decodes = [ids for method, ids in backend.calls if method == "decode"]
    assert len(decodes) < 10, "the abandoned request kept decoding"
    registry = state.metrics.registry
    assert registry.get_sample_value("tgi_request_failure_total", {"err": "cancelled"}) == 1
    assert registry.get_sample_value("tgi_request_success_total") == 0


# ---- /health ----------------------------------------------------------------------------


async def test_health_follows_the_backend(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    backend = FakeBackend(
        vocab_size=len(byte_tokenizer), fail_prompts=[tuple(byte_tokenizer.encode("poison"))]
    )
    client = await serve_state(make_state(backend))
    healthy = await client.get("/health")
    assert healthy.status_code == 200

    failed = await client.post("/generate", json={"inputs": "poison"})
    assert failed.status_code == 424
    backend.healthy = False
    unhealthy = await client.get("/health")
    assert unhealthy.status_code == 503
    assert unhealthy.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    schemas.validate("ErrorResponse", unhealthy.json())

    backend.healthy = True
    recovered = await client.get("/health")
    assert recovered.status_code == 200
    # Once healthy again, the cheap path answers: a sick backend is not probed.
    backend.healthy = False
    assert (await client.get("/health")).status_code == 200


# ---- /metrics ---------------------------------------------------------------------------


def counters(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, labels) -> value for every counter sample of a Prometheus text page."""
    values = {}
    for family in text_string_to_metric_families(text):
        if family.type != "counter":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                values[(family.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


async def test_metrics_count_requests(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    count = ("tgi_request_count", ())
    success = ("tgi_request_success", ())
    validation = ("tgi_request_failure", (("err", "validation"),))

    before = await client.get("/metrics")
    assert before.status_code == 200
    assert before.headers["content-type"].startswith("text/plain")
    start = counters(before.text)
    assert start[count] == 0 and start[success] == 0
    assert validation not in start  # no labelled child until a first failure

    ok = {"inputs": "hello", "parameters": {"max_new_tokens": 2}}
    assert (await client.post("/generate", json=ok)).status_code == 200
    assert (await client.post("/generate_stream", json=ok)).status_code == 200
    bad = {"inputs": "hello", "parameters": {"top_k": 0}}
    assert (await client.post("/generate", json=bad)).status_code == 422

    end = counters((await client.get("/metrics")).text)
    assert end[count] == 3
    assert end[success] == 2
    assert end[validation] == 1


# ---- /tokenize ---------------------------------------------------------------------------


async def test_tokenize_gives_ids_and_character_offsets(
    make_state: Any, serve_state: Any, byte_tokenizer: Any, schemas: Any
) -> None:
    client = await serve_state(make_state())
    text = "hé 世"  # 1-, 2- and 3-byte characters: one byte token each, offsets in characters
    response = await client.post("/tokenize", json={"inputs": text})
    assert response.status_code == 200
    tokens = response.json()
    schemas.validate("TokenizeResponse", tokens)
    assert [token["id"] for token in tokens] == byte_tokenizer.encode(text)
    assert [(token["start"], token["stop"], token["text"]) for token in tokens] == [
        (0, 1, "h"),
        (1, 2, "é"),
        (1, 2, "é"),
        (2, 3, " "),
        (3, 4, "世"),
        (3, 4, "世"),
        (3, 4, "世"),
    ]


async def test_tokenize_refuses_empty_inputs(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    response = await client.post("/tokenize", json={"inputs": ""})
    assert response.status_code == 422
    assert response.json() == {
        "error": "Input validation error: `inputs` cannot be empty",
        "error_type": "validation",
    }


# ---- documentation -------------------------------------------------------------------------


async def test_docs_and_openapi_are_served(make_state: Any, serve_state: Any) -> None:
    client = await serve_state(make_state())
    docs = await client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    spec = await client.get("/openapi.json")
    assert spec.status_code == 200
    paths = spec.json()["paths"]
    for path in ("/", "/generate", "/generate_stream", "/health", "/info", "/metrics"):
        assert path in paths, path
    assert "post" in paths["/tokenize"]
