"""`tgi serve`'s start and stop helpers (tgi/server/lifecycle.py); the real SIGTERM
drain runs in tests/e2e/test_cli.py."""

from __future__ import annotations

import socket

import pytest

from tgi.errors import ConfigError
from tgi.server.lifecycle import check_port


def test_a_port_in_use_is_refused_before_anything_loads() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--port {port} on 127.0.0.1 is in use"):
            check_port("127.0.0.1", port)
    check_port("127.0.0.1", port)  # free again
