"""One table from core exceptions to TGI's status codes and `{error, error_type}` bodies,
and the app's answers to what no route handles (routing, unreadable bodies, bugs) in
the shape of the route family asked: TGI's, or OpenAI's under /v1/."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from tgi.errors import (
    BackendUnavailable,
    GenerationError,
    InvalidRequest,
    Overloaded,
    TgiError,
)

__all__ = [
    "ERROR_TABLE",
    "error_body",
    "install_error_handlers",
    "openai_error",
    "payload_too_large",
    "shaped_error",
]

logger = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"  # the routes that answer errors in OpenAI's shape

# exception class -> (HTTP status, TGI's error_type)
ERROR_TABLE: dict[type[TgiError], tuple[int, str]] = {
    InvalidRequest: (422, "validation"),
    GenerationError: (424, "generation"),
    Overloaded: (429, "overloaded"),
    BackendUnavailable: (503, "unhealthy"),
}


def error_body(exc: TgiError) -> tuple[int, dict[str, str]]:
    """Status and body for a core exception; unknown ones are 500s.

    Validation messages get TGI's `Input validation error: ` prefix (its `InferError`
    display), so clients that match on TGI's text keep working.
    """
    for cls, (status, error_type) in ERROR_TABLE.items():
        if isinstance(exc, cls):
            message = str(exc)
            if isinstance(exc, InvalidRequest):
                message = f"Input validation error: {message}"
            return status, {"error": message, "error_type": error_type}
    return 500, {"error": str(exc), "error_type": "internal"}


def openai_error(message: str, error_type: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error body, what the `openai` SDK reads; `type` carries TGI's error_type."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": None}}


def shaped_error(path: str, message: str, error_type: str) -> dict[str, Any]:
    """An error body in the shape of the route family `path` belongs to."""
    if path.startswith(OPENAI_PREFIX):
        return openai_error(message, error_type)
    return {"error": message, "error_type": error_type}


def payload_too_large() -> tuple[int, dict[str, str]]:
    """TGI's body limit answer (axum's DefaultBodyLimit), in TGI's error shape."""
    return 413, {
        "error": "Failed to buffer the request body: length limit exceeded",
        "error_type": "validation",
    }


def _describe(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        location = ".".join(str(item) for item in error.get("loc", ()) if item != "body")
        parts.append(f"{location}: {error.get('msg', 'invalid')}" if location else error["msg"])
    return "; ".join(parts) or "invalid request body"


def _json_syntax_error(exc: RequestValidationError) -> str | None:
    """The JSON parser's complaint when the body is not JSON at all, else None."""
    for error in exc.errors():
        if error.get("type") == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", error.get("msg", "invalid JSON"))
            return f"Failed to parse the request body as JSON: {reason}"
    return None


def _http_error(exc: HTTPException) -> tuple[int, str, str]:
    """(status, message, error_type) of an HTTPException: routing's 404 and 405, or
    FastAPI's 400 for a body it could not decode (not UTF-8, or nested past the JSON
    parser's recursion limit), which is axum's 400 for a body serde cannot parse."""
    if exc.status_code == 400 and isinstance(exc.__cause__, (ValueError, RecursionError)):
        return 400, f"Failed to parse the request body as JSON: {exc.__cause__}", "validation"
    error_type = HTTPStatus(exc.status_code).phrase.lower().replace(" ", "_")
    return exc.status_code, str(exc.detail), error_type


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers; routes and the core never build error responses."""

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        status, message, error_type = _http_error(exc)
        content = shaped_error(request.url.path, message, error_type)
        return JSONResponse(status_code=status, content=content, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, _: Exception) -> JSONResponse:
        # Starlette answers with this, then raises the exception again for the log.
        content = shaped_error(request.url.path, "Internal Server Error", "internal")
        return JSONResponse(status_code=500, content=content)

    @app.exception_handler(TgiError)
    async def _tgi_error(_: Request, exc: TgiError) -> JSONResponse:
        status, body = error_body(exc)
        return JSONResponse(status_code=status, content=body)

    @app.exception_handler(RequestValidationError)
    async def _body_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        # axum's answers, in TGI's body shape: 400 when the body is not JSON, 422 when
        # it is JSON of the wrong shape.
        syntax = _json_syntax_error(exc)
        if syntax is not None:
            return JSONResponse(
                status_code=400, content={"error": syntax, "error_type": "validation"}
            )
        return JSONResponse(
            status_code=422,
            content={"error": _describe(exc), "error_type": "validation"},
        )
