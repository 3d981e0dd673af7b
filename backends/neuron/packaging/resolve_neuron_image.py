#!/usr/bin/env python3
"""Resolve tgi-server, tgi-backend-neuron[neuron] and optimum-neuron[neuronx] together, as a
Neuron image (Ubuntu 22.04, x86_64, CPython 3.11) would install them, without installing
anything.

Why: optimum-neuron pins the torch, transformers and Neuron SDK releases it was built for;
our metadata declares ranges, and this proves those ranges hold its pins. It runs pip's
resolver (`pip install --dry-run --report`) on wheels built from this checkout, on
optimum-neuron and everything else from the package index, and on metadata-only stand-ins
for the Neuron SDK packages that exist only on AWS's own index (`STAND_INS`). Only wheel
metadata is fetched: PEP 658 metadata files where the index advertises them, else HTTP
range reads of each wheel (pip's fast-deps), never torch's wheels themselves (about 20 s
and 40 MB, against 4.6 GB for whole wheels behind an index without PEP 658). The user's pip
configuration (constraints, find-links, extra indexes) is ignored, and so is the
repository's constraints.txt: the point is what our ranges do against optimum-neuron's
pins, not against our own local pins.

Exit status: 0 resolved as expected; 1 resolution failed or resolved to unexpected
versions; 2 bad usage or a wheel that would not build; 3 the package index is unreachable
(the one case a test may skip on).

    python backends/neuron/packaging/resolve_neuron_image.py [--keep report.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[3]
NEURON = ROOT / "backends" / "neuron"
# What a build of each of our distributions needs from its source tree
SOURCES: dict[str, tuple[Path, tuple[str, ...]]] = {
    "tgi-server": (ROOT, ("pyproject.toml", "README.md", "tgi")),
    "tgi-backend-neuron": (NEURON, ("pyproject.toml", "tgi_backend_neuron")),
}
OPTIMUM_NEURON = "optimum-neuron[neuronx]"
PYTHON_VERSION = "3.11"  # optimum-neuron 0.4.x: Requires-Python >=3.10,<3.12
# The Neuron images are Ubuntu 22.04 (glibc 2.35) on x86_64: every manylinux tag it runs.
PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(35, 16, -1)),
    "manylinux2014_x86_64",  # pip adds manylinux2010 and manylinux1
    "linux_x86_64",
)
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE = 0, 1, 2, 3
# --dry-run and --report (22.2), and PEP 658 metadata files used for every wheel (23.1),
# so that torch's wheel is never downloaded
MINIMUM_PIP = (23, 1)
# pip's words for an index it could not connect to (urllib3's exception names, as pip
# prints them when it retries), as opposed to an index that answered.
UNREACHABLE_MARKERS = (
    "NewConnectionError",
    "NameResolutionError",
    "ConnectTimeoutError",
    "ReadTimeoutError",
    "ProxyError",
    "Network is unreachable",
    "Temporary failure in name resolution",
)
# pip variables that say how to reach the index, or where to cache; every other PIP_*
# (constraints, find-links, extra indexes, ...) would change what is resolved: dropped.
PIP_TRANSPORT = (
    "PIP_CERT",
    "PIP_CLIENT_CERT",
    "PIP_INDEX_URL",
    "PIP_PROXY",
    "PIP_TRUSTED_HOST",
    "PIP_DEFAULT_TIMEOUT",
    "PIP_RETRIES",
    "PIP_CACHE_DIR",
    "PIP_NO_CACHE_DIR",
)
OUTPUT_TAIL = 40  # lines of pip's output shown when it fails
# Printed after a successful run: the packages the Neuron install hinges on
KEY_PACKAGES = (
    "tgi-server",
    "tgi-backend-neuron",
    "optimum-neuron",
    "optimum",
    "transformers",
    "tokenizers",
    "huggingface-hub",
    "torch",
    "torchvision",
    "torch-xla",
    "torch-neuronx",
    "neuronx-cc",
    "libneuronxla",
    "neuronx-distributed",
    "aws-neuronx-runtime-discovery",
    "numpy",
    "protobuf",
    "safetensors",
    "accelerate",
)


@dataclass(frozen=True)
class StandIn:
    """A Neuron SDK package that only AWS's index serves, as a metadata-only wheel."""

    name: str
    version: str
    requires: tuple[str, ...]
    requires_python: str | None = None


