"""Grammar-constrained SmolLM2 over HTTP: every answer parses and validates, in batches
shared with unconstrained requests that stay token-for-token what they are alone."""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

import httpx
import jsonschema
import pytest

from .conftest import RunningServer, chat, generate, token_ids

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

NAME = {"type": "string", "maxLength": 12}

# (question, schema): small, so each answer ends well within MAX_NEW_TOKENS.
SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "Describe a person called Ana who is 31.",
        {
            "type": "object",
            "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    (
        "Give the capital of France and its population.",
        {
            "type": "object",
            "properties": {
                "city": {
                    "type": "object",
                    "properties": {
                        "name": NAME,
                        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
                    },
                    "required": ["name", "population"],
                    "additionalProperties": False,
                }
            },
            "required": ["city"],
            "additionalProperties": False,
        },
    ),
    (
        "List two or three fruits.",
        {
            "type": "object",
            "properties": {
                "fruits": {
                    "type": "array",
                    "items": {"type": "string", "maxLength": 8},
                    "minItems": 2,
                    "maxItems": 3,
                }
            },
            "required": ["fruits"],
            "additionalProperties": False,
        },
    ),
    (
        "What color is the sky?",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "green", "blue"]}},
            "required": ["color"],
            "additionalProperties": False,
        },
    ),
    (
        "What is a typical summer temperature in Paris, in Celsius?",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 50}},
            "required": ["celsius"],
            "additionalProperties": False,
        },
    ),
    (
        "Is Paris the capital of France?",
        {
            "type": "object",
            "properties": {"answer": {"type": "boolean"}, "country": NAME},
            "required": ["answer", "country"],
            "additionalProperties": False,
        },
    ),
    (
        "Give the middle name of a person who has none.",
        {
            "type": "object",
            "properties": {"middle_name": {"type": ["string", "null"], "maxLength": 8}},
            "required": ["middle_name"],
            "additionalProperties": False,
        },
    ),
    (
        "Give a US zip code.",
        {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
            "additionalProperties": False,
        },
    ),
    (
        "Make a shopping list with one or two items and quantities.",
        {
            "type": "object",
            "properties": {
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {
                            "name": {"type": "string", "maxLength": 8},
                            "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                        },
                        "required": ["name", "qty"],
                        "additionalProperties": False,
                    },
                    "minItems": 1,
                    "maxItems": 2,
                }
            },
            "required": ["items"],
            "additionalProperties": False,
        },
    ),
    (
        "How many legs does a bird have? Pick 1, 2 or 3.",
        {
            "type": "object",
            "properties": {"legs": {"type": "integer", "enum": [1, 2, 3]}},
            "required": ["legs"],
            "additionalProperties": False,
        },
    ),
    (
        "Give three digits.",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 0, "maximum": 9},
            "minItems": 3,
            "maxItems": 3,
        },
    ),
    (
        "Name a dog and, if you like, its age.",
        {
            "type": "object",
            "properties": {
                "dog": {"type": "string", "minLength": 1, "maxLength": 10},
                "age": {"type": "integer", "minimum": 0, "maximum": 20},
            },
            "required": ["dog"],
            "additionalProperties": False,
        },
    ),
]

DATE = r"[0-9]{4}-[0-9]{2}-[0-9]{2}"
PLAIN = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
]
MAX_NEW_TOKENS = 80


def json_prompt(tokenizer: Any, question: str, schema: dict[str, Any]) -> str:
    return chat(tokenizer, f"{question} Answer in JSON matching this schema: {json.dumps(schema)}")


async def test_schemas_validate_in_batches_shared_with_plain_requests(
    smollm2_server: RunningServer,
) -> None:
    tokenizer = smollm2_server.state.tokenizer
    plain = [chat(tokenizer, question) for question in PLAIN]
    async with httpx.AsyncClient(base_url=smollm2_server.url, timeout=600) as client:
        solo = [await generate(client, prompt, max_new_tokens=20) for prompt in plain]
        constrained = [
            generate(
                client,
                json_prompt(tokenizer, question, schema),
                max_new_tokens=MAX_NEW_TOKENS,
                grammar={"type": "json", "value": schema},
            )
            for question, schema in SCHEMAS
        ]
        dated = generate(
            client,
            chat(tokenizer, "When did the Second World War end? Answer with a date."),
            max_new_tokens=16,
            grammar={"type": "regex", "value": DATE},
        )
        mixed = [generate(client, prompt, max_new_tokens=20) for prompt in plain]
        # Interleaved so that the plain requests run inside the grammar batches.
        bodies = await asyncio.gather(
            *mixed[:1], *constrained[:6], *mixed[1:], *constrained[6:], dated
        )
    plain_bodies = [bodies[0], *bodies[7:9]]
    json_bodies = [*bodies[1:7], *bodies[9:-1]]
    for (question, schema), body in zip(SCHEMAS, json_bodies, strict=True):
        assert body["details"]["finish_reason"] == "eos_token", (question, body["generated_text"])
        jsonschema.validate(json.loads(body["generated_text"]), schema)
    assert re.fullmatch(DATE, bodies[-1]["generated_text"]), bodies[-1]["generated_text"]
    assert bodies[-1]["details"]["finish_reason"] == "eos_token"
    # Grammar rows leave the others' logits alone: greedy output is what it is alone
    # (this also needs a backend whose logits do not depend on the batch's makeup).
    for alone, together in zip(solo, plain_bodies, strict=True):
        assert token_ids(together) == token_ids(alone)
    router = smollm2_server.state.router
    for _ in range(200):  # the last releases land at the next step boundary
        if (await router.engine_stats()).num_matchers == 0:
            break
        await asyncio.sleep(0.05)
    assert (await router.engine_stats()).num_matchers == 0


async def test_streamed_grammar_output_is_the_generated_text(
    smollm2_server: RunningServer,
) -> None:
    tokenizer = smollm2_server.state.tokenizer
    question, schema = SCHEMAS[0]
    payload = {
        "inputs": json_prompt(tokenizer, question, schema),
        "parameters": {
            "max_new_tokens": MAX_NEW_TOKENS,
            "grammar": {"type": "json", "value": schema},
        },
    }
    events = []
    async with (
        httpx.AsyncClient(base_url=smollm2_server.url, timeout=600) as client,
        client.stream("POST", "/generate_stream", json=payload) as stream,
    ):
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    final = events[-1]
    jsonschema.validate(json.loads(final["generated_text"]), schema)
    text = "".join(event["token"]["text"] for event in events if not event["token"]["special"])
    assert text == final["generated_text"]
