"""The FastAPI application: routes, error handlers and the router's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tgi import __version__
from tgi.server.access import install_access
from tgi.server.errors import install_error_handlers
from tgi.server.limits import PayloadLimit
from tgi.server.openai import router as openai_router
from tgi.server.openai import v1_router as openai_v1_router
from tgi.server.routes import generate, service
from tgi.server.state import ServerState
from tgi.server.tracing import Tracing, setup_tracing

__all__ = ["create_app"]


def create_app(state: ServerState, *, tracing: Tracing | None = None) -> FastAPI:
    """An app serving `state`; the router loop starts and stops with the app.

    `tracing` records each request's spans; by default one exporting to
    `--otlp-endpoint` when that is set (tests pass one with an in-memory exporter).
    """
    if tracing is None and state.config.otlp_endpoint:
        tracing = setup_tracing(state.config.otlp_endpoint, state.config.otlp_service_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if tracing is not None:
            state.router.on_step = tracing.record_step
        state.router.start()
        try:
            yield
        finally:
            await state.router.stop()
            if tracing is not None:
                tracing.shutdown()

    app = FastAPI(
        title="Text Generation Inference",
        description="Text Generation Webserver (tgi)",
        version=__version__,
        lifespan=lifespan,
    )
    app.state.tgi = state
    install_error_handlers(app)
    app.add_middleware(PayloadLimit, limit_bytes=state.config.payload_limit)
    app.include_router(generate.router)
    app.include_router(service.router)
    app.include_router(openai_v1_router)
    app.include_router(openai_router)
    install_access(app, state.config, tracing)  # last: outermost (tgi.server.access)
    return app
