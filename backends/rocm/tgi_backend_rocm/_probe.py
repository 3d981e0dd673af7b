"""Is the installed torch a ROCm build, and are AMD GPUs here? Files only, no runtime.

NOTE: nothing here imports `torch` or touches HIP. The probe runs in the front process
before worker ranks fork, and a HIP context, once made, cannot be unmade. torch's build
is read from its installed metadata and, failing that, from the text of its
`torch/version.py`; the GPUs from the amdgpu driver's KFD topology in sysfs:

    /dev/kfd                                           the compute driver's node
    /sys/class/kfd/kfd/topology/nodes/<n>/properties   one node per CPU socket and GPU;
        gfx_target_version 90402                       0 on a CPU node; 9.4.2 = gfx942
        drm_render_minor 128                           its /dev/dri/renderD128
    /sys/class/drm/renderD<minor>/device/product_name         "AMD Instinct MI300X"
    /sys/class/drm/renderD<minor>/device/mem_info_vram_total  bytes

Every function takes the roots it reads (`dev`, `sysfs`) so tests hand in a fake tree.
"""

from __future__ import annotations

import ast
import importlib.metadata
import importlib.util
import logging
import os
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.machinery import ModuleSpec
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "CUDA_BACKEND_MODULE",
    "VISIBLE_DEVICES_ENV",
    "AmdGpu",
    "HardwareCheck",
    "TorchBuild",
    "check_hardware",
    "find_gpus",
    "gfx_name",
    "read_torch_build",
]

DEV = Path("/dev")
SYSFS = Path("/sys")
CUDA_BACKEND_MODULE = "tgi_backend_cuda"  # the runner this backend reuses
# What narrows the GPUs the HIP runtime shows a process (the probe reports, never applies).
VISIBLE_DEVICES_ENV = ("ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES")
_GIB = 2**30


@dataclass(frozen=True, slots=True)
class TorchBuild:
    """The installed torch, as its files describe it."""

    version: str | None  # e.g. "2.6.0+rocm6.2.4"; None when torch is not installed
    rocm: str | None  # the ROCm/HIP version it was built for; None for a CUDA or CPU build

    def describe(self) -> str:
        return f"torch {self.version}"


@dataclass(frozen=True, slots=True)
class AmdGpu:
    """One GPU node of the KFD topology."""

    node: int  # the topology node's number
    gfx_target: str  # the ISA, e.g. "gfx942" (MI300), "gfx90a" (MI200), "gfx1100" (RX 7900)
    render_minor: int | None  # /dev/dri/renderD<minor>, None when the node does not say
    product: str | None  # e.g. "AMD Instinct MI300X", where the driver publishes it
    vram_bytes: int | None
    version: tuple[int, int, int]  # gfx_target_version's (major, minor, stepping)

    @property
    def capability(self) -> tuple[int, int]:
        """What ROCm's torch.cuda.get_device_capability() answers: gfx942 -> (9, 4)."""
        return self.version[0], self.version[1]

    def describe(self) -> str:
        size = f", {self.vram_bytes / _GIB:.0f} GiB" if self.vram_bytes else ""
        return f"{self.product or 'AMD GPU'} ({self.gfx_target}{size})"


@dataclass(frozen=True, slots=True)
class HardwareCheck:
    """What the probe found; `reason` names everything missing, or what was found."""

    available: bool
    gpus: tuple[AmdGpu, ...]
    reason: str


def _split(target_version: int) -> tuple[int, int, int]:
    """KFD's gfx_target_version is major * 10000 + minor * 100 + stepping."""
    major, rest = divmod(target_version, 10000)
    minor, stepping = divmod(rest, 100)
    return major, minor, stepping


def gfx_name(target_version: int) -> str:
    """The ISA name of a gfx_target_version; minor and stepping are hex digits there:
    90402 -> gfx942, 90010 -> gfx90a."""
    major, minor, stepping = _split(target_version)
    return f"gfx{major}{minor:x}{stepping:x}"


def _version_file_fields(spec: ModuleSpec) -> dict[str, str]:
    """The string constants `torch/version.py` assigns, parsed, never executed."""
    locations = list(spec.submodule_search_locations or ())
    if not locations:
        return {}
    path = Path(locations[0]) / "version.py"
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (OSError, SyntaxError, ValueError) as exc:
        logger.debug("cannot read %s: %s", path, exc)
        return {}
    fields: dict[str, str] = {}
    for statement in tree.body:
        if isinstance(statement, ast.Assign) and len(statement.targets) == 1:
            target, value = statement.targets[0], statement.value
        elif isinstance(statement, ast.AnnAssign) and statement.value is not None:
            target, value = statement.target, statement.value
        else:
            continue
        text = value.value if isinstance(value, ast.Constant) else None
        if isinstance(target, ast.Name) and isinstance(text, str):
            fields[target.id] = text
    return fields


def _torch_spec() -> ModuleSpec | None:
    try:
        return importlib.util.find_spec("torch")
    except (ImportError, ValueError):  # ValueError: a torch in sys.modules without a spec
        return None


