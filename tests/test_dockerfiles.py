"""The images, read as text: no Docker engine here builds them, so these catch what can
be caught without one. Every image starts on the one entrypoint and copies only paths
that exist; the GPU images keep the torch of their base image."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILES = sorted((ROOT / "docker").glob("Dockerfile.*"))
GPU_IMAGES = {
    "Dockerfile.cuda": ("backends/cuda",),
    "Dockerfile.rocm": ("backends/cuda", "backends/rocm"),
}
# What the GPU images drop from constraints.txt (`grep -v -i '^torch=='`) before pinning
# the base image's torch.
TORCH_LINE = re.compile("^torch==", re.IGNORECASE)


def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per instruction, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_every_image_starts_on_the_one_entrypoint(path: Path) -> None:
    steps = instructions(path)

    assert ("COPY", "docker/entrypoint.sh /usr/local/bin/tgi-entrypoint") in steps
    assert steps[-1] == ("ENTRYPOINT", '["tgi-entrypoint"]')
    assert ("EXPOSE", "80") in steps


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda path: path.name)
def test_every_copied_path_exists(path: Path) -> None:
    copies = [shlex.split(args)[:-1] for keyword, args in instructions(path) if keyword == "COPY"]

    missing = [source for sources in copies for source in sources if not (ROOT / source).exists()]

    assert copies
    assert missing == []


@pytest.mark.parametrize("name", sorted(GPU_IMAGES))
def test_gpu_images_install_their_backends_pinning_the_base_images_torch(name: str) -> None:
    runs = [args for keyword, args in instructions(ROOT / "docker" / name) if keyword == "RUN"]
    installs = [
        command.strip()
        for run in runs
        for command in run.split("&&")
        if command.strip().startswith("pip install")
    ]
    [main] = [command for command in installs if "/tmp/image-torch.txt" in command]

    assert "grep -v -i '^torch==' constraints.txt > /tmp/constraints.txt" in " ".join(runs)
    assert "-c /tmp/constraints.txt" in main  # constraints.txt without its torch line
    for backend in GPU_IMAGES[name]:
        assert f"./{backend}" in main
    for command in installs:  # nothing asks pip for torch itself
        assert not re.search(r"(^|\s)['\"]?torch([=<>\s'\"]|$)", command), command


def test_dropping_the_torch_line_leaves_constraints_without_torch() -> None:
    kept = [
        line.split("#", 1)[0].strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if not TORCH_LINE.match(line)
    ]

    assert "torch" not in {Requirement(text).name.lower() for text in kept if text}
