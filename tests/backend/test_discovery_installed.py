"""Real discovery through importlib.metadata, with distributions installed into tmp_path.

Nothing is monkeypatched but `sys.path`: a `*.dist-info` folder with an
`entry_points.txt` is what pip leaves behind, so these tests run the same code path as a
user who `pip install`s a plugin whose hardware SDK is missing.
"""

from __future__ import annotations

import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tgi.backend.manager import BackendManager, PluginStatus, discover
from tgi.config import resolve_config

GOOD_PLUGIN = """
from tgi.backend.hookspecs import BackendProbe, hookimpl

TGI_CONTRACT_VERSION = 2


@hookimpl
def tgi_backend_probe():
    return BackendProbe(name="good", version="0.2", available=True, reason="always here",
                        priority=-1000, batching="continuous")


@hookimpl
def tgi_validate_config(config):
    return None


@hookimpl
def tgi_backend_create(config, model):
    raise NotImplementedError("discovery test only")
"""


def install_distribution(
    site: Path, dist: str, version: str, entry_points: str, module: str, source: str
) -> None:
    """Write `module.py` and the dist-info pip would, declaring `entry_points`."""
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    (site / f"{module}.py").write_text(source)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A site-packages-like folder on sys.path holding a broken and a good plugin."""
    install_distribution(
        tmp_path,
        "broken_plugin",
        "0.1",
        "[tgi.backends]\nbroken = broken_plugin\n",
        "broken_plugin",
        "raise RuntimeError('vendor SDK not found: install libfoo')\n",
    )
    install_distribution(
        tmp_path,
        "good_plugin",
        "0.2",
        "[tgi.backends]\ngood = good_plugin\n",
        "good_plugin",
        GOOD_PLUGIN,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.modules.pop("good_plugin", None)


def test_installed_broken_plugin_is_listed_and_a_good_one_is_selectable(site: Path) -> None:
    environ = {"TGI_BACKENDS": "broken,good"}  # whatever else the venv holds stays out
    manager = BackendManager.from_environ(environ)
    records = {record.name: record for record in manager.records}

    broken = records["broken"]
    assert broken.status is PluginStatus.BROKEN
    assert broken.reason == "import failed: RuntimeError: vendor SDK not found: install libfoo"
    assert (broken.distribution, broken.distribution_version) == ("broken_plugin", "0.1")
    assert broken.value == "broken_plugin"
    assert "broken_plugin" not in sys.modules
    assert records["good"].status is PluginStatus.AVAILABLE
    assert records["good"].version == "0.2"
    assert manager.select_backend(resolve_config({}, environ)).name == "good"


def test_installed_broken_plugin_does_not_hide_the_cpu_backend(site: Path) -> None:
    environ = {"TGI_BACKENDS": "broken,cpu"}
    records = {record.name: record for record in discover(environ)}

    assert records["broken"].status is PluginStatus.BROKEN
    assert records["broken"].reason.startswith("import failed: RuntimeError: vendor SDK")
    cpu = records["cpu"]
    assert cpu.distribution == "tgi-backend-cpu"
    assert cpu.status is PluginStatus.AVAILABLE, cpu.reason
    assert records["good"].status is PluginStatus.DISABLED
    manager = BackendManager.from_environ(environ)
    assert manager.select_backend(resolve_config({}, environ)).name == "cpu"
    assert manager.select_backend(resolve_config({"backend": "cpu"}, environ)).name == "cpu"
