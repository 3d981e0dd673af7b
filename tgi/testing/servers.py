"""Helpers for tests that start `tgi serve` (or a torchrun job of it) as a subprocess."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

__all__ = ["wait_healthy"]


def wait_healthy(
    url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float = 300.0
) -> None:
    """Poll `url`/health until 200; pytest.fail with the log if the process exits first
    or the time runs out."""
    import httpx
    import pytest

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"the server exited: {log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)  # polling another process's port: nothing to await
    pytest.fail(f"the server never became healthy: {log.read_text()[-2000:]}")
