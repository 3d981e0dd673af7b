"""The cuda plugin: its probe reads NVML (faked here) and torch's metadata, never CUDA;
its settings are checked against the GPU before weights load."""

from __future__ import annotations

import subprocess
import sys
import types
from typing import Any

import pytest
from tgi_backend_cuda import plugin
from tgi_backend_cuda.plugin import GpuInfo, nvml_gpus, torch_build_problem

from tgi.backend.manager import BackendManager, PluginRecord, PluginStatus, SelectedBackend
from tgi.config import ServeConfig, resolve_config
from tgi.errors import ConfigError

H100 = GpuInfo("NVIDIA H100 80GB HBM3", 80 * 2**30, (9, 0))
T4 = GpuInfo("Tesla T4", 16 * 2**30, (7, 5))


def fake_nvml(gpus: list[GpuInfo], *, init_error: str | None = None) -> types.SimpleNamespace:
    def init() -> None:
        if init_error:
            raise RuntimeError(init_error)

    return types.SimpleNamespace(
        nvmlInit=init,
        nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: len(gpus),
        nvmlDeviceGetHandleByIndex=lambda i: gpus[i],
        nvmlDeviceGetName=lambda gpu: gpu.name.encode(),
        nvmlDeviceGetMemoryInfo=lambda gpu: types.SimpleNamespace(total=gpu.memory_bytes),
        nvmlDeviceGetCudaComputeCapability=lambda gpu: gpu.capability,
    )


def test_nvml_names_each_gpu() -> None:
    gpus, problem = nvml_gpus(fake_nvml([H100, H100]))
    assert problem is None and gpus == [H100, H100]
    assert H100.describe() == "NVIDIA H100 80GB HBM3 (80 GiB, sm_90)"


@pytest.mark.parametrize(
    ("nvml", "reason"),
    [
        (fake_nvml([], init_error="NVML Shared Library Not Found"), "no NVIDIA driver"),
        (fake_nvml([]), "NVML sees no GPU"),
    ],
)
def test_nvml_says_what_is_missing(nvml: Any, reason: str) -> None:
    gpus, problem = nvml_gpus(nvml)
    assert gpus == [] and problem is not None and reason in problem


def test_a_cpu_or_rocm_torch_cannot_drive_an_nvidia_gpu() -> None:
    assert torch_build_problem("2.8.0+cpu") == "torch 2.8.0+cpu is not a CUDA build"
    assert torch_build_problem("2.7.1+rocm6.3") == "torch 2.7.1+rocm6.3 is not a CUDA build"
    assert torch_build_problem("2.8.0") is None  # the default wheels are CUDA builds
    assert torch_build_problem("2.8.0+cu128") is None


def test_the_probe_is_available_only_with_gpus_and_a_cuda_torch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(plugin, "nvml_gpus", lambda: ([H100], None))
    monkeypatch.setattr(plugin, "torch_build_problem", lambda: None)
    probe = plugin.tgi_backend_probe({})
    assert probe.available and probe.priority > 10 and "1 GPU: NVIDIA H100" in probe.reason
    monkeypatch.setattr(
        plugin, "torch_build_problem", lambda: "torch 2.13.0+cpu is not a CUDA build"
    )
    probe = plugin.tgi_backend_probe({})
    assert not probe.available and probe.reason == "torch 2.13.0+cpu is not a CUDA build"


def test_test_mode_is_available_but_emulated() -> None:
    probe = plugin.tgi_backend_probe({"TGI_CUDA_DEVICE": "cpu"})
    assert probe.available and probe.emulated and "TGI_CUDA_DEVICE=cpu" in probe.reason


