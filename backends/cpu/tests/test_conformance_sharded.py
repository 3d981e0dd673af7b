"""The conformance suite's `worker` variant through the sharded executor: the paged CPU
engine split over two ranks (two worker processes, gloo), built by the plugin from the
`StartWorker` that `tgi serve --num-shard 2` sends. Only that variant runs here: the
direct and wire variants of one shard run in test_conformance_paged.py."""

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

pytestmark = pytest.mark.once  # see pyproject.toml

KV_CACHE_MEMORY = 4 * 2**20
NUM_SHARD = 2


class TestShardedPagedCpuConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        # one shard: the worker must declare the same capabilities
        return lambda model_dir: PagedCpuBackend(
            model_dir, dtype=torch.float32, kv_cache_memory=KV_CACHE_MEMORY
        )

    @pytest.fixture(scope="class")
    @classmethod
    def worker_start(cls, model_dir: Path) -> StartWorker:
        environ = {**snapshot_environ(), "TGI_BACKENDS": "cpu", ENGINE_ENV: "paged"}
        settings = {
            "backend": "cpu",
            "dtype": "float32",
            "kv_cache_memory": KV_CACHE_MEMORY,
            "num_shard": NUM_SHARD,
            "cpu_threads": 1,
        }
        start = start_worker(model_dir, cls.limits, settings, environ)
        assert start.world_size == NUM_SHARD
        return start

    @pytest.fixture(params=["worker"])
    def variant(self, request: pytest.FixtureRequest, architecture: str) -> str:
        if not self.runs_worker(architecture):
            pytest.skip("the sharded worker runs on the first tiny preset only")
        return str(request.param)
