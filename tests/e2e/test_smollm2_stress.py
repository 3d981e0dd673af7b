"""Many SmolLM2 requests at once over HTTP: random lengths, clients that walk away,
a KV pool too small for all of them. Every block comes back; every answer is right."""

from __future__ import annotations

import asyncio
import json
import random
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from .conftest import Reference, RunningServer, chat, serve_smollm2

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain gravity to a child in one sentence.",
    "Name a famous painter.",
    "What do bees make?",
]
MAX_NEW = 24
NUM_REQUESTS = 120
# 12 MiB of float32 KV is 17 blocks of 16 tokens: one 128-token sequence fits (start-up
# requires it), a few dozen concurrent ones do not, so the router must preempt.
POOL_BYTES = 12 * 2**20


@pytest.fixture(scope="module")
def small_pool_server() -> Iterator[RunningServer]:
    yield from serve_smollm2(max_total_tokens=128, kv_cache_memory=POOL_BYTES)


async def _generate(client: httpx.AsyncClient, prompt: str, n: int) -> list[int]:
    body = {"inputs": prompt, "parameters": {"max_new_tokens": n, "details": True}}
    response = await client.post("/generate", json=body)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


async def _walk_away(client: httpx.AsyncClient, prompt: str, after: int) -> int:
    """Stream, then close the connection after `after` tokens; returns tokens seen."""
    body = {"inputs": prompt, "parameters": {"max_new_tokens": MAX_NEW}}
    seen = 0
    async with client.stream("POST", "/generate_stream", json=body) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data:") and "token" in json.loads(line[5:]):
                seen += 1
                if seen >= after:
                    break  # leaving the block closes the connection mid-stream
    return seen


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


async def test_stress_frees_every_block_and_answers_correctly(
    small_pool_server: RunningServer, reference: Reference
) -> None:
    rng = random.Random(7)
    prompts = [chat(reference.tokenizer, question) for question in QUESTIONS]
    expected = {prompt: reference.greedy(prompt, MAX_NEW) for prompt in prompts}
    jobs: list[tuple[str, str, int]] = []  # (kind, prompt, max_new_tokens or tokens to read)
    for _ in range(NUM_REQUESTS):
        prompt = rng.choice(prompts)
        if rng.random() < 0.3:
            jobs.append(("walk_away", prompt, rng.randint(1, 6)))
        else:
            jobs.append(("generate", prompt, rng.randint(1, MAX_NEW)))
    limits = httpx.Limits(max_connections=NUM_REQUESTS)
    async with httpx.AsyncClient(
        base_url=small_pool_server.url, timeout=600, limits=limits
    ) as client:
        before = (await client.get("/metrics")).text

        async def run(kind: str, prompt: str, n: int) -> Any:
            if kind == "generate":
                return await _generate(client, prompt, n)
            return await _walk_away(client, prompt, n)

        results = await asyncio.gather(*(run(*job) for job in jobs))
        for _ in range(100):  # the last disconnects are noticed at the next step
            info = (await client.get("/info")).json()["batch"]
            if info["kv_live_sequences"] == 0 and info["current_size"] == 0:
                break
            await asyncio.sleep(0.1)
        after = (await client.get("/metrics")).text
    assert info["kv_live_sequences"] == 0 and info["kv_used_tokens"] == 0, info
    assert info["queue_size"] == 0 and info["current_size"] == 0, info
    assert _metric(after, "tgi_kv_cache_blocks_used") == 0
    preempted = _metric(after, "tgi_request_preemption") - _metric(before, "tgi_request_preemption")
    assert preempted > 0, "the pool was meant to be too small for every request at once"
    for (kind, prompt, n), result in zip(jobs, results, strict=True):
        if kind == "generate":
            # transformers stops at EOS too, so a short answer is a prefix of the longest
            assert result == expected[prompt][:n], prompt
        else:
            assert 1 <= result <= n
