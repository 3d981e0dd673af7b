"""A real tgi server on SmolLM2 (uvicorn on loopback, in a thread) and its reference.

Session-scoped: loading and warming the model once keeps the suite fast. The reference
is transformers' own `generate()` on the very same converted weights.
"""

from __future__ import annotations

import json
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
from tgi.parallel.env import free_port  # re-exported for the e2e modules
from tgi.server.app import create_app
from tgi.server.state import ServerState

REPO = Path(__file__).resolve().parents[2]
CACHE_DIR = REPO / ".cache" / "tgi-test"  # shared with tests/models: converted once


@dataclass
class RunningServer:
    url: str
    state: ServerState


def serve_smollm2(**values: Any) -> Iterator[RunningServer]:
    """Serve the embedded SmolLM2 on the CPU backend in float32 (the reference's dtype:
    on a CPU with native bf16 the backend might otherwise pick bf16) until closed."""
    import uvicorn

    environ = snapshot_environ()
    environ.pop("TGI_BACKEND", None)
    environ["TGI_BACKENDS"] = "cpu"
    config = resolve_config(
        {
            "cache_dir": str(CACHE_DIR),
            "dtype": "float32",
            "port": free_port(),
            "hostname": "127.0.0.1",
            **values,
        },
        environ,
    )
    try:
        state = build_state(prepare(config))
    except ModelNotFound as exc:
        pytest.skip(f"the embedded SmolLM2 is not installed: {exc}")
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(state), host="127.0.0.1", port=config.port, log_config=None, lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, name="tgi-test-server", daemon=True)
    thread.start()
    started = threading.Event()
    for _ in range(600):
        if server.started:
            started.set()
            break
        threading.Event().wait(0.05)  # waiting for another thread's socket: no event to await
    if not started.is_set():
        pytest.fail("test server did not start")
    try:
        yield RunningServer(f"http://127.0.0.1:{config.port}", state)
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="session")
def smollm2_server() -> Iterator[RunningServer]:
    # a small paged pool (about 1,400 tokens in float32): the session does not zero
    # gigabytes of RAM
    yield from serve_smollm2(max_total_tokens=512, kv_cache_memory=64 * 2**20)


@dataclass
class Reference:
    tokenizer: Any
    model: Any

    def greedy(self, prompt: str, max_new_tokens: int) -> list[int]:
        """transformers' greedy continuation of `prompt` (token ids, EOS included)."""
        return self.greedy_ids(
            self.tokenizer(prompt, return_tensors="pt").input_ids, max_new_tokens
        )

    def greedy_ids(self, input_ids: Any, max_new_tokens: int) -> list[int]:
        """The same from token ids ([1, n] tensor) already encoded."""
        import torch

        with torch.inference_mode():
            output = self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=self.tokenizer.eos_token_id,
            )
        return output[0, input_ids.shape[1] :].tolist()


@pytest.fixture(scope="session")
def reference(smollm2_server: RunningServer) -> Reference:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tgi.testing.fixtures import smollm2_files

    files = smollm2_files(CACHE_DIR)
    model = AutoModelForCausalLM.from_pretrained(files.path, dtype=torch.float32).eval()
    return Reference(AutoTokenizer.from_pretrained(files.path), model)


async def generate(client: httpx.AsyncClient, prompt: str, **params: Any) -> dict[str, Any]:
    """POST /generate with `details`; asserts a 200."""
    response = await client.post(
        "/generate", json={"inputs": prompt, "parameters": {"details": True, **params}}
    )
    assert response.status_code == 200, response.text
    return response.json()


def token_ids(body: dict[str, Any]) -> list[int]:
    return [token["id"] for token in body["details"]["tokens"]]


def chat(tokenizer: Any, question: str) -> str:
    messages = [{"role": "user", "content": question}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


async def read_stream(client: httpx.AsyncClient, prompt: str, n: int) -> list[dict[str, Any]]:
    """Every `data:` event of one /generate_stream request, parsed."""
    payload = {"inputs": prompt, "parameters": {"max_new_tokens": n}}
    events = []
    async with client.stream("POST", "/generate_stream", json=payload) as stream:
        assert stream.status_code == 200
        async for line in stream.aiter_lines():
            if line.startswith("data:"):
                events.append(json.loads(line[5:]))
    return events
