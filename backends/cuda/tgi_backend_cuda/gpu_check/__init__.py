"""The staged GPU check's Python stages (2: tests, 3: parity, 4: decode benchmark).

`backends/cuda/gpu_check/run.sh` runs each stage in its own process under its own time
limit: `python -m tgi_backend_cuda.gpu_check --stage N --out DIR [--dry-run]`. With
`--dry-run` every stage runs on the CPU with tiny shapes (the CUDA backend's CPU test
mode), which is how `make test` checks the stages before any GPU is seen.
"""

from tgi_backend_cuda.gpu_check._cli import main

__all__ = ["main"]
