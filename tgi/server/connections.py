"""uvicorn's connection limits as tgi's flags, and the header read timeout it lacks.

NOTE: uvicorn (0.29 to at least 0.55) has no header read timeout: its keep-alive timer
(`--keep-alive-timeout`) is armed only after a response, so a connection that never
sends a complete request head (a half-open socket, a slowloris client dripping header
bytes) is held until the client goes, and h11 has no timer of its own. The
`--header-read-timeout` protocol below closes such a connection: the clock starts when
the connection opens, or when the first byte of a later request arrives, and stops
when h11 has parsed the request head. A request's *body* is not timed here: the
`--payload-limit` middleware reads it inside the app, and a client that stops sending
it holds one request (counted by `--max-connections`), not an idle socket.

`--max-connections` is uvicorn's `limit_concurrency`: past that many open connections
(or running requests), a new request is answered 503 at once; the connections are
still accepted, which is why the header timeout is what bounds idle ones.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from tgi.config import ServeConfig

__all__ = ["HeaderTimeoutProtocol", "header_timeout_protocol", "uvicorn_options"]


class HeaderTimeoutProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request head takes longer than
    `header_timeout_s` (set on the subclass `header_timeout_protocol` makes)."""

    header_timeout_s: float = 10.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._waiting_for_head():
            if self._header_timer is None:  # the first bytes of a later request
                self._arm_header_timer()
        else:
            self._disarm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def _waiting_for_head(self) -> bool:
        return self.conn.their_state is h11.IDLE

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self._waiting_for_head() and not self.transport.is_closing():
            self.logger.debug("closing a connection that sent no request head in time")
            self.transport.close()


def header_timeout_protocol(timeout_s: float) -> type[HeaderTimeoutProtocol]:
    """The protocol class uvicorn instantiates per connection, with this timeout."""
    return type("HeaderTimeoutProtocol", (HeaderTimeoutProtocol,), {"header_timeout_s": timeout_s})


def uvicorn_options(config: ServeConfig) -> dict[str, Any]:
    """`uvicorn.Config`'s arguments for `tgi serve`, less the app: address, limits, and
    no logging set-up of uvicorn's own (`tgi.logs` did it)."""
    return {
        "host": config.hostname,
        "port": config.port,
        "log_config": None,
        "http": header_timeout_protocol(config.header_read_timeout),
        "timeout_keep_alive": config.keep_alive_timeout,
        "limit_concurrency": config.max_connections,
    }
