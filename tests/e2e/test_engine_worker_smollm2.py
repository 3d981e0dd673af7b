"""SmolLM2's engine worker killed mid-stream: 503s for what ran, a restart, the queue
served with transformers' tokens, and no stale prefix cache afterwards."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Reference, RunningServer, chat, generate, serve_smollm2, token_ids

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

STORY = "Tell me a long story about a dragon who learns to bake bread."


@pytest.fixture
def fragile_server() -> Iterator[RunningServer]:
    """A server of its own (the test kills its worker): two rows run, the rest queue."""
    yield from serve_smollm2(max_total_tokens=512, kv_cache_memory=64 * 2**20, max_batch_size=2)


async def _stream_until_first_token(
    client: httpx.AsyncClient, prompt: str, started: asyncio.Event
) -> list[dict[str, Any]]:
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": 400}}
    events: list[dict[str, Any]] = []
    async with client.stream("POST", "/generate_stream", json=payload) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
                started.set()
    return events


async def _until(client: httpx.AsyncClient, **batch: int) -> None:
    for _ in range(1000):
        now = (await client.get("/info")).json()["batch"]
        if all(now[key] == value for key, value in batch.items()):
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"the batch never reached {batch}: {now}")


async def test_a_worker_killed_mid_stream(
    fragile_server: RunningServer, reference: Reference
) -> None:
    tokenizer = reference.tokenizer
    story = chat(tokenizer, STORY)
    queued_prompts = [chat(tokenizer, "What is the capital of France?"), chat(tokenizer, "Hi!")]
    async with httpx.AsyncClient(base_url=fragile_server.url, timeout=300) as client:
        await generate(client, story, max_new_tokens=4)  # the story's prefix is now cached
        started = asyncio.Event()
        streamed = asyncio.create_task(_stream_until_first_token(client, story, started))
        await asyncio.wait_for(started.wait(), timeout=120)
        plain = asyncio.create_task(
            client.post("/generate", json={"inputs": story, "parameters": {"max_new_tokens": 400}})
        )
        await _until(client, current_size=2)  # both rows run ...
        queued = [
            asyncio.create_task(generate(client, p, max_new_tokens=12)) for p in queued_prompts
        ]
        await _until(client, current_size=2, queue_size=2)  # ... and both others wait
        pid = (await client.get("/info")).json()["engine"]["pid"]
        os.kill(pid, signal.SIGKILL)
        killed = time.monotonic()

        events = await streamed
        assert events[-1]["error_type"] == "unhealthy", events[-1]
        assert "SIGKILL" in events[-1]["error"]
        response = await plain
        assert response.status_code == 503
        assert response.json()["error_type"] == "unhealthy"
        for _ in range(600):
            if (await client.get("/health")).status_code == 200:
                break
            await asyncio.sleep(0.1)
        assert (await client.get("/health")).status_code == 200
        assert time.monotonic() - killed < 60
        for prompt, task in zip(queued_prompts, queued, strict=True):
            assert token_ids(await task) == reference.greedy(prompt, 12)
        # shares the story's prefix, cached before the crash: recomputed, not read back
        body = await generate(client, story, max_new_tokens=16)
        assert token_ids(body) == reference.greedy(story, 16)
        info = (await client.get("/info")).json()
        assert info["engine"]["pid"] != pid and info["engine"]["restarts"] == 1
        metrics = (await client.get("/metrics")).text
        assert re.search(r"^tgi_engine_restarts 1$", metrics, re.MULTILINE), metrics