# The Neuron SDK 2.26.1 packages optimum-neuron 0.4.5 pins (its `neuronx` extra), at the
# versions it pins; AWS's release manifest (aws-neuron/aws-neuron-sdk,
# src/helperscripts/n2-manifest.json, release "2.26.1") lists the same versions and, as
# supported_python_versions, the Pythons each is built for (the real wheels say so through
# their tags; a stand-in is py3-none-any, so it says so through Requires-Python). The wheels'
# own METADATA is not public; each requirement says where it comes from.
STAND_INS = (
    StandIn(
        "torch-neuronx",
        "2.8.0.2.10.16998",
        requires=(
            # torch==X.Y.*: the form torch-neuronx's requirement takes in a pipdeptree of
            # torch-neuronx 2.9.0.2.11 (huggingface/optimum-neuron issue 1013, "torch
            # [required: ==2.9.*]") and in pip's log for torch-neuronx 2.1.2.2.1.0
            # (aws-neuron/aws-neuron-sdk issue 875, "torch==2.1.*").
            "torch==2.8.*",
            # Unverified spelling: torch-neuronx 2.1 pinned torch-xla==2.1.2 (issue 875);
            # Neuron 2.26.0's PyTorch release notes (release-notes/prev/2.26.0/nx-pytorch.rst)
            # tell users of torch-neuronx 2.8 to move from PyPI's torch-xla 2.8.0 to 2.8.1,
            # so the requirement accepts both.
            "torch-xla==2.8.*",
            # optimum-neuron issue 1013's pipdeptree for the 2.9 build ("libneuronxla
            # [required: >=2.2,<2.3]"); the 2.8 build ships with libneuronxla 2.2 as well.
            "libneuronxla>=2.2,<2.3",
            # The release notes' "Supported Protobuf Versions" table (release-notes/prev/
            # content.rst, Neuron 2.26.1): torch-neuronx >= 3.20.
            "protobuf>=3.20",
        ),
        requires_python=">=3.10,<3.12",
    ),
    StandIn(
        "libneuronxla",
        "2.2.12677.0",
        requires=(
            # optimum-neuron issue 1013's pipdeptree for libneuronxla 2.2.13706.0 (a later
            # 2.2 build): "neuronx-cc [required: ~=2.0]".
            "neuronx-cc~=2.0",
            # Unverified for 2.2: what a Nix package of libneuronxla 2.0.498 propagates
            # (aws-neuronx-runtime-discovery, boto3); no public source lists 2.2's.
            "aws-neuronx-runtime-discovery",
            "boto3",
        ),
        requires_python=">=3.9,<3.12",
    ),
    StandIn(
        "neuronx-cc",
        "2.21.33363.0",
        requires=(
            # optimum-neuron issue 1013's pipdeptree ("protobuf [required: >=3]" under
            # neuronx-cc) and the release notes' protobuf table (neuronx-cc: > 3).
            "protobuf>=3",
            # Unverified and left out: the compiler's other dependencies (numpy, scipy,
            # networkx, islpy, boto3, ec2-metadata, python-daemon, ... appear in pip
            # freezes of Neuron environments, e.g. aws-neuron/nki-samples issue 24) and
            # their ranges. optimum-neuron's own numpy pin (<=1.26.4) applies anyway.
        ),
        requires_python=">=3.9,<3.12",
    ),
    StandIn(
        "neuronx-distributed",
        "0.15.22404",
        # install_requires of aws-neuron/neuronx-distributed's setup.py at tag v2.26.0
        # (version 0.15.0, built as 0.15.22404); read from the source, not the wheel.
        requires=("torch-neuronx", "torch-xla", "safetensors", "tenacity", "setuptools>=70.1"),
        requires_python=">=3.9,<3.12",
    ),
    StandIn(
        "aws-neuronx-runtime-discovery",
        "2.9",
        # Version from the 2.26.1 manifest; no public source lists requirements: none.
        requires=(),
        requires_python=">=3.9,<3.12",
    ),
)


