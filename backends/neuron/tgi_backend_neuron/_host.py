"""What this Neuron host offers an exported model: instance type, cores, SDK versions.

Read without touching a device (this runs in validation, before ranks or weights): the
device nodes under /dev, the instance name from DMI, the runtime's core variables, and
the installed SDK's versions. The rules are optimum-neuron 0.4.5's own
(`optimum/neuron/utils/system.py`, `instance.py`), so a mismatch is named here, with
its fix, instead of by a failure deep inside loading.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

__all__ = ["NeuronHost", "available_cores", "read_host", "target_of"]

DMI_PRODUCT_NAME = Path("/sys/devices/virtual/dmi/id/product_name")
_DEVICE = re.compile(r"^neuron\d+$")
# Instance family -> the compilation target optimum-neuron records (inf2 runs trn1 code).
_TARGETS = {"trn1": "trn1", "trn1n": "trn1", "inf2": "trn1", "trn2": "trn2"}


@dataclass(frozen=True, slots=True)
class NeuronHost:
    """The facts an exported model is checked against; None where unknown."""

    instance: str | None  # e.g. "inf2.8xlarge"
    target: str | None  # "trn1" or "trn2": what an export for this host records
    cores: int  # NeuronCores this process may use
    optimum_neuron_version: str | None
    neuronxcc_version: str | None


def target_of(instance: str) -> str | None:
    """The compilation target of an instance name ("inf2.xlarge" -> "trn1")."""
    return _TARGETS.get(instance.strip().split(".")[0].lower())


def available_cores(devices: int, instance: str | None, environ: Mapping[str, str]) -> int:
    """NeuronCores visible to this process: 2 per device (4 on trn2), capped by
    NEURON_RT_NUM_CORES and NEURON_RT_VISIBLE_CORES ("4" is one core, "7-15" nine)."""
    if devices == 0:
        return 0
    per_device = 4 if instance is not None and instance.startswith("trn2") else 2
    cores = devices * per_device
    if environ.get("NEURON_RT_NUM_CORES", "").strip().isdigit():
        cores = min(cores, int(environ["NEURON_RT_NUM_CORES"]))
    visible = environ.get("NEURON_RT_VISIBLE_CORES", "").strip()
    if visible:
        if "-" in visible:
            start, end = visible.split("-", 1)
            cores = min(cores, int(end) - int(start) + 1)
        else:
            cores = min(cores, 1)
    return cores


def _installed(distribution: str) -> str | None:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def _neuronxcc_version() -> str | None:
    """What optimum-neuron compares an export against: `neuronxcc.__version__`."""
    try:
        import neuronxcc  # type: ignore[import-not-found]
    except ImportError:
        return _installed("neuronx-cc")
    return str(getattr(neuronxcc, "__version__", None) or _installed("neuronx-cc"))


def read_host(
    environ: Mapping[str, str],
    dev: Path = Path("/dev"),
    product_name: Path = DMI_PRODUCT_NAME,
    installed: Callable[[str], str | None] = _installed,
    neuronxcc_version: Callable[[], str | None] = _neuronxcc_version,
) -> NeuronHost:
    """The host as optimum-neuron will see it; arguments let tests describe another."""
    try:
        devices = sum(1 for path in dev.iterdir() if _DEVICE.match(path.name))
    except OSError:
        devices = 0
    try:
        instance: str | None = product_name.read_text(encoding="utf-8").strip() or None
    except OSError:
        instance = None
    return NeuronHost(
        instance=instance,
        target=target_of(instance) if instance else None,
        cores=available_cores(devices, instance, environ),
        optimum_neuron_version=installed("optimum-neuron"),
        neuronxcc_version=neuronxcc_version(),
    )
