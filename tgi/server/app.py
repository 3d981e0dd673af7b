"""The FastAPI application: routes, error handlers and the router's lifecycle."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from tgi import __version__
from tgi.server.errors import install_error_handlers
from tgi.server.limits import PayloadLimit
from tgi.server.openai import router as openai_router
from tgi.server.openai import v1_router as openai_v1_router
from tgi.server.routes import generate, service
from tgi.server.state import ServerState

__all__ = ["create_app"]


def create_app(state: ServerState) -> FastAPI:
    """An app serving `state`; the router loop starts and stops with the app."""

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        state.router.start()
        try:
            yield
        finally:
            await state.router.stop()

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
    return app