def wheel_stem(name: str, version: str) -> str:
    """`{name}-{version}` as a wheel's file name spells them (PEP 427, PEP 503)."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}"


def write_stand_in(directory: Path, stand_in: StandIn) -> Path:
    """Write `stand_in` as a wheel holding only its dist-info: METADATA, WHEEL, RECORD."""
    stem = wheel_stem(stand_in.name, stand_in.version)
    info = f"{stem}.dist-info"
    metadata = [
        "Metadata-Version: 2.1",
        f"Name: {stand_in.name}",
        f"Version: {stand_in.version}",
        "Summary: metadata-only stand-in (tgi's Neuron image resolution check)",
    ]
    if stand_in.requires_python:
        metadata.append(f"Requires-Python: {stand_in.requires_python}")
    metadata += [f"Requires-Dist: {requirement}" for requirement in stand_in.requires]
    files = {
        f"{info}/METADATA": "\n".join(metadata) + "\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tgi-stand-in\nRoot-Is-Purelib: true\n"
        "Tag: py3-none-any\n",
    }
    record = "".join(f"{path},,\n" for path in [*files, f"{info}/RECORD"])
    path = directory / f"{stem}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for member, text in {**files, f"{info}/RECORD": record}.items():
            wheel.writestr(member, text)
    return path


def write_stand_ins(directory: Path, stand_ins: Iterable[StandIn] = STAND_INS) -> list[Path]:
    """Write each stand-in into `directory`: a folder for pip's --find-links."""
    directory.mkdir(parents=True, exist_ok=True)
    return [write_stand_in(directory, stand_in) for stand_in in stand_ins]


