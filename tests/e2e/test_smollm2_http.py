"""SmolLM2 through HTTP: token-for-token equal to transformers, alone and batched."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from .conftest import Reference, RunningServer, chat, generate, read_stream, token_ids

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain gravity to a child in one sentence.",
]


async def test_greedy_equals_transformers_alone(
    smollm2_server: RunningServer, reference: Reference
) -> None:
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=300) as client:
        for question in QUESTIONS[:3]:
            prompt = chat(reference.tokenizer, question)
            body = await generate(client, prompt, max_new_tokens=24)
            assert token_ids(body) == reference.greedy(prompt, 24), question


async def test_greedy_equals_transformers_inside_a_mixed_batch(
    smollm2_server: RunningServer, reference: Reference
) -> None:
    prompts = [chat(reference.tokenizer, q) for q in QUESTIONS]
    lengths = [8, 28, 16, 20]
    expected = [reference.greedy(p, n) for p, n in zip(prompts, lengths, strict=True)]
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=300) as client:
        greedy = [
            generate(client, p, max_new_tokens=n) for p, n in zip(prompts, lengths, strict=True)
        ]
        # Sampled companions with other lengths share the batch and must not disturb it.
        sampled = [
            generate(
                client,
                "Once upon a time" + " very" * i,
                max_new_tokens=12 + i,
                do_sample=True,
                temperature=0.8,
                top_k=40,
                seed=i + 1,
            )
            for i in range(3)
        ]
        bodies = await asyncio.gather(*greedy, *sampled)
    for body, want in zip(bodies[: len(prompts)], expected, strict=True):
        assert token_ids(body) == want
    kv = await drained_kv(smollm2_server)
    assert kv.used_tokens == 0 and not kv.seq_ids


async def drained_kv(server: RunningServer) -> Any:
    """The router's KV view once its last release has landed (bounded wait)."""
    for _ in range(200):
        kv = server.state.router.stats().kv
        if not kv.seq_ids:
            return kv
        await asyncio.sleep(0.05)  # the release runs on the server's own thread and loop
    return kv


async def test_a_request_joining_mid_stream_keeps_both_exact(
    smollm2_server: RunningServer, reference: Reference
) -> None:
    first_prompt = chat(reference.tokenizer, QUESTIONS[1])
    second_prompt = chat(reference.tokenizer, QUESTIONS[0])
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=300) as client:
        payload = {"inputs": first_prompt, "parameters": {"max_new_tokens": 30, "details": True}}
        async with client.stream("POST", "/generate_stream", json=payload) as stream:
            events: list[dict[str, Any]] = []
            joined: asyncio.Future[dict[str, Any]] | None = None
            async for line in stream.aiter_lines():
                if not line.startswith("data:"):
                    continue
                events.append(json.loads(line[5:]))
                if len(events) == 5:
                    joined = asyncio.ensure_future(
                        generate(client, second_prompt, max_new_tokens=10)
                    )
            assert joined is not None
            second = await joined
    assert [e["token"]["id"] for e in events] == reference.greedy(first_prompt, 30)
    assert token_ids(second) == reference.greedy(second_prompt, 10)
    assert events[-1]["generated_text"] == reference.tokenizer.decode(
        [e["token"]["id"] for e in events], skip_special_tokens=True
    )


async def test_sixteen_concurrent_streams_complete_with_correct_text(
    smollm2_server: RunningServer, reference: Reference
) -> None:
    prompts = [chat(reference.tokenizer, q) for q in QUESTIONS]
    expected = {p: reference.greedy(p, 20) for p in prompts}
    jobs = [(prompts[i % 4], 5 + i) for i in range(16)]  # mixed lengths 5..20
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=600) as client:
        results = await asyncio.gather(*(read_stream(client, p, n) for p, n in jobs))
    for (prompt, n), events in zip(jobs, results, strict=True):
        ids = [e["token"]["id"] for e in events]
        assert ids == expected[prompt][: len(ids)]
        assert len(ids) == n or events[-1]["token"]["special"]
        text = "".join(e["token"]["text"] for e in events if not e["token"]["special"])
        assert events[-1]["generated_text"] == text
        assert "\ufffd" not in text
        assert all(e["generated_text"] is None for e in events[:-1])


async def test_a_client_that_disconnects_frees_its_kv(
    smollm2_server: RunningServer, reference: Reference
) -> None:
    prompt = chat(reference.tokenizer, "Tell me a very long story about dragons.")
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": 400}}
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=300) as client:
        async with client.stream("POST", "/generate_stream", json=payload) as stream:
            seen = 0
            async for line in stream.aiter_lines():
                seen += line.startswith("data:")
                if seen == 3:
                    busy = (await client.get("/info")).json()["batch"]
                    break
        assert busy["kv_live_sequences"] == 1 and busy["kv_used_tokens"] > 0
        for _ in range(400):  # the release happens at the next step boundary
            batch = (await client.get("/info")).json()["batch"]
            if batch["kv_live_sequences"] == 0:
                break
            await asyncio.sleep(0.05)
        assert batch["kv_live_sequences"] == 0
        assert batch["kv_used_tokens"] == 0
        assert batch["current_size"] == 0
