"""The Neuron image check (backends/neuron/packaging/resolve_neuron_image.py): tgi-server,
tgi-backend-neuron[neuron] and optimum-neuron[neuronx] must resolve together against
optimum-neuron's own pins (torch 2.8, transformers 4.57), with the AWS-only Neuron SDK
packages as metadata-only stand-ins.

The stand-in and check tests run offline in about 3 s. The resolution itself asks the
package index (about 20 s and 40 MB of index pages and wheel metadata), so it is `once`,
and it skips only when the script reports the index unreachable.
"""

from __future__ import annotations

import importlib.util
import json
import socket
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

SCRIPT = Path(__file__).resolve().parents[1] / "packaging" / "resolve_neuron_image.py"
RESOLVE_TIMEOUT_S = 900  # the script gives pip's resolver 600 s


def load_script() -> ModuleType:
    """Import the script by path: it is a tool, not part of any package."""
    spec = importlib.util.spec_from_file_location("resolve_neuron_image", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script() -> ModuleType:
    return load_script()


def dry_run(script: ModuleType, links: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """pip's resolver on the stand-ins alone: no index, the image's Python."""
    report = links / "report.json"
    pip = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index"]
    return subprocess.run(
        [*pip, "--find-links", str(links), "--report", str(report), "--only-binary=:all:", *args],
        capture_output=True,
        text=True,
        env=script.pip_environment(),
        check=False,
        timeout=120,
    )


def report_metadata(links: Path) -> dict[str, dict[str, Any]]:
    """The report's metadata entries by canonical name."""
    report = json.loads((links / "report.json").read_text())
    return {
        canonicalize_name(item["metadata"]["name"]): item["metadata"] for item in report["install"]
    }


def test_pip_accepts_each_stand_in_with_its_version_and_requirements(
    script: ModuleType, tmp_path: Path
) -> None:
    wheels = script.write_stand_ins(tmp_path)
    pins = [f"{stand_in.name}=={stand_in.version}" for stand_in in script.STAND_INS]

    done = dry_run(script, tmp_path, "--no-deps", "--python-version", "3.11", *pins)

    assert done.returncode == 0, done.stdout + done.stderr
    assert len(wheels) == len(script.STAND_INS)
    found = report_metadata(tmp_path)
    for stand_in in script.STAND_INS:
        metadata = found[canonicalize_name(stand_in.name)]
        assert metadata["version"] == stand_in.version
        assert metadata.get("requires_python") == stand_in.requires_python
        declared = [str(Requirement(text)) for text in stand_in.requires]
        assert [str(Requirement(t)) for t in metadata.get("requires_dist", [])] == declared


def test_stand_ins_resolve_their_requirements_and_keep_their_pythons(
    script: ModuleType, tmp_path: Path
) -> None:
    chain = [
        script.StandIn("neuron-top", "1.2.3.4", requires=("neuron-base>=2,<3",)),
        script.StandIn("neuron-base", "2.9", requires=(), requires_python=">=3.10,<3.12"),
    ]
    script.write_stand_ins(tmp_path, chain)

    resolved = dry_run(script, tmp_path, "--python-version", "3.11", "neuron-top")
    refused = dry_run(script, tmp_path, "--python-version", "3.12", "neuron-top")

    assert resolved.returncode == 0, resolved.stdout + resolved.stderr
    versions = {name: meta["version"] for name, meta in report_metadata(tmp_path).items()}
    assert versions == {"neuron-top": "1.2.3.4", "neuron-base": "2.9"}
    assert refused.returncode != 0
    assert "neuron-base" in refused.stdout + refused.stderr


def entry(name: str, version: str, url: str = "https://index/x.whl") -> dict[str, Any]:
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": url}}


def test_the_check_names_each_version_the_image_cannot_take(script: ModuleType) -> None:
    local = {
        "tgi-server": Path("/w/tgi_server-0.1.0-py3-none-any.whl"),
        "tgi-backend-neuron": Path("/w/tgi_backend_neuron-0.1.0-py3-none-any.whl"),
    }
    good = [
        entry("torch", "2.8.0"),
        entry("transformers", "4.57.6"),
        entry("optimum-neuron", "0.4.5"),
        entry("tgi-server", "0.1.0", local["tgi-server"].as_uri()),
        entry("tgi_backend_neuron", "0.1.0", local["tgi-backend-neuron"].as_uri()),
        entry(
            "torch-neuronx",
            "2.8.0.2.10.16998",
            "file:///s/torch_neuronx-2.8.0.2.10.16998-py3-none-any.whl",
        ),
    ]
    bad = [
        entry("torch", "2.9.0"),
        entry("transformers", "5.0.0"),
        entry("optimum-neuron", "0.4.4"),
        entry("tgi-server", "0.1.0", "https://index/tgi_server-0.1.0-py3-none-any.whl"),
        entry("torch-neuronx", "1.0", "https://index/torch_neuronx-1.0-py3-none-any.whl"),
    ]

    assert script.check({"install": good}, local) == []
    problems = "\n".join(script.check({"install": bad}, local))
    for name in ("torch", "transformers", "optimum-neuron", "tgi-server", "tgi-backend-neuron"):
        assert name in problems
    assert "torch-neuronx came from" in problems
    assert len(script.check({"install": bad}, local)) == 6


def test_an_index_that_refuses_connections_reads_as_unreachable(script: ModuleType) -> None:
    with socket.socket() as sock:  # a port nothing listens on once it is closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]

    output = script.probe_index(f"http://127.0.0.1:{port}/simple/")

    assert output is not None
    assert script.unreachable(output)
    assert not script.unreachable("ERROR: No matching distribution found for optimum-neuron")


@pytest.mark.once  # see pyproject.toml
def test_the_neuron_image_resolves_against_optimum_neurons_pins(tmp_path: Path) -> None:
    kept = tmp_path / "report.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--keep", str(kept)],
        capture_output=True,
        text=True,
        check=False,
        timeout=RESOLVE_TIMEOUT_S,
    )
    output = done.stdout + done.stderr
    if done.returncode == load_script().EXIT_UNREACHABLE:
        pytest.skip(f"the package index is unreachable:\n{output[-2000:]}")

    assert done.returncode == 0, output
    versions: dict[str, str] = {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(kept.read_text())["install"]
    }
    assert versions["torch"].startswith("2.8.0")
    assert versions["transformers"].startswith("4.57.")
    assert versions["optimum-neuron"].startswith("0.4.")
    assert {"tgi-server", "tgi-backend-neuron", "torch-neuronx"} <= versions.keys()
