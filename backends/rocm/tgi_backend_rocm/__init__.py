"""tgi's ROCm backend: the CUDA backend's runner on AMD GPUs, behind its own probe."""
