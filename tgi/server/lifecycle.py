"""How `tgi serve` starts listening and stops: the port checked first, a drain at the end.

NOTE: uvicorn's own shutdown closes the listening socket, waits for open connections up
to `timeout_graceful_shutdown`, then cancels what is left (a stream would end mid-way,
without a final or error event) and finally re-raises the signal it caught (exit 143
after a SIGTERM). `DrainingServer` keeps the first steps and changes the rest:

    SIGTERM / Ctrl-C ─► uvicorn closes the listener (new connections are refused) and
                        router.drain(timeout): a request read but not yet queued gets
                        a 503, the running and queued ones go on; at the timeout each
                        one left ends with an error event
                     ─► uvicorn waits for connections (timeout + a margin: the drain
                        ends them first), then the lifespan stops the router and the
                        engine worker
                     ─► exit status 0 (the re-raised SIGTERM meets a no-op handler)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import signal
import socket

import uvicorn

from tgi.errors import ConfigError
from tgi.router.router import Router

__all__ = ["DrainingServer", "check_port"]

_MARGIN_S = 5.0  # uvicorn's own deadline past the drain's: the drain always ends first


def check_port(host: str, port: int) -> None:
    """Raise `ConfigError` if `host:port` cannot be listened on, before a model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as exc:
            reason = "is in use" if exc.errno == errno.EADDRINUSE else f"cannot be bound: {exc}"
            raise ConfigError(f"--port {port} on {host} {reason}") from None


class DrainingServer(uvicorn.Server):
    """uvicorn with tgi's shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, router: Router, drain_timeout_s: float) -> None:
        config.timeout_graceful_shutdown = int(drain_timeout_s + _MARGIN_S)
        super().__init__(config)
        self._router = router
        self._drain_timeout_s = drain_timeout_s

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = asyncio.ensure_future(self._router.drain(self._drain_timeout_s))
        try:
            await super().shutdown(sockets)
        finally:
            drain.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await drain

    def run(self, sockets: list[socket.socket] | None = None) -> None:
        """Serve until a signal or `should_exit`, then return (no re-raised signal)."""
        previous = signal.signal(signal.SIGTERM, lambda *_: None)
        try:
            with contextlib.suppress(KeyboardInterrupt):  # the Ctrl-C it re-raises
                super().run(sockets)
        finally:
            signal.signal(signal.SIGTERM, previous)
