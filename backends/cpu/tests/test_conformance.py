"""The shared backend conformance suite, run on the CPU backend over tiny llama, mistral
and qwen2 models (the suite's default `architecture` presets); its `worker` variant runs
the same generic engine in an engine worker, built by the plugin."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tgi_backend_cpu.backend import TransformersCpuBackend
from tgi_backend_cpu.plugin import ENGINE_ENV

from tgi.backend.contract import Backend
from tgi.config import snapshot_environ
from tgi.engine.worker.messages import StartWorker
from tgi.testing import BackendConformance
from tgi.testing.worker import start_worker


class TestCpuBackendConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        # float32 explicitly: the reference runs in float32, and a bf16 CPU would
        # otherwise make the backend pick bf16.
        return lambda model_dir: TransformersCpuBackend(model_dir, dtype=torch.float32)

    @pytest.fixture(scope="class")
    @classmethod
    def worker_start(cls, model_dir: Path) -> StartWorker:
        # The plugin picks the paged engine for Llama-family models unless told otherwise.
        environ = {**snapshot_environ(), "TGI_BACKENDS": "cpu", ENGINE_ENV: "generic"}
        return start_worker(model_dir, cls.limits, {"backend": "cpu", "dtype": "float32"}, environ)
