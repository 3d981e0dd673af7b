"""The CUDA backend's tests run on a CPU in its test mode; the Triton kernels then run
under Triton's interpreter, which must be chosen before triton is first imported (its
`jit` reads TRITON_INTERPRET when a kernel is defined), so it is set here, at collection,
and only where no GPU is present: on a GPU (the GPU check) the kernels run for real."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config: object, items: list) -> None:  # type: ignore[type-arg]
    """`gpu` tests need a GPU: skipped here, run by the GPU check (`make gpu-check`)."""
    if torch.cuda.is_available():
        return
    import pytest

    skip = pytest.mark.skip(reason="needs a GPU (run by backends/cuda/gpu_check)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
