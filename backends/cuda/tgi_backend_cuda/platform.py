"""What differs between the GPU platforms this package serves: CUDA and ROCm.

ROCm's torch exposes the `torch.cuda` API (HIP underneath), so one backend runs both; a
platform says only what it is called and which attention implementations it may use,
best first. FlashInfer is CUDA only; the Triton kernels serve both.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["CUDA", "ROCM", "GpuPlatform"]


@dataclass(frozen=True, slots=True)
class GpuPlatform:
    name: str  # the backend's name: "cuda" or "rocm"
    attention: tuple[str, ...]  # attention implementations it may use, best first
    graphs: str  # what its captured graphs are called, for logs


CUDA = GpuPlatform(name="cuda", attention=("flashinfer", "triton", "sdpa"), graphs="CUDA graphs")
ROCM = GpuPlatform(name="rocm", attention=("triton", "sdpa"), graphs="HIP graphs")
