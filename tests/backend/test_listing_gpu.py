"""`tgi backends` on a machine without GPUs lists the installed GPU backends as
unavailable, each with its reason: the command as users run it, over the real
entry points of `tgi-backend-cuda` and `tgi-backend-rocm` (`make install` installs both)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution, version
from pathlib import Path
from typing import Any

import pytest

TGI = str(Path(sys.executable).with_name("tgi"))


def installed(name: str) -> bool:
    try:
        distribution(name)
    except PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="module")
def listed() -> dict[str, dict[str, Any]]:
    """`tgi backends --json` run with none of tgi's variables set, by backend name."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("TGI_")}
    done = subprocess.run(
        [TGI, "backends", "--json"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return {record["name"]: record for record in json.loads(done.stdout)}


@pytest.mark.skipif(not installed("tgi-backend-rocm"), reason="tgi-backend-rocm not installed")
@pytest.mark.skipif(Path("/dev/kfd").exists(), reason="this machine has an AMD GPU driver")
def test_rocm_is_listed_unavailable_naming_what_is_missing(
    listed: dict[str, dict[str, Any]],
) -> None:
    rocm = listed["rocm"]

    assert (rocm["status"], rocm["distribution"], rocm["priority"]) == (
        "unavailable",
        "tgi-backend-rocm",
        100,
    )
    assert rocm["reason"] == (
        f"torch {version('torch')} is not a ROCm build (no +rocm tag, torch.version.hip "
        "unset): install torch's ROCm build, or start from a rocm/pytorch image; "
        "no /dev/kfd: no AMD GPU driver (amdgpu), or a container without --device=/dev/kfd"
    )
    assert rocm["options"]["quantize"] == []
    assert rocm["options"]["parallelism"] == "ranks"


@pytest.mark.skipif(not installed("tgi-backend-cuda"), reason="tgi-backend-cuda not installed")
@pytest.mark.skipif(Path("/dev/nvidiactl").exists(), reason="this machine has an NVIDIA driver")
def test_cuda_is_listed_unavailable(listed: dict[str, dict[str, Any]]) -> None:
    pytest.importorskip("tgi_backend_cuda.plugin", reason="the CUDA plugin module is not written")
    cuda = listed["cuda"]

    assert (cuda["status"], cuda["distribution"]) == ("unavailable", "tgi-backend-cuda")
    assert cuda["reason"]  # the CUDA plugin's own words for what is missing
