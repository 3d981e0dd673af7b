"""OpenAI-shaped error bodies for the /v1 routes, with TGI's status codes.

`{"error": {"message", "type", "param", "code"}}` is what the `openai` SDK reads; the
status codes are TGI's (422 validation, 424 generation, 429 overloaded, 400 bad JSON),
so the SDK raises its typed exceptions (`UnprocessableEntityError`, `RateLimitError`,
...). `type` carries TGI's `error_type`. TGI's own routes keep `{error, error_type}`.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from tgi.errors import InvalidRequest, TgiError
from tgi.server.errors import error_body, openai_error

__all__ = ["OpenAIRoute", "TemplateError", "describe", "openai_error"]


class TemplateError(InvalidRequest):
    """The chat template is missing or failed to render (422, `template_error`)."""


def describe(exc: TgiError) -> tuple[int, str, str]:
    """(status, message, TGI error_type) of a core exception, as TGI's `InferError`
    displays it: `Template error: ...`, `Tool error: ...`, `Input validation error: ...`."""
    from tgi.server.openai.tools import ToolError  # tools imports this module

    if isinstance(exc, TemplateError):
        return 422, f"Template error: {exc}", "template_error"
    if isinstance(exc, ToolError):
        return 422, f"Tool error: {exc}", "tool_error"
    status, body = error_body(exc)
    return status, body["error"], body["error_type"]


def tgi_error(exc: TgiError) -> tuple[int, dict[str, str]]:
    """TGI's own `{error, error_type}` body, with the template and tool error types."""
    status, message, error_type = describe(exc)
    return status, {"error": message, "error_type": error_type}


def _body_error(exc: RequestValidationError) -> JSONResponse:
    from tgi.server.errors import _describe, _json_syntax_error  # one wording for both shapes

    syntax = _json_syntax_error(exc)
    if syntax is not None:
        return JSONResponse(status_code=400, content=openai_error(syntax, "validation"))
    errors = exc.errors()
    param = None
    if errors:
        location = [str(item) for item in errors[0].get("loc", ()) if item != "body"]
        param = ".".join(location) or None
    return JSONResponse(status_code=422, content=openai_error(_describe(exc), "validation", param))


class OpenAIRoute(APIRoute):
    """A route whose errors, body validation included, come back OpenAI-shaped
    (FastAPI's custom `APIRoute` recipe, so the app-wide TGI handlers stay as they are)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def openai_handler(request: Request) -> Response:
            try:
                return await handler(request)
            except RequestValidationError as exc:
                return _body_error(exc)
            except TgiError as exc:
                status, message, error_type = describe(exc)
                return JSONResponse(status_code=status, content=openai_error(message, error_type))

        return openai_handler