def test_probing_starts_no_cuda_runtime() -> None:
    """The probe runs before ranks fork: CUDA must not be initialised by it."""
    code = (
        "import torch\n"
        "from tgi_backend_cuda import plugin\n"
        "plugin.tgi_backend_probe({}); plugin.tgi_backend_options()\n"
        "assert not torch.cuda.is_initialized()\n"
        "import sys; assert 'triton' not in sys.modules and 'flashinfer' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def _selected(
    gpus: list[GpuInfo],
    monkeypatch: pytest.MonkeyPatch,
    environ: dict[str, str] | None = None,
    **values: Any,
) -> tuple[SelectedBackend, ServeConfig]:
    monkeypatch.setattr(plugin, "nvml_gpus", lambda: (gpus, None if gpus else "none"))
    manager = BackendManager()
    manager.pm.register(plugin, name="cuda")
    record = PluginRecord(
        name="cuda",
        value="tgi_backend_cuda.plugin",
        distribution="tgi-backend-cuda",
        distribution_version="0.1.0",
        status=PluginStatus.AVAILABLE,
        options=plugin.tgi_backend_options(),
    )
    return SelectedBackend(record, manager), resolve_config(values, environ or {})


def test_the_dtype_is_bf16_where_the_gpu_computes_in_it_else_fp16(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for gpu, dtype in ((H100, "bfloat16"), (T4, "float16")):
        backend, config = _selected([gpu], monkeypatch)
        validated = backend.validate_config(config)
        assert (validated.dtype, validated.source_of("dtype")) == (dtype, "backend cuda")


def test_tgis_variables_set_the_gpu_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"CUDA_GRAPHS": "1,2,4", "CUDA_MEMORY_FRACTION": "0.8", "TGI_ATTENTION": "triton"}
    backend, config = _selected([H100], monkeypatch, environ)
    options = backend.validate_config(config).backend_options
    assert options["cuda_graphs"] == "1,2,4"
    assert options["cuda_memory_fraction"] == 0.8
    assert options["attention"] == "triton"


@pytest.mark.parametrize(
    ("gpus", "environ", "values", "message"),
    [
        ([T4], {}, {"kv_cache_dtype": "fp8_e4m3fn"}, "compute capability 8.9"),
        ([H100], {"CUDA_MEMORY_FRACTION": "0"}, {}, r"in \(0, 1\]"),
        ([H100], {"CUDA_GRAPHS": "1,x"}, {}, "comma-separated"),
        ([H100], {}, {"num_shard": 2}, "needs one GPU per shard; NVML sees 1"),
        ([H100], {}, {"quantize": "gptq"}, "not offered by backend 'cuda'"),
        ([H100], {"TGI_ATTENTION": "flash"}, {}, "expected one of flashinfer, triton, sdpa"),
    ],
)
def test_settings_the_gpu_cannot_run_fail_before_weights_load(
    monkeypatch: pytest.MonkeyPatch,
    gpus: list[GpuInfo],
    environ: dict[str, str],
    values: dict[str, Any],
    message: str,
) -> None:
    backend, config = _selected(gpus, monkeypatch, environ, **values)
    with pytest.raises(ConfigError, match=message):
        backend.validate_config(config)


def test_an_fp8_kv_cache_is_accepted_on_hopper(monkeypatch: pytest.MonkeyPatch) -> None:
    backend, config = _selected([H100], monkeypatch, kv_cache_dtype="fp8_e5m2")
    assert backend.validate_config(config).kv_cache_dtype == "fp8_e5m2"


def test_tgis_launcher_flags_become_the_gpu_backends_options(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`tgi serve --cuda-graphs 1,2 --cuda-memory-fraction 0.5` as TGI's launcher takes
    them: the cuda backend gets them as its options, from the command line."""
    from tgi.cli import _gpu_flags

    values = _gpu_flags(
        {"backend_option": ["attention=sdpa"], "cuda_graphs": "1,2", "cuda_memory_fraction": 0.5}
    )
    assert values == {
        "backend_option": ["attention=sdpa", "cuda_graphs=1,2", "cuda_memory_fraction=0.5"]
    }
    backend, config = _selected([H100], monkeypatch, {"CUDA_GRAPHS": "8"}, **values)
    validated = backend.validate_config(config)
    assert validated.backend_options["cuda_graphs"] == "1,2"  # the flag over the variable
    assert validated.backend_options["cuda_memory_fraction"] == 0.5
    assert validated.source_of("backend_option.cuda_graphs") == "cli"
    assert _gpu_flags({"backend_option": None}) == {"backend_option": None}
