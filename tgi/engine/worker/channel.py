"""The socket between the HTTP process and its engine worker: typed messages, one at a time.

NOTE: a Unix-domain stream socket, framed by the standard library's
`multiprocessing.connection.Connection` (`send_bytes`/`recv_bytes`: a length prefix,
nothing pickled), carrying `tgi.backend.wire` messages. Chosen by measurement
(`benchmarks/engine_channel.py`, transports in turns in one run, 2 vCPUs): a
steady-state decode step's round trip took 66-84 us at 1 row, 128-188 at 32 and
440-455 at 256, at or below a ZeroMQ PAIR socket over `ipc://` carrying the same bytes
in 5 of 6 comparisons (85-136, 126-218, 522-572 us); it needs no extra dependency, and
a peer that dies is an end of file at once, not a silence. Both are far below a
forward (tens of ms on the CPU). Every wait is sliced
(`POLL_S`) so the caller can check its peer between slices: a worker that died, or a
front process that went away, is noticed within a slice instead of at a timeout; a
closed peer is noticed at once (end of file). The front's socket has OS-level send and
receive timeouts (`IO_TIMEOUT_S`) for the two waits that cannot be sliced: a write to a
worker that stopped reading, and the rest of a message that stopped half-way.
"""

from __future__ import annotations

import os
import shutil
import socket
import struct
import tempfile
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

from tgi.backend import wire

__all__ = ["POLL_S", "Channel", "ChannelClosed", "ChannelListener", "ChannelTimeout"]

POLL_S = 0.1  # how often a wait checks its peer
IO_TIMEOUT_S = 60  # the longest one write, or the rest of a message, may take


class ChannelTimeout(TimeoutError):
    """No message within the deadline (the peer may be alive but stuck)."""


class ChannelClosed(ConnectionError):
    """The peer closed its end: it exited, or was killed."""


def _wait(
    ready: Callable[[float], bool],
    timeout_s: float | None,
    peer_alive: Callable[[], None] | None,
) -> None:
    if ready(0):  # the common case: no slicing, no clock
        return
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while not ready(POLL_S):
        if peer_alive is not None:
            peer_alive()
        if deadline is not None and time.monotonic() > deadline:
            raise ChannelTimeout(f"no message in {timeout_s:.0f} s")


class ChannelListener:
    """The front process's end before its worker connects: a socket path in a private
    directory (one per worker incarnation), removed once the worker connected."""

    def __init__(self) -> None:
        self._directory = tempfile.mkdtemp(prefix="tgi-engine-")
        self.address = os.path.join(self._directory, "channel")
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._socket.bind(self.address)
        self._socket.listen(1)

    def accept(
        self, *, timeout_s: float | None = None, peer_alive: Callable[[], None] | None = None
    ) -> Channel:
        """The channel once the worker connected; the listening socket closes."""

        accepted: list[socket.socket] = []

        def ready(wait_s: float) -> bool:
            self._socket.settimeout(wait_s)  # 0: non-blocking
            try:
                accepted.append(self._socket.accept()[0])
            except (TimeoutError, BlockingIOError):
                return False
            return True

        try:
            _wait(ready, timeout_s, peer_alive)
        finally:
            self.close()  # the path served its purpose: nothing is left behind on disk
        connected = accepted[0]
        connected.setblocking(True)  # Connection reads and writes the raw descriptor
        # A write to a peer that stopped reading, or a message that stops half-way,
        # fails after this long instead of blocking the engine thread for good.
        timeout = struct.pack("ll", int(IO_TIMEOUT_S), 0)
        connected.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
        connected.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
        return Channel(Connection(connected.detach()))

    def close(self) -> None:
        self._socket.close()
        shutil.rmtree(self._directory, ignore_errors=True)


class Channel:
    """One connected end; `connect` is the worker's way in."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection

    @classmethod
    def connect(cls, address: str) -> Channel:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(address)
        return cls(Connection(sock.detach()))

    def send(self, message: wire.Message) -> None:
        """Send one message (a few kB: the socket buffer takes it without waiting)."""
        try:
            self._connection.send_bytes(wire.encode(message))
        except OSError as exc:  # BrokenPipeError, ConnectionResetError
            raise ChannelClosed(f"the peer closed the channel: {exc}") from exc

    def receive(
        self,
        kinds: tuple[type, ...],
        *,
        timeout_s: float | None = None,
        peer_alive: Callable[[], None] | None = None,
    ) -> Any:
        """The next message, one of `kinds`. `peer_alive` runs between poll slices and
        raises when the peer is gone; `ChannelTimeout` after `timeout_s`,
        `ChannelClosed` when the peer closed its end."""
        _wait(self._connection.poll, timeout_s, peer_alive)
        try:
            data = self._connection.recv_bytes()
        except (EOFError, OSError) as exc:
            raise ChannelClosed("the peer closed the channel") from exc
        return wire.decode_any(data, kinds)

    def close(self) -> None:
        self._connection.close()
