"""The backend conformance suite on the CUDA backend's test mode: the whole GPU path
(the core's paged runner, the device seam, the attention, decode graphs' padding) on the
CPU, with the SDPA fallback and with the project's Triton kernels under the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from tgi_backend_cuda.backend import CudaBackend

from tgi.backend.contract import Backend
from tgi.config import snapshot_environ
from tgi.engine.worker.messages import StartWorker
from tgi.testing import BackendConformance
from tgi.testing.worker import start_worker

KV_CACHE_MEMORY = 64 * 2**20


class TestCudaSdpaConformance(BackendConformance):
    """SDPA attention (eager: its shapes follow each step's lengths), and the worker
    variant built by the plugin as `tgi serve` builds it with `TGI_CUDA_DEVICE=cpu`."""

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return lambda model_dir: CudaBackend.from_path(
            model_dir,
            device="cpu",
            dtype=torch.float32,
            attention="sdpa",
            cuda_graphs=(),
            kv_cache_memory=KV_CACHE_MEMORY,
        )

    @pytest.fixture(scope="class")
    @classmethod
    def worker_start(cls, model_dir: Path) -> StartWorker:
        environ = {
            **snapshot_environ(),
            "TGI_BACKENDS": "cuda",
            "TGI_CUDA_DEVICE": "cpu",
            "TGI_ATTENTION": "sdpa",
        }
        settings: dict[str, Any] = {
            "backend": "cuda",
            "dtype": "float32",
            "kv_cache_memory": KV_CACHE_MEMORY,
        }
        return start_worker(model_dir, cls.limits, settings, environ)


@pytest.mark.slow
class TestCudaTritonConformance(BackendConformance):
    """The Triton kernels (interpreted) with decode graphs' padded stand-in; one preset,
    and slow (about 1.5 minutes: the interpreter runs each kernel program in Python). The
    default run checks the same path's greedy tokens in `test_gpu_path.py`."""

    @pytest.fixture(scope="class", params=["llama"])
    @classmethod
    def architecture(cls, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture(autouse=True)
    def _triton(self) -> None:
        pytest.importorskip("triton")

    def runs_wire(self, architecture: str) -> bool:
        """The encoding does not depend on the attention: `TestCudaSdpaConformance`
        crosses the wire; under the interpreter a second pass would cost minutes."""
        return False

    def test_capacity_reported_by_warmup_can_be_filled_and_reused(self) -> None:  # type: ignore[override]
        pytest.skip(
            "KV accounting is the runner's, the same whatever the attention: the SDPA class "
            "fills and reuses the capacity; interpreted kernels would take a minute here"
        )

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return lambda model_dir: CudaBackend.from_path(
            model_dir,
            device="cpu",
            dtype=torch.float32,
            attention="triton",
            cuda_graphs=(1, 2, 4),
            kv_cache_memory=KV_CACHE_MEMORY,
        )
