"""The shared backend conformance suite, run on the CPU backend over tiny llama, mistral
and qwen2 models (the suite's default `architecture` presets)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tgi_backend_cpu.backend import TransformersCpuBackend

from tgi.backend.contract import Backend
from tgi.testing import BackendConformance


class TestCpuBackendConformance(BackendConformance):
    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        # float32 explicitly: the reference runs in float32, and a bf16 CPU would
        # otherwise make the backend pick bf16.
        return lambda model_dir: TransformersCpuBackend(model_dir, dtype=torch.float32)
