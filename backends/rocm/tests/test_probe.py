"""The ROCm plugin without an AMD GPU: its probe on fake /dev and /sys trees, its
options, its checks, and that probing initialises no device runtime."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import types
from importlib.machinery import ModuleSpec
from importlib.metadata import version
from pathlib import Path
from typing import Any

import pytest
from tgi_backend_rocm import plugin
from tgi_backend_rocm._probe import (
    AmdGpu,
    HardwareCheck,
    TorchBuild,
    check_hardware,
    find_gpus,
    gfx_name,
    read_torch_build,
)

from tgi.backend.hookspecs import BackendFlag
from tgi.backend.manager import BackendManager, PluginRecord, PluginStatus, SelectedBackend
from tgi.config import ServeConfig, backend_option_env, resolve_config
from tgi.errors import ConfigError

GIB = 2**30
ROCM_TORCH = TorchBuild("2.6.0+rocm6.2.4", "6.2.4")
CPU_TORCH = TorchBuild("2.13.0+cpu", None)
MI300X = (90402, "AMD Instinct MI300X", 192 * GIB)  # gfx_target_version, product, VRAM
NO_KFD = "no {dev}/kfd: no AMD GPU driver (amdgpu), or a container without --device={dev}/kfd"


def make_machine(
    root: Path,
    gpus: list[tuple[int, str | None, int | None]],
    *,
    kfd: bool = True,
    render_nodes: bool = True,
) -> tuple[Path, Path]:
    """Fake `dev` and `sysfs` roots: a CPU node 0, then one KFD node per GPU."""
    dev, sysfs = root / "dev", root / "sys"
    nodes = sysfs / "class" / "kfd" / "kfd" / "topology" / "nodes"
    (dev / "dri").mkdir(parents=True)
    cpu = nodes / "0"
    cpu.mkdir(parents=True)
    (cpu / "properties").write_text("cpu_cores_count 64\ngfx_target_version 0\n")
    if kfd:
        (dev / "kfd").write_text("")
    for index, (target, product, vram) in enumerate(gpus, start=1):
        minor = 127 + index
        node = nodes / str(index)
        node.mkdir()
        (node / "properties").write_text(
            f"cpu_cores_count 0\nsimd_count 1216\ngfx_target_version {target}\n"
            f"vendor_id 4098\ndrm_render_minor {minor}\n"
        )
        device = sysfs / "class" / "drm" / f"renderD{minor}" / "device"
        device.mkdir(parents=True)
        if product is not None:
            (device / "product_name").write_text(product + "\n")
        if vram is not None:
            (device / "mem_info_vram_total").write_text(f"{vram}\n")
        if render_nodes:
            (dev / "dri" / f"renderD{minor}").write_text("")
    return dev, sysfs


def check(
    dev: Path,
    sysfs: Path,
    torch_build: TorchBuild = ROCM_TORCH,
    *,
    environ: dict[str, str] | None = None,
    cuda: bool = True,
) -> HardwareCheck:
    return check_hardware(environ or {}, dev, sysfs, torch_build, cuda_backend_installed=cuda)


# ---------------------------------------------------------------- gfx names and torch builds


@pytest.mark.parametrize(
    ("target", "name"),
    [(90402, "gfx942"), (90010, "gfx90a"), (90008, "gfx908"), (110000, "gfx1100"),
     (100300, "gfx1030"), (120001, "gfx1201")],
)  # fmt: skip
def test_gfx_target_version_names_the_isa(target: int, name: str) -> None:
    assert gfx_name(target) == name


def torch_spec(root: Path, version_py: str | None) -> ModuleSpec:
    """A spec for a torch package under `root` whose version.py holds `version_py`."""
    package = root / "torch"
    package.mkdir()
    if version_py is not None:
        (package / "version.py").write_text(textwrap.dedent(version_py))
    spec = ModuleSpec("torch", None, is_package=True)
    spec.submodule_search_locations = [str(package)]
    return spec


def test_a_rocm_wheel_is_known_by_its_local_version_tag(tmp_path: Path) -> None:
    spec = torch_spec(tmp_path, None)  # the tag decides; version.py is not read

    build = read_torch_build(lambda: spec, lambda name: "2.6.0+rocm6.2.4")

    assert build == TorchBuild("2.6.0+rocm6.2.4", "6.2.4")


def test_a_source_build_is_known_by_torch_version_hip(tmp_path: Path) -> None:
    # AMD's rocm/pytorch images build torch from source: no +rocm tag in the version
    spec = torch_spec(
        tmp_path,
        """\
        from typing import Optional
        __version__ = '2.6.0a0+git1234567'
        cuda: Optional[str] = None
        hip: Optional[str] = '6.3.42131-fa1d09cbd'
        """,
    )

    build = read_torch_build(lambda: spec, lambda name: "2.6.0a0+git1234567")

    assert build == TorchBuild("2.6.0a0+git1234567", "6.3.42131-fa1d09cbd")


def test_a_cpu_or_cuda_build_has_no_rocm_version(tmp_path: Path) -> None:
    spec = torch_spec(tmp_path, "__version__ = '2.8.0+cu128'\ncuda = '12.8'\nhip = None\n")

    build = read_torch_build(lambda: spec, lambda name: "2.8.0+cu128")

    assert build == TorchBuild("2.8.0+cu128", None)


def test_missing_torch_is_said_so() -> None:
    build = read_torch_build(lambda: None)

    assert build == TorchBuild(None, None)
    assert check_hardware({}, torch_build=build, cuda_backend_installed=True).reason.startswith(
        "torch is not installed; "
    )


def test_this_venvs_torch_read_from_its_files() -> None:
    assert read_torch_build() == TorchBuild(version("torch"), None)  # a CPU build here


# ---------------------------------------------------------------- the hardware check


def test_two_mi300x_are_available(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [MI300X, MI300X])

    found = check(dev, sysfs)

    assert found.available is True
    assert found.reason == "2 x AMD Instinct MI300X (gfx942, 192 GiB); torch 2.6.0+rocm6.2.4"
    assert found.gpus == (
        AmdGpu(1, "gfx942", 128, "AMD Instinct MI300X", 192 * GIB, (9, 4, 2)),
        AmdGpu(2, "gfx942", 129, "AMD Instinct MI300X", 192 * GIB, (9, 4, 2)),
    )


def test_a_gpu_without_a_product_name_is_named_by_its_isa(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [(90010, None, 64 * GIB), (110000, None, None)])

    found = check(dev, sysfs)

    assert found.reason == (
        "1 x AMD GPU (gfx90a, 64 GiB), 1 x AMD GPU (gfx1100); torch 2.6.0+rocm6.2.4"
    )


def test_visible_device_variables_are_reported(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [MI300X, MI300X])

    found = check(dev, sysfs, environ={"HIP_VISIBLE_DEVICES": "1", "TGI_X": "y"})

    assert found.reason.endswith("; the runtime shows only HIP_VISIBLE_DEVICES=1")


def test_no_dev_kfd_means_no_driver(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [MI300X], kfd=False)

    found = check(dev, sysfs)

    assert found.available is False
    assert found.reason == NO_KFD.format(dev=dev)


def test_kfd_without_gpu_nodes(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [])

    found = check(dev, sysfs)

    assert found.available is False
    assert found.reason == f"{dev}/kfd exists, but the KFD topology under {sysfs} lists no GPU node"


def test_gpus_without_their_render_nodes_are_unreachable(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [MI300X], render_nodes=False)

    found = check(dev, sysfs)

    assert found.available is False
    assert found.reason == (
        f"1 AMD GPU(s) in {sysfs}, but none of their render nodes under {dev}/dri: a "
        f"container needs --device={dev}/dri as well as --device={dev}/kfd"
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="root may open any file: os.access is always true")
def test_a_kfd_the_user_may_not_open(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [MI300X])
    (dev / "kfd").chmod(0)

    found = check(dev, sysfs)

    assert found.reason == f"no read/write access to {dev}/kfd: add the user to the 'render' group"


def test_every_missing_piece_is_named(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [], kfd=False)

    found = check(dev, sysfs, CPU_TORCH, cuda=False)

    assert found.available is False
    assert found.reason.split("; ") == [
        "torch 2.13.0+cpu is not a ROCm build (no +rocm tag, torch.version.hip unset): "
        "install torch's ROCm build, or start from a rocm/pytorch image",
        "tgi-backend-cuda is not installed (its runner serves ROCm too): "
        "pip install tgi-backend-cuda",
        NO_KFD.format(dev=dev),
    ]


def test_gpus_with_a_cpu_torch_are_not_enough(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [MI300X])

    found = check(dev, sysfs, CPU_TORCH)

    assert found.available is False
    assert found.reason.startswith("torch 2.13.0+cpu is not a ROCm build")
    assert found.gpus == find_gpus(sysfs)


def test_the_probe_answers_as_rocm_at_cudas_priority(tmp_path: Path) -> None:
    dev, sysfs = make_machine(tmp_path, [MI300X])

    answer = plugin.probe({}, check(dev, sysfs))

    assert (answer.name, answer.available, answer.priority, answer.batching) == (
        "rocm",
        True,
        100,
        "continuous",
    )
    assert answer.version == version("tgi-backend-rocm")
    assert answer.emulated is False


# ---------------------------------------------------------------- no device runtime


# Runs in the child, as tests/backend/test_probes.py does for the other in-tree probes:
# CUDA's (and ROCm torch's HIP) initialisation all goes through torch.cuda._lazy_init.
HARNESS = textwrap.dedent(
    """
    import importlib.metadata, json, sys

    import torch

    events = []

    def refuse_init(*args, **kwargs):
        events.append("torch.cuda._lazy_init")
        raise RuntimeError("a probe initialised the device runtime")

    torch.cuda._lazy_init = refuse_init
    entry = importlib.metadata.EntryPoint("rocm", "tgi_backend_rocm.plugin", "tgi.backends")
    importlib.metadata.entry_points = lambda *, group: [entry] if group == entry.group else []

    from tgi.backend.manager import BackendManager

    [record] = BackendManager.from_environ({}).records
    print(json.dumps({"status": record.status.value, "reason": record.reason, "events": events,
                      "cuda_initialized": torch.cuda.is_initialized()}))
    """
)


def test_probe_and_options_initialise_no_device_runtime() -> None:
    done = subprocess.run(
        [sys.executable, "-c", HARNESS], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout.splitlines()[-1])

    assert seen["events"] == []
    assert seen["cuda_initialized"] is False
    assert seen["status"] == "unavailable", seen["reason"]  # probed, not broken
    assert "is not a ROCm build" in seen["reason"]


# ---------------------------------------------------------------- options


def test_options_offer_floats_and_fp8_kv_and_no_quantization() -> None:
    options = plugin.tgi_backend_options()

    assert options.quantize == frozenset()
    assert options.dtypes == frozenset({"float32", "bfloat16", "float16"})
    assert options.kv_cache_dtypes == frozenset(
        {"float32", "bfloat16", "float16", "fp8", "fp8_e4m3fn", "fp8_e5m2"}
    )
    assert options.parallelism == "ranks"
    attention = {flag.name: flag for flag in options.flags}["attention"]
    assert (attention.choices, attention.default, attention.env) == (
        ("triton", "sdpa"),
        None,  # the runner takes the best available of the platform's, Triton first
        "TGI_ATTENTION",
    )


def fake_cuda_plugin(monkeypatch: pytest.MonkeyPatch, **attributes: Any) -> None:
    module = types.ModuleType("tgi_backend_cuda.plugin")
    module.__dict__.update(attributes)
    monkeypatch.setitem(sys.modules, "tgi_backend_cuda.plugin", module)


def test_the_cuda_runners_flags_are_reused_with_rocms_attention(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cuda_attention = BackendFlag("attention", "kernels", choices=("flashinfer", "triton", "sdpa"))
    graphs = BackendFlag("cuda_graphs", "sizes", env="CUDA_GRAPHS")
    new = BackendFlag("prefix_blocks", "a flag the runner gained", type=int, default=4)
    fake_cuda_plugin(monkeypatch, GPU_FLAGS=(cuda_attention, graphs, new))

    flags = plugin.tgi_backend_options().flags

    assert flags == (plugin.ATTENTION, graphs, new)


def test_without_the_cuda_runners_flags_only_attention_is_declared(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake_cuda_plugin(monkeypatch)  # a tgi_backend_cuda.plugin without GPU_FLAGS

    assert plugin.tgi_backend_options().flags == (plugin.ATTENTION,)


def test_the_installed_cuda_backends_flags_are_rocms() -> None:
    cuda = pytest.importorskip("tgi_backend_cuda.plugin", reason="tgi-backend-cuda not installed")

    flags = {flag.name: flag for flag in plugin.tgi_backend_options().flags}

    assert list(flags) == [flag.name for flag in cuda.GPU_FLAGS]
    assert flags["attention"] is plugin.ATTENTION
    # the runner's test mode is the `device` flag; its variable is what the probe reads
    assert backend_option_env("rocm", flags["device"]) == plugin.DEVICE_ENV


def test_test_mode_is_available_but_emulated() -> None:
    answer = plugin.probe({"TGI_ROCM_DEVICE": "cpu"})

    assert (answer.available, answer.emulated, answer.reason) == (
        True,
        True,
        "test mode on the CPU (TGI_ROCM_DEVICE=cpu)",
    )


# ---------------------------------------------------------------- validation


def selected(environ: dict[str, str] | None = None, **values: Any) -> tuple[SelectedBackend, Any]:
    """The rocm plugin chosen by a fresh manager, and the config to validate."""
    manager = BackendManager()
    manager.pm.register(plugin, name="rocm")
    record = PluginRecord(
        name="rocm",
        value="tgi_backend_rocm.plugin",
        distribution="tgi-backend-rocm",
        distribution_version="0.1.0",
        status=PluginStatus.AVAILABLE,
        options=plugin.tgi_backend_options(),
    )
    return SelectedBackend(record, manager), resolve_config(values, environ or {})


@pytest.fixture
def two_mi300x(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation sees a machine with two MI300X."""
    dev, sysfs = make_machine(tmp_path, [MI300X, MI300X])
    monkeypatch.setattr(plugin, "check_hardware", lambda environ: check(dev, sysfs))


