"""The shared backend conformance suite on the paged CPU engine (tiny llama, mistral and
qwen2), with block tables from the suite's own allocator."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tgi_backend_cpu.paged import PagedCpuBackend

from tgi.backend.contract import Backend
from tgi.testing import BackendConformance


class TestPagedCpuBackendConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        # float32 as the reference; a fixed pool so the suite never sizes from free memory
        return lambda model_dir: PagedCpuBackend(
            model_dir, dtype=torch.float32, kv_cache_memory=4 * 2**20
        )
