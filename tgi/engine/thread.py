"""The one thread that runs every backend call, from loading the weights to the last step.

NOTE: CPU math libraries keep a pool of worker threads per calling thread (OpenMP
teams). If the weights load and warm up on the main thread and the steps then run on
another, two pools stay hot on the same cores and a small decode step gets up to
twice as slow (measured on SmolLM2, 2 cores: 12-18 ms per step on one thread, ~30 ms
split across two). So start-up hands its backend work to this same thread.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

__all__ = ["EngineThread"]

T = TypeVar("T")


class EngineThread:
    """A single worker thread: `call` blocks (start-up), `run` awaits (the router)."""

    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tgi-engine")

    def call(self, fn: Callable[..., T], *args: object) -> T:
        """Run `fn` on the engine thread and wait for it; for code outside an event loop."""
        return self._executor.submit(fn, *args).result()

    async def run(self, fn: Callable[..., T], *args: object) -> T:
        return await self.submit(fn, *args)

    def submit(self, fn: Callable[..., T], *args: object) -> asyncio.Future[T]:
        """Queue `fn` now (calls run in the order they were queued) and return its future;
        from inside the event loop. `run` queues only once awaited."""
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)
