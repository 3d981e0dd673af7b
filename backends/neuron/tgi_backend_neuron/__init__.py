"""tgi's Neuron backend: static slots on AWS Inferentia2 / Trainium, or a CPU emulator.

The entry point is `tgi_backend_neuron.plugin`. `NeuronBackend` (the contract over a
static-shape executor) and `EmulatedNeuronModel` load lazily, so probing never imports
torch models or the Neuron SDK.
"""

from __future__ import annotations

from typing import Any

__all__ = ["EmulatedNeuronModel", "NeuronBackend"]


def __getattr__(name: str) -> Any:
    if name == "NeuronBackend":
        from tgi_backend_neuron.backend import NeuronBackend

        return NeuronBackend
    if name == "EmulatedNeuronModel":
        from tgi_backend_neuron._emulator import EmulatedNeuronModel

        return EmulatedNeuronModel
    raise AttributeError(f"module 'tgi_backend_neuron' has no attribute {name!r}")
