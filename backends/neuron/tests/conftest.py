"""Tiny models for the neuron backend's tests, plain or "exported" (a neuron section or a
neuron_config.json next to the weights, as optimum-neuron writes them)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tgi.testing.tiny_models import build_tiny_model

ExportedFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A plain tiny llama checkpoint (config.json, safetensors, tokenizer)."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


def write_neuron_section(model_dir: Path, **neuron: Any) -> Path:
    """Record compiled shapes the way transformers-neuronx exports did: config.json["neuron"]."""
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text())
    config["neuron"] = neuron
    config_path.write_text(json.dumps(config))
    return model_dir


def write_neuron_config(model_dir: Path, **neuron: Any) -> Path:
    """Record compiled shapes the way optimum-neuron's NxD exports do: neuron_config.json."""
    (model_dir / "neuron_config.json").write_text(json.dumps(neuron))
    return model_dir


@pytest.fixture
def exported(tiny_model: Path, tmp_path: Path) -> ExportedFactory:
    """Copy the tiny model to a fresh directory and give it a neuron section."""

    def factory(name: str = "model", **neuron: Any) -> Path:
        target = tmp_path / name
        shutil.copytree(tiny_model, target)
        defaults: dict[str, Any] = {"batch_size": 4, "sequence_length": 128, "num_cores": 2}
        return write_neuron_section(target, **{**defaults, **neuron})

    return factory
