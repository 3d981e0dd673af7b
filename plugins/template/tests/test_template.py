"""The template plugin: its hooks, its registration with tgi, and the conformance suite."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from tgi_backend_template import plugin
from tgi_backend_template.backend import TemplateBackend

from tgi.backend.contract import Backend, KvLayout
from tgi.backend.manager import BackendManager, PluginStatus
from tgi.config import resolve_config
from tgi.errors import BackendUnavailable
from tgi.testing import BackendConformance
from tgi.testing.tiny_models import build_tiny_model


class TestTemplateConformance(BackendConformance):
    """The suite every backend runs, against tiny llama, mistral and qwen2 models."""

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        return lambda model_dir: TemplateBackend(model_dir, dtype=torch.float32)


@dataclass(frozen=True)
class LocalModel:
    """Stands in for `tgi.models.source.ModelFiles`: the backend reads `.path` only."""

    path: Path
    model_id: str


@dataclass(frozen=True)
class TemplateEntryPoint:
    """The entry point pyproject.toml declares, as importlib.metadata would report it."""

    name: str = "template"
    value: str = "tgi_backend_template.plugin"
    group: str = "tgi.backends"
    dist: None = None

    def load(self) -> object:
        return plugin


def test_probe_says_unavailable_until_an_author_replaces_it() -> None:
    probe = plugin.tgi_backend_probe()

    assert (probe.name, probe.available, probe.priority, probe.batching) == (
        "template",
        False,
        0,
        "continuous",
    )
    assert probe.reason == "template: replace with your hardware check"


def test_validate_config_fills_dtype_with_its_source_and_keeps_a_given_one() -> None:
    config = resolve_config({}, {})

    adjusted = plugin.tgi_validate_config(config)

    assert adjusted is not None
    assert (adjusted.dtype, adjusted.source_of("dtype")) == ("float32", "backend template")
    assert config.dtype is None
    assert plugin.tgi_validate_config(resolve_config({"dtype": "bfloat16"}, {})) is None


def test_create_loads_the_model_and_returns_a_backend(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", "llama", num_layers=1)
    config = resolve_config({"dtype": "float32"}, {})

    backend = plugin.tgi_backend_create(config, LocalModel(model_dir, "tiny"))
    try:
        assert isinstance(backend, Backend)
        assert backend.capabilities.kv_layout is KvLayout.PER_ROW
    finally:
        backend.close()


def test_tgi_registers_the_template_and_reports_it_unavailable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        "importlib.metadata.entry_points",
        lambda *, group: [TemplateEntryPoint()] if group == "tgi.backends" else [],
    )
    manager = BackendManager.from_environ({})

    [record] = manager.records
    assert record.status is PluginStatus.UNAVAILABLE, record.reason
    assert record.reason == "template: replace with your hardware check"
    with pytest.raises(BackendUnavailable, match="template: replace with your hardware check"):
        manager.select_backend(resolve_config({"backend": "template"}, {}))
