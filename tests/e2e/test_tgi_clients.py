"""TGI's own clients against a real server on SmolLM2: every parameter, streaming and not.

The `text-generation` client (sync and async) and `huggingface_hub.InferenceClient` must
parse every answer; raw bodies are checked against TGI's OpenAPI document; seeded
sampling must not depend on batch companions; the watermark must be detectable.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tgi.sampling import detect_watermark
from tgi.testing.openapi import OpenApiSchemas

from .conftest import RunningServer

pytestmark = [
    pytest.mark.smollm2,
    pytest.mark.slow,
    # text-generation 0.7 still calls pydantic's deprecated `.dict()`: not ours to fix.
    pytest.mark.filterwarnings("ignore:The `dict` method is deprecated:DeprecationWarning"),
]

OPENAPI = Path(__file__).resolve().parents[1] / "data" / "tgi-openapi.json"
PROMPT = "<|im_start|>user\nTell me a story about a dragon.<|im_end|>\n<|im_start|>assistant\n"

# Every GenerateParameters field a client can send, at valid non-neutral values.
EVERY_PARAMETER: dict[str, Any] = {
    "do_sample": True,
    "seed": 42,
    "temperature": 0.8,
    "top_k": 40,
    "top_p": 0.95,
    "typical_p": 0.97,
    "repetition_penalty": 1.2,
    "frequency_penalty": 0.4,
    "max_new_tokens": 8,
    "stop": ["\n\n"],
    "truncate": 12,
    "return_full_text": False,
    "watermark": True,
    "top_n_tokens": 3,
}


@pytest.fixture(scope="module")
def schemas() -> OpenApiSchemas:
    return OpenApiSchemas(json.loads(OPENAPI.read_text()))


def sse(body: str) -> list[dict[str, Any]]:
    events = []
    for block in body.split("\n\n"):
        if block.startswith("data:"):
            events.append(json.loads(block.removeprefix("data:")))
    return events


# ---- the text-generation client ----------------------------------------------------------


def test_text_generation_client_every_parameter(smollm2_server: RunningServer) -> None:
    from text_generation import Client

    client = Client(smollm2_server.url, timeout=120)
    params = {k: v for k, v in EVERY_PARAMETER.items() if k != "stop"}
    response = client.generate(
        PROMPT, stop_sequences=["\n\n"], decoder_input_details=True, **params
    )
    details = response.details
    assert details.seed == 42
    assert 1 <= details.generated_tokens <= 8
    assert len(details.prefill) == 12  # truncate keeps the last 12 prompt tokens
    assert details.prefill[0].logprob is None
    assert len(details.top_tokens) == details.generated_tokens
    assert all(len(step) == 3 for step in details.top_tokens)
    again = client.generate(PROMPT, stop_sequences=["\n\n"], **params)
    assert [t.id for t in again.details.tokens] == [t.id for t in details.tokens]

    best = client.generate(PROMPT, max_new_tokens=6, do_sample=True, best_of=2)
    assert len(best.details.best_of_sequences) == 1
    best_mean = sum(t.logprob for t in best.details.tokens) / len(best.details.tokens)
    other = best.details.best_of_sequences[0]
    assert best_mean >= sum(t.logprob for t in other.tokens) / len(other.tokens)
    assert best.details.seed != other.seed

    events = list(client.generate_stream(PROMPT, stop_sequences=["\n\n"], **params))
    assert [e.token.id for e in events] == [t.id for t in details.tokens]
    assert all(e.generated_text is None for e in events[:-1])
    assert events[-1].generated_text == response.generated_text
    assert events[-1].details.seed == 42
    assert all(len(e.top_tokens) == 3 for e in events)


def test_text_generation_client_errors(smollm2_server: RunningServer) -> None:
    from text_generation import Client
    from text_generation.errors import ValidationError

    client = Client(smollm2_server.url, timeout=120)
    with pytest.raises(ValidationError, match="must be <= 512"):
        client.generate(PROMPT, max_new_tokens=10_000)
    with pytest.raises(ValidationError, match=r"`top_n_tokens` must be >= 0 and <= 5\. Given: 6"):
        list(client.generate_stream(PROMPT, top_n_tokens=6))  # the error arrives as an event


async def test_text_generation_async_client(smollm2_server: RunningServer) -> None:
    from text_generation import AsyncClient

    client = AsyncClient(smollm2_server.url, timeout=120)
    response = await client.generate(PROMPT, max_new_tokens=5, top_n_tokens=2)
    assert response.details.generated_tokens == 5
    events = [event async for event in client.generate_stream(PROMPT, max_new_tokens=5)]
    assert [e.token.id for e in events] == [t.id for t in response.details.tokens]
    assert events[-1].generated_text == response.generated_text


# ---- huggingface_hub's InferenceClient ---------------------------------------------------


def test_inference_client_every_parameter(smollm2_server: RunningServer) -> None:
    from huggingface_hub import InferenceClient

    client = InferenceClient(model=smollm2_server.url, timeout=120)
    output = client.text_generation(
        PROMPT, details=True, decoder_input_details=True, **EVERY_PARAMETER
    )
    assert output.details is not None
    assert output.details.seed == 42
    assert len(output.details.prefill) == 12
    assert len(output.details.top_tokens or []) == output.details.generated_tokens
    text = client.text_generation(PROMPT, max_new_tokens=5, return_full_text=False)
    assert isinstance(text, str) and text

    best = client.text_generation(PROMPT, details=True, max_new_tokens=5, do_sample=True, best_of=2)
    assert best.details is not None and len(best.details.best_of_sequences or []) == 1

    stream = list(client.text_generation(PROMPT, details=True, stream=True, **EVERY_PARAMETER))
    assert [e.token.id for e in stream] == [t.id for t in output.details.tokens]
    assert stream[-1].details is not None and stream[-1].details.seed == 42
    assert stream[-1].generated_text == output.generated_text
    plain = list(client.text_generation(PROMPT, stream=True, max_new_tokens=4))
    assert all(isinstance(piece, str) for piece in plain) and len(plain) == 4


def test_inference_client_errors(smollm2_server: RunningServer) -> None:
    from huggingface_hub import InferenceClient
    from huggingface_hub.errors import TextGenerationError

    client = InferenceClient(model=smollm2_server.url, timeout=120)
    with pytest.raises(TextGenerationError, match="`temperature` must be strictly positive"):
        client.text_generation(PROMPT, temperature=0.0)
    with pytest.raises(TextGenerationError, match="not supported when streaming"):
        list(client.text_generation(PROMPT, stream=True, details=True, best_of=2, do_sample=True))


# ---- raw bodies against the OpenAPI document -------------------------------------------


async def test_every_body_matches_tgis_schemas(
    smollm2_server: RunningServer, schemas: OpenApiSchemas
) -> None:
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=120) as client:
        body = {"inputs": PROMPT, "parameters": {**EVERY_PARAMETER, "details": True}}
        full = await client.post("/generate", json=body)
        schemas.validate("GenerateResponse", full.json())
        assert set(full.json()["details"]) == {
            "finish_reason",
            "generated_tokens",
            "seed",
            "prefill",
            "tokens",
            "top_tokens",
        }
        best_body = {"inputs": PROMPT, "parameters": {"best_of": 2, "top_k": 10, "details": True}}
        best = await client.post(
            "/generate",
            json={
                **best_body,
                "parameters": {
                    **best_body["parameters"],
                    "max_new_tokens": 4,
                    "decoder_input_details": True,
                },
            },
        )
        schemas.validate("GenerateResponse", best.json())
        (sequence,) = best.json()["details"]["best_of_sequences"]
        schemas.validate("BestOfSequence", sequence)
        assert sequence["prefill"]  # decoder_input_details reach the other sequences too

        plain = await client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}
        )
        assert set(plain.json()) == {"generated_text"}  # no details unless asked
        compat = await client.post(
            "/", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        )
        assert isinstance(compat.json(), list) and len(compat.json()) == 1
        schemas.validate("GenerateResponse", compat.json()[0])

        stream = await client.post("/generate_stream", json=body)
        events = sse(stream.text)
        for event in events:
            schemas.validate("StreamResponse", event)
        assert "details" in events[-1] and events[-1]["details"]["seed"] == 42
        schemas.validate("StreamDetails", events[-1]["details"])

        info = await client.get("/info")
        schemas.validate("Info", info.json())
        for response in (
            await client.post("/generate", json={"inputs": PROMPT, "parameters": {"top_p": 1.0}}),
            await client.post(
                "/generate", content=b"{", headers={"content-type": "application/json"}
            ),
        ):
            schemas.validate("ErrorResponse", response.json())
        error_events = sse(
            (await client.post("/generate_stream", json={"inputs": "", "parameters": {}})).text
        )
        schemas.validate("ErrorResponse", error_events[0])


# ---- seeded sampling and the watermark on the real model ------------------------------------


async def test_seeded_sampling_ignores_batch_companions(smollm2_server: RunningServer) -> None:
    target = {
        "inputs": PROMPT,
        "parameters": {
            "seed": 2024,
            "temperature": 1.3,
            "repetition_penalty": 1.3,
            "frequency_penalty": 0.5,
            "top_n_tokens": 2,
            "max_new_tokens": 16,
            "details": True,
        },
    }
    companions = [
        {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 20}},
        {"inputs": PROMPT, "parameters": {"seed": 1, "top_k": 5, "max_new_tokens": 12}},
        {
            "inputs": "The sea",
            "parameters": {"typical_p": 0.5, "watermark": True, "max_new_tokens": 18},
        },
    ]
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=300) as client:
        alone = (await client.post("/generate", json=target)).json()
        busy = await asyncio.gather(
            *(client.post("/generate", json=body) for body in [*companions, target, *companions])
        )
    shared = busy[len(companions)].json()
    assert [t["id"] for t in shared["details"]["tokens"]] == [
        t["id"] for t in alone["details"]["tokens"]
    ]
    # The same tokens; logprobs equal up to float32 rounding, since the paged engine runs
    # every row of a step through one matmul whose kernel depends on the batch size.
    got_top, want_top = shared["details"]["top_tokens"], alone["details"]["top_tokens"]
    for got, want in zip(got_top, want_top, strict=True):
        assert [t["id"] for t in got] == [t["id"] for t in want]
        assert [t["logprob"] for t in got] == pytest.approx([t["logprob"] for t in want], abs=1e-4)
    assert all(response.status_code == 200 for response in busy)


async def test_the_watermark_is_detectable_in_smollm2_output(
    smollm2_server: RunningServer,
) -> None:
    tokenizer = smollm2_server.state.tokenizer
    prompt = "<|im_start|>user\nWrite a long essay about the history of Europe.<|im_end|>\n"
    prompt += "<|im_start|>assistant\n"
    context = tokenizer.encode(prompt)[-1]

    async def run(watermark: bool, seed: int) -> list[int]:
        parameters = {
            "seed": seed,
            "do_sample": True,
            "watermark": watermark,
            "max_new_tokens": 80,
            "ignore_eos": True,
            "details": True,
        }
        async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=300) as client:
            body = (
                await client.post("/generate", json={"inputs": prompt, "parameters": parameters})
            ).json()
        return [context] + [token["id"] for token in body["details"]["tokens"]]

    marked, plain = await asyncio.gather(run(True, 5), run(False, 5))
    marked_score, plain_score = detect_watermark(marked), detect_watermark(plain)
    assert marked_score.num_tokens == plain_score.num_tokens == 80
    assert marked_score.z_score > 4.0, marked_score
    assert plain_score.z_score < 2.0, plain_score


# ---- /metrics ----------------------------------------------------------------------------


async def test_metrics_parse_and_move(smollm2_server: RunningServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    async def scrape(client: httpx.AsyncClient) -> dict[tuple[str, str], float]:
        text = (await client.get("/metrics")).text
        assert "tgi_request_count_total" not in text  # TGI's names, no `_total`
        samples: dict[tuple[str, str], float] = {}
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                samples[(sample.name, json.dumps(sample.labels, sort_keys=True))] = sample.value
        return samples

    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=120) as client:
        before = await scrape(client)
        ok = await client.post(
            "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}
        )
        bad = await client.post("/generate", json={"inputs": PROMPT, "parameters": {"top_k": 0}})
        after = await scrape(client)
    assert (ok.status_code, bad.status_code) == (200, 422)

    def moved(name: str, labels: dict[str, str] | None = None) -> float:
        key = (name, json.dumps(labels or {}, sort_keys=True))
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert moved("tgi_request_count_total") == 2
    assert moved("tgi_request_success_total") == 1
    assert moved("tgi_request_failure_total", {"err": "validation"}) == 1
    assert moved("tgi_request_duration_count") == 1
    assert moved("tgi_request_generated_tokens_sum") == 2
    assert moved("tgi_batch_forward_duration_count", {"method": "prefill"}) >= 1
    for gauge in ("tgi_queue_size", "tgi_batch_current_size", "tgi_batch_current_max_tokens"):
        assert (gauge, "{}") in after
