"""Fixtures for the model-source tests: configs, tiny models, fake hub caches, GGUFs."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tgi.config import ServeConfig, resolve_config
from tgi.errors import ModelNotFound
from tgi.models.source import ModelFiles, embedded_model_path
from tgi.testing.fixtures import smollm2_files
from tgi.testing.tiny_models import build_tiny_model

# Kept between runs (inside the repo, git-ignored by the file written below) so the
# ~30 s conversion of SmolLM2 happens once per checkout, not once per session.
SMOLLM2_CACHE_DIR = Path(__file__).resolve().parents[2] / ".cache" / "tgi-test"

MakeConfig = Callable[..., ServeConfig]


@pytest.fixture
def make_config(tmp_path: Path) -> MakeConfig:
    """Build a ServeConfig whose environment points HOME into this test's tmp dir.

    So neither the hub cache nor tgi's cache default to the real user's home.
    """

    def make(environ: dict[str, str] | None = None, **cli: Any) -> ServeConfig:
        env = {"HOME": str(tmp_path / "home")}
        env.update(environ or {})
        return resolve_config(cli, environ=env)

    return make


@pytest.fixture(scope="session")
def tiny_llama_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llama checkpoint, built once; tests copy it before changing anything."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture
def tiny_llama_dir(tiny_llama_source: Path, tmp_path: Path) -> Path:
    """This test's own copy of the tiny llama checkpoint."""
    return Path(shutil.copytree(tiny_llama_source, tmp_path / "tiny-llama"))


def write_fake_hub_snapshot(
    cache: Path, repo_id: str, model_dir: Path | None, sha: str, ref: str | None = "main"
) -> Path:
    """Lay out `model_dir`'s files as huggingface_hub caches them; return the snapshot dir.

    models--org--name/blobs/<file> + snapshots/<sha>/<file> (symlink) + refs/<ref>.
    """
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / sha
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for source in sorted(model_dir.iterdir()) if model_dir else []:
        blob = repo / "blobs" / f"{sha[:8]}-{source.name}"
        shutil.copyfile(source, blob)
        (snapshot / source.name).symlink_to(blob)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    return snapshot


def write_tiny_gguf(
    path: Path,
    arch: str = "llama",
    *,
    name: str = "tiny test",
    context_length: int | None = 2048,
    endian: gguf.GGUFEndian = gguf.GGUFEndian.LITTLE,
) -> Path:
    """A small GGUF with real metadata (token arrays included) and one tensor."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch, endianess=endian)
    writer.add_name(name)
    if context_length is not None:
        writer.add_context_length(context_length)
    writer.add_block_count(2)
    writer.add_token_list(["<s>", "a", "bb", "ccc"])
    writer.add_token_merges(["a b", "bb c"])
    writer.add_array("test.nested", [[1, 2], [3]])
    writer.add_bool("test.flag", True)
    writer.add_float32("test.scale", 0.5)
    writer.add_chat_template("{{ messages }}")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def smollm2_gguf() -> Path:
    """The embedded SmolLM2 GGUF, or a skip saying which package is missing."""
    try:
        return embedded_model_path()
    except ModelNotFound as exc:
        pytest.skip(f"the embedded model is not installed: {exc}")


@pytest.fixture(scope="session")
def smollm2_model_files() -> ModelFiles:
    """SmolLM2 converted to a transformers directory, cached across runs in .cache/."""
    try:
        embedded_model_path()
    except ModelNotFound as exc:
        pytest.skip(f"the embedded model is not installed: {exc}")
    SMOLLM2_CACHE_DIR.mkdir(parents=True, exist_ok=True)
    ignore = SMOLLM2_CACHE_DIR / ".gitignore"
    if not ignore.exists():
        # As pytest does for .pytest_cache: keep 540 MB of weights out of `git status`.
        ignore.write_text("# written by tests/models/conftest.py\n*\n", encoding="utf-8")
    return smollm2_files(SMOLLM2_CACHE_DIR)


@pytest.fixture
def make_hub_snapshot() -> Callable[..., Path]:
    """`write_fake_hub_snapshot`, as a fixture (test modules cannot import conftest)."""
    return write_fake_hub_snapshot


@pytest.fixture
def make_gguf() -> Callable[..., Path]:
    """`write_tiny_gguf`, as a fixture (test modules cannot import conftest)."""
    return write_tiny_gguf
