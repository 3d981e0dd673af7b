"""Package metadata declares ranges; exact versions live in constraints.txt.

`tgi-server` and its backends must install into a vendor's image (CUDA, ROCm, Neuron,
Gaudi) without replacing the torch it ships. The first tests read every pyproject; the
last one builds the wheels of the core and of the CPU, CUDA and ROCm backends and installs
them, with dependency resolution but offline (every other dependency, nvidia-ml-py
included, is a stub wheel), into a venv that already holds another supported torch:
about 25 s, so it runs with the fast suite.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

import tgi

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

ROOT = Path(__file__).resolve().parents[1]
PYPROJECTS = {
    "tgi-server": ROOT / "pyproject.toml",
    "tgi-backend-cpu": ROOT / "backends" / "cpu" / "pyproject.toml",
    "tgi-backend-cuda": ROOT / "backends" / "cuda" / "pyproject.toml",
    "tgi-backend-rocm": ROOT / "backends" / "rocm" / "pyproject.toml",
    "tgi-backend-neuron": ROOT / "backends" / "neuron" / "pyproject.toml",
    "tgi-backend-template": ROOT / "plugins" / "template" / "pyproject.toml",
}
# What optimum-neuron 0.4.5 (the newest 0.4.x) pins in its METADATA: torch==2.8.0.* (extra
# neuronx), transformers~=4.57.1, Requires-Python >=3.10,<3.12. The Neuron image ships
# those; tgi-server and tgi-backend-neuron must accept them as they are.
OPTIMUM_NEURON_PINS = {"torch": ("2.8.0", "2.8.1"), "transformers": ("4.57.1", "4.57.6")}
OPTIMUM_NEURON_PYTHONS = ("3.10", "3.11")
# Another supported torch, as a vendor's image might hold: the wheel test's stand-in.
VENDOR_TORCH = "2.8.0"
# The backends whose wheels the install test builds: distribution -> (source, package)
WHEEL_BACKENDS = {
    "tgi-backend-cpu": (ROOT / "backends" / "cpu", "tgi_backend_cpu"),
    "tgi-backend-cuda": (ROOT / "backends" / "cuda", "tgi_backend_cuda"),
    "tgi-backend-rocm": (ROOT / "backends" / "rocm", "tgi_backend_rocm"),
}
BACKENDS = sorted(name for name in PYPROJECTS if name.startswith("tgi-backend-"))


def project(name: str) -> dict:
    with PYPROJECTS[name].open("rb") as file:
        return tomllib.load(file)["project"]


def requirements(name: str, *, extras: bool = True) -> list[Requirement]:
    meta = project(name)
    texts = list(meta.get("dependencies", []))
    if extras:
        texts += [t for group in meta.get("optional-dependencies", {}).values() for t in group]
    return [Requirement(text) for text in texts]


def exact(requirement: Requirement) -> bool:
    return any(spec.operator in ("==", "===") for spec in requirement.specifier)


def constraints() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        text = line.split("#", 1)[0].strip()
        if text:
            requirement = Requirement(text)
            [spec] = requirement.specifier
            assert spec.operator == "==", text
            pins[canonicalize_name(requirement.name)] = Version(spec.version)
    return pins


def test_the_core_is_distributed_as_tgi_server() -> None:
    assert project("tgi-server")["name"] == "tgi-server"
    extras = project("tgi-server")["optional-dependencies"]
    assert "tgi-server[bench]" in extras["test"]
    for name in PYPROJECTS:
        assert project(name)["name"] == name
        assert "tgi" not in {canonicalize_name(r.name) for r in requirements(name)}


@pytest.mark.parametrize("name", sorted(PYPROJECTS))
def test_no_exact_pin_on_torch_or_transformers_or_any_runtime_dependency(name: str) -> None:
    pinned = [str(r) for r in requirements(name) if r.name in ("torch", "transformers")]
    pinned = [text for text in pinned if exact(Requirement(text))]
    runtime = [str(r) for r in requirements(name, extras=False) if exact(r)]

    assert pinned == []
    assert runtime == []


@pytest.mark.parametrize("name", BACKENDS)
def test_backends_require_a_tgi_server_range_holding_this_version(name: str) -> None:
    [core] = [r for r in requirements(name) if r.name == "tgi-server"]

    assert tgi.__version__ in core.specifier
    assert any(spec.operator == "<" for spec in core.specifier), f"{core}: give an upper bound"


def test_the_rocm_backend_requires_a_cuda_backend_range_holding_its_version() -> None:
    [cuda] = [r for r in requirements("tgi-backend-rocm") if r.name == "tgi-backend-cuda"]

    assert project("tgi-backend-cuda")["version"] in cuda.specifier
    assert any(spec.operator == "<" for spec in cuda.specifier), f"{cuda}: give an upper bound"


@pytest.mark.parametrize("name", ["tgi-server", "tgi-backend-neuron"])
def test_the_neuron_install_accepts_what_optimum_neuron_pins(name: str) -> None:
    by_name = {r.name: r.specifier for r in requirements(name, extras=False)}
    python = SpecifierSet(project(name)["requires-python"])

    for package, versions in OPTIMUM_NEURON_PINS.items():
        for version in versions:
            assert version in by_name[package], f"{name}: {package}{by_name[package]}"
    for version in OPTIMUM_NEURON_PYTHONS:
        assert version in python


def test_constraints_pin_exactly_what_every_range_accepts() -> None:
    pins = constraints()

    assert pins["torch"] == Version("2.13.0")
    for name in PYPROJECTS:
        for requirement in requirements(name):
            pin = pins.get(canonicalize_name(requirement.name))
            if pin is not None:
                assert requirement.specifier.contains(pin, prereleases=True), (
                    f"{name}: {requirement} refuses constraints.txt's {pin}"
                )


# ---------------------------------------------------------------- installing from wheels


def write_wheel(directory: Path, name: str, version: str, files: dict[str, str]) -> Path:
    """A minimal pure-Python wheel holding `files`, with no dependencies."""
    stem = f"{canonicalize_name(name).replace('-', '_')}-{version}"
    info = f"{stem}.dist-info"
    contents = {
        **files,
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tgi-tests\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*contents, f"{info}/RECORD"])
    path = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in {**contents, f"{info}/RECORD": record}.items():
            wheel.writestr(member, text)
    return path


def wheel_requirements(wheel: Path) -> list[Requirement]:
    """The unconditional Requires-Dist lines of a built wheel."""
    with zipfile.ZipFile(wheel) as archive:
        [metadata] = [n for n in archive.namelist() if n.endswith(".dist-info/METADATA")]
        text = archive.read(metadata).decode()
    found = [
        Requirement(line.split(":", 1)[1])
        for line in text.splitlines()
        if line.startswith("Requires-Dist:")
    ]
    return [r for r in found if r.marker is None or r.marker.evaluate({"extra": ""})]


def version_inside(specifier: SpecifierSet) -> str:
    """Some version the specifier accepts: one it names, else a plain one."""
    named = [spec.version.removesuffix(".*") for spec in specifier]
    for candidate in [*named, "1.0", "99.0"]:
        if candidate in specifier:
            return candidate
    raise AssertionError(f"no stub version found for {specifier}")


def build_wheel(source: Path, keep: tuple[str, ...], scratch: Path, wheels: Path) -> Path:
    """`pip wheel --no-deps` on a copy of `source` (a build writes into its tree)."""
    copy = scratch / source.name
    copy.mkdir(parents=True)
    for name in keep:
        if (source / name).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source / name, copy / name, ignore=ignore)
        else:
            shutil.copy2(source / name, copy / name)
    before = set(wheels.glob("*.whl"))
    pip(sys.executable, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(copy))
    [built] = set(wheels.glob("*.whl")) - before
    return built


def pip(python: str, *args: str) -> str:
    """Run pip with no user or site configuration (no extra index, no find-links)."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
    environ.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    done = subprocess.run(
        [python, "-m", "pip", *args], capture_output=True, text=True, env=environ, check=False
    )
    assert done.returncode == 0, f"pip {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def test_wheels_install_beside_a_vendors_torch_and_keep_it(tmp_path: Path) -> None:
    wheels, index = tmp_path / "wheels", tmp_path / "index"
    wheels.mkdir()
    index.mkdir()
    built = [build_wheel(ROOT, ("pyproject.toml", "README.md", "tgi"), tmp_path / "src", wheels)]
    for source, package in WHEEL_BACKENDS.values():
        built.append(build_wheel(source, ("pyproject.toml", package), tmp_path / "src", wheels))
    ours = {"torch", "tgi-server", *WHEEL_BACKENDS}  # built above, or the vendor's torch
    # The index offers the vendor's torch and a newer one: an exact pin on the newer
    # one (or any range that refuses the vendor's) would make pip replace it.
    marker = "VENDOR_BUILD = True\n"
    write_wheel(index, "torch", VENDOR_TORCH, {"torch/__init__.py": marker})
    write_wheel(index, "torch", "2.13.0", {"torch/__init__.py": "VENDOR_BUILD = False\n"})
    # Stubs for the rest (transformers, nvidia-ml-py, ...): pip resolves them, offline.
    for requirement in {r.name: r for w in built for r in wheel_requirements(w)}.values():
        if canonicalize_name(requirement.name) not in ours:
            module = canonicalize_name(requirement.name).replace("-", "_")
            version = version_inside(requirement.specifier)
            write_wheel(index, requirement.name, version, {f"{module}_stub/__init__.py": ""})
    environment = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(environment)
    python = str(environment / "bin" / "python")
    links = ("--no-index", "--find-links", str(index), "--find-links", str(wheels))
    pip(python, "install", *links, f"torch=={VENDOR_TORCH}")

    pip(python, "install", *links, "tgi-server", *WHEEL_BACKENDS)

    site = next(environment.glob("lib/python*/site-packages"))
    installed = {
        canonicalize_name(dist.metadata["Name"]): dist
        for dist in importlib.metadata.distributions(path=[str(site)])
    }
    torch_version = Version(installed["torch"].version)
    assert torch_version == Version(VENDOR_TORCH)
    assert (site / "torch" / "__init__.py").read_text() == marker  # the vendor's files
    for name in ("tgi-server", *WHEEL_BACKENDS):
        torch_requirements = [
            Requirement(text)
            for text in installed[name].requires or ()
            if Requirement(text).name == "torch"
        ]
        assert torch_requirements, f"{name} declares no torch requirement"
        for requirement in torch_requirements:
            assert torch_version in requirement.specifier, f"{name}: {requirement}"
