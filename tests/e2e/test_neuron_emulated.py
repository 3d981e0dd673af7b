"""The Neuron backend end to end, on its CPU emulator: SmolLM2 over HTTP in 4 static slots.

One server per mode: "rebuild" (compiled without continuous batching: when a request
joins, the backend re-prefills every running slot itself) and "insert" (continuous
batching). Ten concurrent requests must all complete through the 4 slots, each with
exactly the tokens it gets when run alone.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tgi.config import resolve_config, snapshot_environ
from tgi.errors import ModelNotFound
from tgi.launcher import build_state, prepare
from tgi.server.app import create_app
from tgi.server.state import ServerState

from .conftest import CACHE_DIR, free_port, read_stream

pytestmark = [pytest.mark.smollm2, pytest.mark.slow]

SLOTS = 4
MODES = {"rebuild": "0", "insert": "1"}  # TGI_NEURON_CONTINUOUS_BATCHING
QUESTIONS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain gravity to a child in one sentence.",
    "Name a fruit that is yellow.",
    "What is two plus two?",
    "Give me a synonym for happy.",
    "Why is the sky blue?",
    "Say hello in Spanish.",
    "What do bees make?",
]
LENGTHS = [8 + (3 * i) % 11 for i in range(len(QUESTIONS))]  # 8..18: slots free at odd times


@dataclass
class NeuronServer:
    url: str
    state: ServerState
    mode: str


def _environ(mode: str) -> dict[str, str]:
    # The user's own TGI_/MAX_/HF_ settings must not leak into the server under test.
    environ = {
        key: value
        for key, value in snapshot_environ().items()
        if not key.startswith(("TGI_", "MAX_", "HF_"))
    }
    environ.update(
        TGI_BACKENDS="neuron",
        TGI_NEURON_EMULATE="1",
        TGI_NEURON_CONTINUOUS_BATCHING=MODES[mode],
        HF_BATCH_SIZE=str(SLOTS),
        HF_SEQUENCE_LENGTH="256",
        # in-process: the tests read the emulator's own counters (`rebuilt_rows`)
        TGI_ENGINE_PROCESS="0",
    )
    return environ


def _serve(state: ServerState, port: int) -> tuple[Any, threading.Thread]:
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(create_app(state), host="127.0.0.1", port=port, log_config=None)
    )
    thread = threading.Thread(target=server.run, name="tgi-neuron-test-server", daemon=True)
    thread.start()
    for _ in range(600):
        if server.started:
            return server, thread
        threading.Event().wait(0.05)  # another thread's socket: nothing to await here
    server.should_exit = True
    pytest.fail("the neuron test server did not start")


@pytest.fixture(scope="module", params=sorted(MODES))
def neuron_server(request: pytest.FixtureRequest) -> Iterator[NeuronServer]:
    mode = str(request.param)
    port = free_port()
    values = {
        "backend": "neuron",
        "cache_dir": str(CACHE_DIR),
        "port": port,
        "hostname": "127.0.0.1",
        "max_waiting_tokens": 1,  # rebuild mode: let newcomers join mid-stream
    }
    try:
        state = build_state(prepare(resolve_config(values, _environ(mode))))
    except ModelNotFound as exc:
        pytest.skip(f"the embedded SmolLM2 is not installed: {exc}")
    server, thread = _serve(state, port)
    try:
        yield NeuronServer(f"http://127.0.0.1:{port}", state, mode)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    from transformers import AutoTokenizer

    from tgi.testing.fixtures import smollm2_files

    return AutoTokenizer.from_pretrained(smollm2_files(CACHE_DIR).path)


def chat(tokenizer: Any, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))


async def generate(client: httpx.AsyncClient, prompt: str, max_new_tokens: int) -> list[int]:
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens, "details": True}}
    response = await client.post("/generate", json=payload)
    assert response.status_code == 200, response.text
    return [token["id"] for token in response.json()["details"]["tokens"]]


async def drained(server: NeuronServer) -> None:
    """Wait (bounded) for the last release, then check nothing is left in any slot."""
    for _ in range(200):
        if not server.state.router.stats().kv.seq_ids:
            break
        await asyncio.sleep(0.05)  # the release lands on the server's own loop
    assert server.state.router.stats().kv.used_tokens == 0
    assert server.state.router._policy.slots.num_free == SLOTS  # type: ignore[union-attr]


async def test_info_reports_the_emulated_static_batch(neuron_server: NeuronServer) -> None:
    async with httpx.AsyncClient(base_url=neuron_server.url, timeout=60) as client:
        info = (await client.get("/info")).json()
        metrics = (await client.get("/metrics")).text
    assert info["backend"] == "neuron"
    details = info["engine"]["details"]  # the compiled shapes, in /info and /metrics
    assert (details["batch_size"], details["sequence_length"]) == (str(SLOTS), "256")
    assert details["continuous_batching"] == str(neuron_server.mode == "insert")
    assert f'tgi_engine_detail{{key="batch_size",value="{SLOTS}"}} 1' in metrics
    assert 'tgi_engine_detail{key="sequence_length",value="256"} 1' in metrics
    assert info["model_device_type"] == "neuron (emulated)"
    caps = info["backend_capabilities"]
    assert (caps["batching"], caps["kv_layout"]) == ("static", "slots")
    assert (caps["static_batch_size"], caps["static_max_length"]) == (SLOTS, 256)
    assert caps["prefill_rebuilds_cache"] is (neuron_server.mode == "rebuild")
    assert (info["max_batch_size"], info["max_total_tokens"], info["max_input_tokens"]) == (
        SLOTS,
        256,
        128,
    )


async def test_ten_concurrent_requests_get_their_solo_tokens(
    neuron_server: NeuronServer, tokenizer: Any
) -> None:
    prompts = [chat(tokenizer, question) for question in QUESTIONS]
    backend = neuron_server.state.router.engine.backend  # type: ignore[attr-defined]
    async with httpx.AsyncClient(base_url=neuron_server.url, timeout=600) as client:
        alone = [await generate(client, p, n) for p, n in zip(prompts, LENGTHS, strict=True)]
        rebuilt_before = backend.rebuilt_rows  # type: ignore[attr-defined]
        together = await asyncio.gather(
            *(generate(client, p, n) for p, n in zip(prompts, LENGTHS, strict=True))
        )
    for question, solo, batched in zip(QUESTIONS, alone, together, strict=True):
        assert batched == solo, question
    rebuilt = backend.rebuilt_rows - rebuilt_before  # type: ignore[attr-defined]
    if neuron_server.mode == "rebuild":
        assert rebuilt > 0, "no request joined mid-stream: the rebuild path never ran"
    else:
        assert rebuilt == 0
    await drained(neuron_server)


async def test_alone_tokens_are_transformers_tokens(
    neuron_server: NeuronServer, tokenizer: Any
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from tgi.testing.fixtures import smollm2_files

    model = AutoModelForCausalLM.from_pretrained(
        smollm2_files(CACHE_DIR).path, dtype=torch.float32
    ).eval()
    prompt = chat(tokenizer, QUESTIONS[1])
    input_ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.inference_mode():
        out = model.generate(
            input_ids,
            attention_mask=torch.ones_like(input_ids),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tokenizer.eos_token_id,
        )
    async with httpx.AsyncClient(base_url=neuron_server.url, timeout=300) as client:
        assert await generate(client, prompt, 16) == out[0, input_ids.shape[1] :].tolist()


async def test_streams_keep_spaces_cjk_and_emoji(
    neuron_server: NeuronServer, tokenizer: Any
) -> None:
    # Small models continue repetitions: the outputs are multi-byte characters split
    # across tokens (which ones depends on the transformers version's GGUF tokenizer).
    prompts = [
        "🍣🍣🍣🍣🍣🍣🍣🍣",
        "東京 東京 東京 東京 東京",
        chat(tokenizer, "Translate 'thank you' to Japanese and add an emoji."),
        "hello world hello world hello world",
        "🎉 party 🎉 party 🎉 party",
        "日本 🍣 日本 🍣 日本 🍣",
    ]
    async with httpx.AsyncClient(base_url=neuron_server.url, timeout=600) as client:
        results = await asyncio.gather(*(read_stream(client, prompt, 20) for prompt in prompts))
    texts = []
    for prompt, events in zip(prompts, results, strict=True):
        text = "".join(event["token"]["text"] for event in events if not event["token"]["special"])
        final = events[-1]["generated_text"]
        ids = [event["token"]["id"] for event in events]
        assert "\ufffd" not in text, prompt
        # A stream holds back text ending in a character whose bytes are not all
        # generated yet; only such an unfinished tail may separate it from the full text.
        assert final.startswith(text), prompt
        assert final == text or final.endswith("\ufffd"), prompt
        assert final == tokenizer.decode(ids, skip_special_tokens=True)
        texts.append(text)
    joined = "".join(texts)
    assert any(ord(char) >= 0x1F000 for char in joined), texts  # emoji
    assert any(0x3040 <= ord(char) <= 0x9FFF for char in joined), texts  # kana and kanji
    assert " " in joined, texts
    # Characters split across tokens were held back ("") and then emitted whole.
    assert any(event["token"]["text"] == "" for events in results for event in events)
    await drained(neuron_server)


def test_backends_cli_shows_neuron_unavailable_with_the_reason() -> None:
    if any(Path("/dev").glob("neuron*")):
        pytest.skip("this machine has Neuron devices")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TGI_", "MAX_"))}
    tgi = str(Path(sys.executable).with_name("tgi"))
    result = subprocess.run(
        [tgi, "backends", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    records = {record["name"]: record for record in json.loads(result.stdout)}
    neuron = records["neuron"]
    assert neuron["status"] == "unavailable" and neuron["available"] is False
    assert neuron["distribution"] == "tgi-backend-neuron" and neuron["batching"] == "static"
    assert "no Neuron devices (/dev/neuron*)" in neuron["reason"]
    table = subprocess.run(
        [tgi, "backends"], env=env, capture_output=True, text=True, timeout=120, check=True
    ).stdout
    line = next(line for line in table.splitlines() if line.startswith("neuron"))
    assert " no " in line and "no Neuron devices" in line