def test_the_core_refuses_quantize_for_rocm() -> None:
    backend, config = selected(quantize="fp8")

    with pytest.raises(ConfigError) as caught:
        backend.validate_config(config)

    assert str(caught.value) == (
        "--quantize fp8 (cli) is not offered by backend 'rocm' (it offers: none); "
        "no installed backend offers it"
    )


def test_the_core_refuses_flashinfer_on_rocm() -> None:
    backend, config = selected({"TGI_ATTENTION": "flashinfer"})

    with pytest.raises(ConfigError) as caught:
        backend.validate_config(config)

    assert str(caught.value) == (
        "--backend-option attention=flashinfer (env TGI_ATTENTION) for backend 'rocm': "
        "expected one of triton, sdpa; got 'flashinfer'"
    )


@pytest.mark.usefixtures("two_mi300x")
def test_a_valid_config_gets_the_cuda_backends_checks_and_dtype() -> None:
    pytest.importorskip("tgi_backend_cuda.plugin", reason="tgi-backend-cuda not installed")
    backend, config = selected({"CUDA_GRAPHS": "1,2,4,8", "TGI_ATTENTION": "sdpa"}, num_shard=2)

    validated = backend.validate_config(config)

    assert validated.backend_options["attention"] == "sdpa"
    assert validated.backend_options["cuda_graphs"] == "1,2,4,8"
    assert (validated.dtype, validated.source_of("dtype")) == ("bfloat16", "backend rocm")


