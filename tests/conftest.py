"""Fixtures shared across the core's tests: a byte tokenizer and fake-backend servers."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tgi.config import ServeConfig, derive_limits, resolve_config
from tgi.engine.protocol import Engine
from tgi.launcher import assemble_engine_state, assemble_state
from tgi.server.app import create_app
from tgi.server.state import ServerState
from tgi.testing.fake_backend import FakeBackend
from tgi.testing.tiny_models import build_byte_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A byte-level tokenizer: every byte is a token, so UTF-8 splits across tokens."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("byte-tokenizer")
    build_byte_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def make_config(**values: Any) -> ServeConfig:
    """A derived config with small limits, from launcher-style values."""
    values.setdefault("max_total_tokens", 256)
    config = resolve_config(values, environ={})
    return derive_limits(config, max_position_embeddings=512)


StateFactory = Callable[..., ServerState]


@pytest.fixture
def make_state(byte_tokenizer: Any) -> StateFactory:
    """Build a server state around a FakeBackend sized to the byte tokenizer."""

    def factory(
        backend: FakeBackend | None = None, custom_policy: Any = None, **config_values: Any
    ) -> ServerState:
        backend = backend or FakeBackend(vocab_size=len(byte_tokenizer))
        return assemble_state(
            make_config(**config_values),
            backend,
            byte_tokenizer,
            eos_token_ids=frozenset({byte_tokenizer.eos_token_id}),
            model_id="fake/model",
            backend_name="fake",
            backend_version="0",
            custom_policy=custom_policy,
        )

    return factory


@pytest.fixture
def make_engine_state(byte_tokenizer: Any) -> Callable[..., ServerState]:
    """Build a server state around any `Engine` (no grammar compiler)."""

    def factory(engine: Engine, **config_values: Any) -> ServerState:
        return assemble_engine_state(
            make_config(**config_values),
            engine,
            byte_tokenizer,
            None,
            eos_token_ids=frozenset({byte_tokenizer.eos_token_id}),
            model_id="fake/model",
            backend_name="fake",
            backend_version="0",
        )

    return factory


@pytest.fixture
async def serve_state() -> Callable[[ServerState], Any]:
    """Serve a state in-process; yields an httpx client bound to the app's lifespan."""
    clients: list[tuple[httpx.AsyncClient, Any]] = []

    async def start(state: ServerState) -> httpx.AsyncClient:
        app = create_app(state)
        lifespan = app.router.lifespan_context(app)
        await lifespan.__aenter__()
        client = httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://tgi", timeout=60
        )
        clients.append((client, lifespan))
        return client

    yield start
    for client, lifespan in clients:
        await client.aclose()
        await lifespan.__aexit__(None, None, None)


@pytest.fixture(scope="session")
def openapi() -> dict[str, Any]:
    import json

    return json.loads((Path(__file__).parent / "data" / "tgi-openapi.json").read_text())
