"""materialize: the convert-once cache, with the converter replaced by a fast fake.

The real conversion of SmolLM2 is covered in test_smollm2.py; here the converter is a
stub so crash, reuse and replacement paths run in milliseconds.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tgi.config import ServeConfig
from tgi.models import _cache, _gguf_convert
from tgi.models.source import ModelInfo, ModelKind, inspect_model, materialize


class FakeConverter:
    """Writes a recognisable config.json; counts calls; can be told to fail midway."""

    def __init__(self) -> None:
        self.calls: list[tuple[Path, Path]] = []
        self.fail_after_partial = False
        self.before_return: Callable[[], None] | None = None

    def __call__(self, gguf_path: Path, out_dir: Path) -> None:
        self.calls.append((gguf_path, out_dir))
        (out_dir / "config.json").write_text(json.dumps({"call": len(self.calls)}))
        if self.fail_after_partial:
            raise RuntimeError("converter crashed halfway")
        (out_dir / "model.safetensors").write_bytes(b"weights")
        if self.before_return is not None:
            self.before_return()


@pytest.fixture
def converter(monkeypatch: pytest.MonkeyPatch) -> FakeConverter:
    fake = FakeConverter()
    monkeypatch.setattr(_gguf_convert, "convert_gguf", fake)
    return fake


@pytest.fixture
def gguf_config(tmp_path: Path, make_config: Callable, make_gguf: Callable) -> ServeConfig:
    gguf_path = make_gguf(tmp_path / "models" / "tiny-Q8_0.gguf")
    return make_config(model_id=str(gguf_path), cache_dir=str(tmp_path / "tgi-cache"))


def _converted_root(config: ServeConfig) -> Path:
    return config.resolved_cache_dir / "converted"


def test_converts_once_then_reuses(
    gguf_config: ServeConfig, converter: FakeConverter, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tgi.models")
    info = inspect_model(gguf_config)
    assert info.sha is not None
    first = materialize(info, gguf_config)
    assert first.path == _converted_root(gguf_config) / f"tiny-Q8_0-{info.sha[:16]}"
    assert (first.model_id, first.kind, first.sha) == (info.model_id, ModelKind.GGUF, info.sha)
    assert (first.architecture, first.max_position_embeddings) == ("LlamaForCausalLM", 2048)
    assert len(converter.calls) == 1
    assert json.loads((first.path / "config.json").read_text()) == {"call": 1}
    marker = json.loads((first.path / _cache.MARKER_FILE).read_text())
    assert marker["sha256"] == info.sha
    assert "converting" in caplog.text and "reusing" not in caplog.text

    caplog.clear()
    second = materialize(inspect_model(gguf_config), gguf_config)
    assert second == first
    assert len(converter.calls) == 1
    assert "reusing the conversion of tiny-Q8_0.gguf" in caplog.text
    assert "converting" not in caplog.text
    # Only the finished directory is left: no scratch directories beside it.
    assert sorted(p.name for p in _converted_root(gguf_config).iterdir()) == [first.path.name]


def test_reuse_survives_a_new_process_cache(
    gguf_config: ServeConfig, converter: FakeConverter, monkeypatch: pytest.MonkeyPatch
) -> None:
    info = inspect_model(gguf_config)
    first = materialize(info, gguf_config)

    def refuse(gguf_path: Path, out_dir: Path) -> None:
        raise AssertionError("converted again instead of reusing")

    monkeypatch.setattr(_gguf_convert, "convert_gguf", refuse)
    # A ModelInfo without sha, as another caller might build it, still finds the cache.
    bare = ModelInfo(info.model_id, info.kind, info.location, None, None, sha=None)
    assert materialize(bare, gguf_config).path == first.path


def test_crash_midway_leaves_nothing_reusable(
    gguf_config: ServeConfig, converter: FakeConverter
) -> None:
    info = inspect_model(gguf_config)
    converter.fail_after_partial = True
    with pytest.raises(RuntimeError, match="converter crashed halfway"):
        materialize(info, gguf_config)
    assert list(_converted_root(gguf_config).iterdir()) == []

    converter.fail_after_partial = False
    files = materialize(info, gguf_config)
    assert len(converter.calls) == 2
    assert json.loads((files.path / "config.json").read_text()) == {"call": 2}


def test_debris_of_dead_processes_is_removed(
    gguf_config: ServeConfig, converter: FakeConverter
) -> None:
    root = _converted_root(gguf_config)
    dead = root / ".tiny-Q8_0-0123456789abcdef.tmp-2147483647-abc"  # beyond any pid_max
    alive = root / f".tiny-Q8_0-0123456789abcdef.tmp-{os.getppid()}-def"
    unrelated = root / "someone-elses-dir"
    for directory in (dead, alive, unrelated):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")
    files = materialize(inspect_model(gguf_config), gguf_config)
    assert not dead.exists()
    assert alive.exists() and unrelated.exists()
    assert sorted(p.name for p in root.iterdir()) == sorted(
        [files.path.name, alive.name, unrelated.name]
    )


def test_half_written_target_without_marker_is_replaced(
    gguf_config: ServeConfig, converter: FakeConverter
) -> None:
    info = inspect_model(gguf_config)
    assert info.sha is not None
    target = _converted_root(gguf_config) / f"tiny-Q8_0-{info.sha[:16]}"
    target.mkdir(parents=True)
    (target / "config.json").write_text('{"half": true}')
    files = materialize(info, gguf_config)
    assert files.path == target
    assert len(converter.calls) == 1
    assert json.loads((target / "config.json").read_text()) == {"call": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_conversion_by_older_transformers_is_redone(
    gguf_config: ServeConfig, converter: FakeConverter
) -> None:
    info = inspect_model(gguf_config)
    files = materialize(info, gguf_config)
    marker_path = files.path / _cache.MARKER_FILE
    marker = json.loads(marker_path.read_text())
    marker_path.write_text(json.dumps({**marker, "transformers": "0.0.1"}))
    assert materialize(info, gguf_config).path == files.path
    assert len(converter.calls) == 2
    assert json.loads(marker_path.read_text()) == marker


def test_concurrent_finish_keeps_the_first_result(
    gguf_config: ServeConfig, converter: FakeConverter
) -> None:
    info = inspect_model(gguf_config)
    assert info.sha is not None
    target = _converted_root(gguf_config) / f"tiny-Q8_0-{info.sha[:16]}"

    def other_process_finishes_first() -> None:
        target.mkdir()
        (target / "config.json").write_text('{"other": true}')
        _cache._write_marker(target, info.location, info.sha)  # type: ignore[arg-type]

    converter.before_return = other_process_finishes_first
    files = materialize(info, gguf_config)
    assert files.path == target
    assert json.loads((target / "config.json").read_text()) == {"other": True}
    assert sorted(p.name for p in target.parent.iterdir()) == [target.name]


def test_changed_gguf_content_gets_its_own_dir(
    tmp_path: Path, make_config: Callable, make_gguf: Callable, converter: FakeConverter
) -> None:
    gguf_path = make_gguf(tmp_path / "m.gguf", context_length=2048)
    config = make_config(model_id=str(gguf_path), cache_dir=str(tmp_path / "cache"))
    first = materialize(inspect_model(config), config)
    assert first.path.name.startswith("m-")
    make_gguf(gguf_path, context_length=4096)  # same path, new content
    second = materialize(inspect_model(config), config)
    assert second.path != first.path
    assert second.max_position_embeddings == 4096
    assert len(converter.calls) == 2


def test_directories_are_returned_as_they_are(
    tiny_llama_dir: Path, make_config: Callable, converter: FakeConverter
) -> None:
    config = make_config(model_id=str(tiny_llama_dir), cache_dir=str(tiny_llama_dir / "x"))
    assert materialize(inspect_model(config), config).path == tiny_llama_dir
    assert converter.calls == []
    assert not (tiny_llama_dir / "x").exists()