@pytest.mark.usefixtures("two_mi300x")
@pytest.mark.parametrize(
    ("environ", "flag"),
    [
        ({"CUDA_GRAPHS": "1,two"}, "cuda_graphs"),
        ({"CUDA_MEMORY_FRACTION": "1.5"}, "cuda_memory_fraction"),
    ],
)
def test_gpu_settings_are_checked_before_weights_load(environ: dict[str, str], flag: str) -> None:
    pytest.importorskip("tgi_backend_cuda.plugin", reason="tgi-backend-cuda not installed")
    backend, config = selected(environ)

    with pytest.raises(ConfigError, match=flag):
        backend.validate_config(config)


@pytest.mark.usefixtures("two_mi300x")
def test_more_shards_than_gpus() -> None:
    backend, config = selected(num_shard=4)

    with pytest.raises(ConfigError) as caught:
        backend.validate_config(config)

    assert str(caught.value) == (
        "--num-shard 4 (cli): this machine has 2 AMD GPU(s), one per shard; lower --num-shard"
    )


def test_the_cuda_backend_sees_an_amd_gpus_capability() -> None:
    cuda = pytest.importorskip("tgi_backend_cuda.plugin", reason="tgi-backend-cuda not installed")
    gpu = AmdGpu(1, "gfx942", 128, "AMD Instinct MI300X", 192 * GIB, (9, 4, 2))

    info = plugin._gpu_info(gpu)

    assert info == cuda.GpuInfo("AMD Instinct MI300X", 192 * GIB, (9, 4))


# ---------------------------------------------------------------- create


def test_create_builds_the_cuda_runner_on_the_rocm_platform(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[Any, ...]] = []

    class CudaBackend:
        @classmethod
        def from_config(
            cls, config: ServeConfig, model: Any, *, rank: int, world_size: int, platform: Any
        ) -> str:
            calls.append((config, model, rank, world_size, platform))
            return "built"

    rocm_platform = object()
    backend_module = types.ModuleType("tgi_backend_cuda.backend")
    backend_module.__dict__["CudaBackend"] = CudaBackend
    platform_module = types.ModuleType("tgi_backend_cuda.platform")
    platform_module.__dict__["ROCM"] = rocm_platform
    monkeypatch.setitem(sys.modules, "tgi_backend_cuda.backend", backend_module)
    monkeypatch.setitem(sys.modules, "tgi_backend_cuda.platform", platform_module)
    config, model = resolve_config({}, {}), object()

    built = plugin.tgi_backend_create(config, model, rank=1, world_size=2)  # type: ignore[arg-type]

    assert built == "built"
    assert calls == [(config, model, 1, 2, rocm_platform)]
