"""One table from core exceptions to TGI's status codes and `{error, error_type}` bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from tgi.errors import (
    BackendUnavailable,
    GenerationError,
    InvalidRequest,
    Overloaded,
    TgiError,
)

__all__ = ["ERROR_TABLE", "error_body", "install_error_handlers"]

logger = logging.getLogger(__name__)

# exception class -> (HTTP status, TGI's error_type)
ERROR_TABLE: dict[type[TgiError], tuple[int, str]] = {
    InvalidRequest: (422, "validation"),
    GenerationError: (424, "generation"),
    Overloaded: (429, "overloaded"),
    BackendUnavailable: (503, "unhealthy"),
}


def error_body(exc: TgiError) -> tuple[int, dict[str, str]]:
    """Status and body for a core exception; unknown ones are 500s."""
    for cls, (status, error_type) in ERROR_TABLE.items():
        if isinstance(exc, cls):
            return status, {"error": str(exc), "error_type": error_type}
    return 500, {"error": str(exc), "error_type": "internal"}


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        parts.append(f"{location}: {error.get('msg', 'invalid')}" if location else error["msg"])
    return "; ".join(parts) or "invalid request body"


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; routes and the core never build error responses."""

    @app.exception_handler(TgiError)
    async def _tgi_error(_: Request, exc: TgiError) -> JSONResponse:
        status, body = error_body(exc)
        return JSONResponse(status_code=status, content=body)

    @app.exception_handler(RequestValidationError)
    async def _body_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            status_code=422,
            content={"error": _describe(exc), "error_type": "validation"},
        )
