"""Log set-up for the CLI: plain lines, or JSON lines with `--json-output`.

With `--json-output` every HTTP request also logs one access line (logger
`tgi.access`, fields under `access`: `tgi.server.access`), and every line logged while
a request is served carries its `request_id`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextvars import ContextVar
from typing import Any

__all__ = ["ACCESS_LOGGER", "REQUEST_ID", "setup_logging"]

ACCESS_LOGGER = "tgi.access"
# the id of the HTTP request being served (its `x-request-id`), set by the server
REQUEST_ID: ContextVar[str | None] = ContextVar("tgi_request_id", default=None)


class _JsonFormatter(logging.Formatter):
    def __init__(self, process: str | None = None) -> None:
        super().__init__()
        self._process = process

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)),
            "level": record.levelname,
            "target": record.name,
            "message": record.getMessage(),
        }
        if self._process:
            entry["process"] = self._process
        request_id = REQUEST_ID.get()
        if request_id is not None:
            entry["request_id"] = request_id
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            entry.update(access)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(
    json_output: bool = False, level: int = logging.INFO, *, process: str | None = None
) -> None:
    """Log to stderr. `process` names a process other than the server's (an engine
    worker shares the server's stderr): plain lines get it in brackets, JSON a field."""
    handler = logging.StreamHandler(sys.stderr)
    if json_output:
        handler.setFormatter(_JsonFormatter(process))
    else:
        where = f"[{process}] " if process else ""
        handler.setFormatter(
            logging.Formatter(f"%(asctime)s %(levelname)s {where}%(name)s: %(message)s", "%H:%M:%S")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # uvicorn's access log per request is noise at INFO under load; tgi's own access
    # line (id, route, status, tokens, timings) is for JSON pipelines, which filter
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.INFO if json_output else logging.WARNING)
