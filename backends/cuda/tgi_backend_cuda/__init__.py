"""tgi's CUDA backend: the core's paged runner on NVIDIA GPUs (and, through
`tgi_backend_rocm`, AMD ones), with FlashInfer, Triton or SDPA attention and decode
graphs. The entry point is `tgi_backend_cuda.plugin`; `CudaBackend` is the backend."""

__all__ = ["__version__"]

__version__ = "0.1.0"