def read_torch_build(
    find_spec: Callable[[], ModuleSpec | None] = _torch_spec,
    dist_version: Callable[[str], str] = importlib.metadata.version,
) -> TorchBuild:
    """The installed torch's version and ROCm version, without importing it.

    A ROCm wheel says so in its version's local tag (`2.6.0+rocm6.2.4`); a source build,
    as in AMD's rocm/pytorch images (`2.6.0a0+git1234567`), does not, so then the
    `hip` (or newer torch's `rocm`) constant of `torch/version.py` decides.
    """
    spec = find_spec()
    if spec is None:
        return TorchBuild(None, None)
    try:
        version: str | None = dist_version("torch")
    except importlib.metadata.PackageNotFoundError:
        version = None
    local = (version or "").partition("+")[2]
    if local.startswith("rocm"):
        return TorchBuild(version, local.removeprefix("rocm") or None)
    fields = _version_file_fields(spec)
    rocm = fields.get("rocm") or fields.get("hip") or None
    return TorchBuild(version or fields.get("__version__", "(unknown version)"), rocm)


def _properties(path: Path) -> dict[str, int]:
    """A KFD `properties` file: one `name value` pair per line, all integers."""
    values: dict[str, int] = {}
    for line in path.read_text(encoding="ascii", errors="replace").splitlines():
        name, _, text = line.strip().partition(" ")
        try:
            values[name] = int(text)
        except ValueError:
            continue
    return values


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8", errors="replace").strip() or None
    except OSError:
        return None


def find_gpus(sysfs: Path = SYSFS) -> tuple[AmdGpu, ...]:
    """The GPU nodes of the KFD topology under `sysfs` (CPU nodes have gfx target 0)."""
    nodes = sysfs / "class" / "kfd" / "kfd" / "topology" / "nodes"
    try:
        node_dirs = [path for path in nodes.iterdir() if path.name.isdigit()]
    except OSError as exc:
        logger.debug("cannot list %s: %s", nodes, exc)
        return ()
    gpus: list[AmdGpu] = []
    for node_dir in sorted(node_dirs, key=lambda path: int(path.name)):
        try:
            properties = _properties(node_dir / "properties")
        except OSError as exc:
            logger.debug("cannot read %s: %s", node_dir / "properties", exc)
            continue
        target = properties.get("gfx_target_version", 0)
        if target == 0:
            continue
        minor = properties.get("drm_render_minor") or None
        device = sysfs / "class" / "drm" / f"renderD{minor}" / "device" if minor else None
        vram = _read_text(device / "mem_info_vram_total") if device else None
        gpus.append(
            AmdGpu(
                node=int(node_dir.name),
                gfx_target=gfx_name(target),
                render_minor=minor,
                product=_read_text(device / "product_name") if device else None,
                vram_bytes=int(vram) if vram and vram.isdigit() else None,
                version=_split(target),
            )
        )
    return tuple(gpus)


def _describe_gpus(gpus: tuple[AmdGpu, ...]) -> str:
    counts = Counter(gpu.describe() for gpu in gpus)
    return ", ".join(f"{count} x {text}" for text, count in counts.items())


def _gpu_problems(dev: Path, sysfs: Path) -> tuple[tuple[AmdGpu, ...], list[str]]:
    """The usable GPUs, and what keeps this process from them."""
    kfd = dev / "kfd"
    if not kfd.exists():
        return (), [f"no {kfd}: no AMD GPU driver (amdgpu), or a container without --device={kfd}"]
    problems: list[str] = []
    if not os.access(kfd, os.R_OK | os.W_OK):
        problems.append(f"no read/write access to {kfd}: add the user to the 'render' group")
    gpus = find_gpus(sysfs)
    if not gpus:
        problems.append(f"{kfd} exists, but the KFD topology under {sysfs} lists no GPU node")
        return (), problems
    reachable = tuple(
        gpu
        for gpu in gpus
        if gpu.render_minor is None or (dev / "dri" / f"renderD{gpu.render_minor}").exists()
    )
    if not reachable:
        problems.append(
            f"{len(gpus)} AMD GPU(s) in {sysfs}, but none of their render nodes under "
            f"{dev / 'dri'}: a container needs --device={dev / 'dri'} as well as --device={kfd}"
        )
    return reachable, problems


def check_hardware(
    environ: Mapping[str, str],
    dev: Path = DEV,
    sysfs: Path = SYSFS,
    torch_build: TorchBuild | None = None,
    cuda_backend_installed: bool | None = None,
) -> HardwareCheck:
    """Available only where torch is a ROCm build, the CUDA backend (the runner) is
    installed and AMD GPUs are reachable; else say everything that is missing."""
    build = torch_build if torch_build is not None else read_torch_build()
    if cuda_backend_installed is None:
        cuda_backend_installed = importlib.util.find_spec(CUDA_BACKEND_MODULE) is not None
    missing: list[str] = []
    if build.version is None:
        missing.append("torch is not installed")
    elif build.rocm is None:
        missing.append(
            f"{build.describe()} is not a ROCm build (no +rocm tag, torch.version.hip unset): "
            "install torch's ROCm build, or start from a rocm/pytorch image"
        )
    if not cuda_backend_installed:
        missing.append(
            "tgi-backend-cuda is not installed (its runner serves ROCm too): "
            "pip install tgi-backend-cuda"
        )
    gpus, problems = _gpu_problems(dev, sysfs)
    missing += problems
    if missing:
        return HardwareCheck(False, gpus, "; ".join(missing))
    found = f"{_describe_gpus(gpus)}; {build.describe()}"
    narrowed = [f"{name}={environ[name]}" for name in VISIBLE_DEVICES_ENV if name in environ]
    if narrowed:
        found += f"; the runtime shows only {', '.join(narrowed)}"
    return HardwareCheck(True, gpus, found)
