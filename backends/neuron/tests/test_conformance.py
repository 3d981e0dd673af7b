"""The shared backend conformance suite on the emulated Neuron backend, in both modes:
rebuild (compiled without continuous batching: when new sequences arrive the backend
re-prefills every live slot itself) and insert (continuous batching: only new rows are
written); and insert mode with on-device sampling (token ids instead of logits)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from tgi_backend_neuron._emulator import EmulatedNeuronModel
from tgi_backend_neuron.backend import NeuronBackend

from tgi.backend.contract import Backend, Limits
from tgi.testing import BackendConformance

SLOTS = 4
LENGTH = 80  # the suite's max_total_tokens: one slot holds a full-length sequence
# The suite's limits, sized to the compiled shape as `tgi_validate_config` would size them.
STATIC_LIMITS = Limits(
    max_input_tokens=40,
    max_total_tokens=LENGTH,
    max_batch_prefill_tokens=160,
    max_batch_total_tokens=SLOTS * LENGTH,
    max_batch_size=SLOTS,
)


def emulated(
    continuous_batching: bool, on_device_sampling: bool = False
) -> Callable[[Path], Backend]:
    def build(model_dir: Path) -> Backend:
        executor = EmulatedNeuronModel(
            model_dir,
            batch_size=SLOTS,
            sequence_length=LENGTH,
            continuous_batching=continuous_batching,
            dtype=torch.float32,
            on_device_sampling=on_device_sampling,
        )
        return NeuronBackend(executor, device_type="neuron (emulated)")

    return build


class TestEmulatedNeuronRebuildConformance(BackendConformance):
    limits = STATIC_LIMITS

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return emulated(continuous_batching=False)


class TestEmulatedNeuronInsertConformance(BackendConformance):
    limits = STATIC_LIMITS

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return emulated(continuous_batching=True)


class TestEmulatedNeuronDeviceSamplingConformance(BackendConformance):
    """Exported with on-device sampling (optimum-neuron's default for Llama): the
    backend returns the device's token ids, greedy ones the argmax."""

    limits = STATIC_LIMITS

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return emulated(continuous_batching=True, on_device_sampling=True)