def pip_environment() -> dict[str, str]:
    """pip's environment: no configuration file, no PIP_* beyond how to connect, and no
    PYTHONPATH, so that only this script's options decide what is resolved."""
    environ = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PIP_") or key in PIP_TRANSPORT
    }
    environ.update(PIP_CONFIG_FILE=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")
    environ.pop("PYTHONPATH", None)
    return environ


def pip(*args: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
    """This interpreter's pip, in `pip_environment()`."""
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        env=pip_environment(),
        check=False,
        timeout=timeout,
    )


def index_options(index_url: str | None) -> list[str]:
    return ["--index-url", index_url] if index_url else []


def unreachable(output: str) -> bool:
    """Whether pip's output says it could not connect (not: the index said no)."""
    return any(marker in output for marker in UNREACHABLE_MARKERS)


def probe_index(index_url: str | None) -> str | None:
    """None when the index answers for optimum-neuron; else pip's output."""
    done = pip(
        "index",
        "versions",
        "--retries",
        "2",
        "--timeout",
        "20",
        *index_options(index_url),
        "optimum-neuron",
        timeout=300,
    )
    if done.returncode == 0 and "optimum-neuron" in done.stdout:
        return None
    return done.stdout + done.stderr


def setuptools_here() -> bool:
    """Whether this interpreter can build our wheels without build isolation (offline)."""
    try:
        import setuptools
    except ImportError:
        return False
    major, minor = (int(part) for part in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1)  # bdist_wheel without the `wheel` package


def build_wheel(name: str, scratch: Path, wheels: Path) -> Path:
    """`pip wheel --no-deps` on a copy of `name`'s sources (a build writes into its tree)."""
    source, keep = SOURCES[name]
    copy = scratch / name
    copy.mkdir(parents=True)
    for entry in keep:
        if (source / entry).is_dir():
            ignore = shutil.ignore_patterns("__pycache__", "*.egg-info")
            shutil.copytree(source / entry, copy / entry, ignore=ignore)
        else:
            shutil.copy2(source / entry, copy / entry)
    isolation = ["--no-build-isolation"] if setuptools_here() else []
    before = set(wheels.glob("*.whl"))
    done = pip("wheel", "--no-deps", *isolation, "-w", str(wheels), str(copy), timeout=600)
    built = sorted(set(wheels.glob("*.whl")) - before)
    if done.returncode != 0 or len(built) != 1:
        raise RuntimeError(f"building {name} failed:\n{done.stdout}\n{done.stderr}")
    return built[0]


def wheel_version(wheel: Path) -> str:
    """The version in a wheel's file name (PEP 427)."""
    return wheel.name.split("-")[1]


def canonical(name: str) -> str:
    """A project name as PEP 503 normalizes it."""
    return re.sub(r"[-_.]+", "-", name).lower()


def release(version: str) -> tuple[int, ...]:
    """The release segment of a version (`2.8.0+cpu` -> (2, 8, 0))."""
    match = re.match(r"\d+(?:\.\d+)*", version)
    return tuple(int(part) for part in match.group(0).split(".")) if match else ()


def dry_run_command(
    report: Path,
    local: Mapping[str, Path],
    links: Sequence[Path],
    *,
    python_version: str,
    index_url: str | None,
) -> list[str]:
    """pip's arguments: resolve for the image's Python and platform, wheels only."""
    platforms = [option for platform in PLATFORMS for option in ("--platform", platform)]
    return [
        "install",
        "--dry-run",
        "--ignore-installed",
        "--report",
        str(report),
        "--python-version",
        python_version,
        "--implementation",
        "cp",
        *platforms,
        "--only-binary=:all:",
        # Where the index does not advertise PEP 658 metadata files (some mirrors and
        # proxies), read each wheel's METADATA through HTTP range requests instead of
        # downloading it whole (torch and its CUDA wheels: about 4.6 GB).
        "--use-feature=fast-deps",
        *index_options(index_url),
        *(option for link in links for option in ("--find-links", str(link))),
        f"tgi-server @ {local['tgi-server'].as_uri()}",
        f"tgi-backend-neuron[neuron] @ {local['tgi-backend-neuron'].as_uri()}",
        OPTIMUM_NEURON,
    ]


def installed(report: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The report's install entries by canonical name."""
    return {canonical(item["metadata"]["name"]): item for item in report["install"]}


def check(report: Mapping[str, Any], local: Mapping[str, Path]) -> list[str]:
    """What in the resolution differs from what the Neuron image needs; empty when fine."""
    found = installed(report)
    problems = []

    def version(name: str) -> str | None:
        item = found.get(name)
        return None if item is None else str(item["metadata"]["version"])

    torch, transformers, optimum_neuron = (
        version("torch"),
        version("transformers"),
        version("optimum-neuron"),
    )
    if torch is None or release(torch)[:3] != (2, 8, 0):
        problems.append(f"torch resolved to {torch}, not 2.8.0 (optimum-neuron's torch==2.8.0.*)")
    if transformers is None or release(transformers)[:2] != (4, 57):
        problems.append(f"transformers resolved to {transformers}, not 4.57.x")
    if optimum_neuron is None or not (0, 4, 5) <= release(optimum_neuron) < (0, 5):
        problems.append(f"optimum-neuron resolved to {optimum_neuron}, not >=0.4.5,<0.5")
    for name, wheel in local.items():
        item = found.get(name)
        if item is None:
            problems.append(f"{name} is not in the resolution")
            continue
        if version(name) != wheel_version(wheel):
            problems.append(f"{name} resolved to {version(name)}, not {wheel_version(wheel)}")
        if item.get("download_info", {}).get("url") != wheel.as_uri():
            problems.append(f"{name} came from {item.get('download_info')}, not {wheel}")
    for stand_in in STAND_INS:
        item = found.get(canonical(stand_in.name))
        url = "" if item is None else item.get("download_info", {}).get("url", "")
        if item is not None and not url.endswith(
            f"/{wheel_stem(stand_in.name, stand_in.version)}-py3-none-any.whl"
        ):
            problems.append(f"{stand_in.name} came from {url}, not its stand-in")
    return problems


def print_versions(report: Mapping[str, Any]) -> None:
    """The versions the Neuron install hinges on, as resolved."""
    found = installed(report)
    width = max(len(name) for name in KEY_PACKAGES)
    for name in KEY_PACKAGES:
        item = found.get(name)
        text = "-" if item is None else str(item["metadata"]["version"])
        if name in {canonical(s.name) for s in STAND_INS}:
            text += "  (stand-in)"
        print(f"  {name:<{width}}  {text}")
    print(f"  ({len(found)} distributions in all)")


def pip_too_old() -> str | None:
    """pip's version when it predates what the dry run needs, else None."""
    done = pip("--version", timeout=60)
    match = re.match(r"pip (\d+)\.(\d+)", done.stdout)
    if match and (int(match.group(1)), int(match.group(2))) >= MINIMUM_PIP:
        return None
    return done.stdout.strip() or done.stderr.strip()


def resolve(args: argparse.Namespace, work: Path) -> int:
    """Probe the index, build our wheels, write the stand-ins, run the dry run, check it."""
    report_path = work / "report.json"
    old = pip_too_old()
    if old is not None:
        print(f"needs pip >= {'.'.join(map(str, MINIMUM_PIP))}: {old}", file=sys.stderr)
        return EXIT_USAGE
    problem = probe_index(args.index_url)
    if problem is not None:
        if unreachable(problem):
            print(f"the package index is unreachable:\n{problem}", file=sys.stderr)
            return EXIT_UNREACHABLE
        print(f"the package index did not list optimum-neuron:\n{problem}", file=sys.stderr)
        return EXIT_FAILED
    wheels, stand_ins = work / "wheels", work / "stand-ins"
    wheels.mkdir()
    write_stand_ins(stand_ins)
    try:
        local = {name: build_wheel(name, work / "src", wheels) for name in SOURCES}
    except RuntimeError as error:
        print(error, file=sys.stderr)
        return EXIT_USAGE
    command = dry_run_command(
        report_path,
        local,
        [wheels, stand_ins],
        python_version=args.python_version,
        index_url=args.index_url,
    )
    started = time.monotonic()
    done = pip(*command, timeout=args.timeout)
    elapsed = time.monotonic() - started
    output = done.stdout + done.stderr
    if done.returncode != 0:
        # pip's account of a conflict ("The conflict is caused by: ...") closes its output
        tail = "\n".join(output.splitlines()[-OUTPUT_TAIL:])
        print(f"pip's resolver failed ({elapsed:.0f} s):\n{tail}", file=sys.stderr)
        return EXIT_UNREACHABLE if unreachable(output) else EXIT_FAILED
    report = json.loads(report_path.read_text())
    if args.keep:
        shutil.copy2(report_path, args.keep)
        print(f"report kept at {args.keep}")
    print(f"resolved for CPython {args.python_version} on x86_64 Linux in {elapsed:.0f} s:")
    print_versions(report)
    problems = check(report, local)
    for text in problems:
        print(f"FAIL: {text}", file=sys.stderr)
    if problems:
        return EXIT_FAILED
    print("OK: tgi-server, tgi-backend-neuron[neuron] and optimum-neuron[neuronx] resolve together")
    return EXIT_OK


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", type=Path, help="copy pip's installation report here")
    parser.add_argument("--python-version", default=PYTHON_VERSION, help="default: %(default)s")
    parser.add_argument("--index-url", help="the index to resolve against (default: pip's)")
    parser.add_argument(
        "--timeout", type=float, default=600, help="seconds for the resolver (%(default)s)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="neuron-image-") as work:
        try:
            return resolve(args, Path(work))
        except subprocess.TimeoutExpired as timeout:
            step = " ".join(str(part) for part in timeout.cmd[3:5])  # e.g. "install --dry-run"
            print(f"pip {step} did not finish in {timeout.timeout:.0f} s", file=sys.stderr)
            return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
