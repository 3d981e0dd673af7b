"""The shared backend conformance suite on the paged CPU engine (tiny llama, mistral and
qwen2), with block tables from the suite's own allocator; its `worker` variant runs the
paged engine in an engine worker, built by the plugin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tgi_backend_cpu.paged import PagedCpuBackend
from tgi_backend_cpu.plugin import ENGINE_ENV

from tgi.backend.contract import Backend
from tgi.config import snapshot_environ
from tgi.engine.worker.messages import StartWorker
from tgi.testing import BackendConformance
from tgi.testing.worker import start_worker

KV_CACHE_MEMORY = 4 * 2**20  # a fixed pool, so the suite never sizes from free memory


class TestPagedCpuBackendConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        # float32 as the reference
        return lambda model_dir: PagedCpuBackend(
            model_dir, dtype=torch.float32, kv_cache_memory=KV_CACHE_MEMORY
        )

    @pytest.fixture(scope="class")
    @classmethod
    def worker_start(cls, model_dir: Path) -> StartWorker:
        environ = {**snapshot_environ(), "TGI_BACKENDS": "cpu", ENGINE_ENV: "paged"}
        settings = {"backend": "cpu", "dtype": "float32", "kv_cache_memory": KV_CACHE_MEMORY}
        return start_worker(model_dir, cls.limits, settings, environ)
