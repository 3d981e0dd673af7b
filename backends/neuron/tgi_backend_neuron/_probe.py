"""Is there Neuron hardware here, and does the Neuron SDK import? Cheap, no weights.

Both checks take what they look at as arguments (the /dev directory, the import
function), so tests hand in a fake /dev and a failing import instead of needing an
Inferentia instance.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

logger = logging.getLogger(__name__)

__all__ = ["SDK_MODULE", "HardwareCheck", "check_hardware", "find_devices"]

DEV = Path("/dev")
SDK_MODULE = "optimum.neuron"
INSTALL_HINT = (
    "install the backend's extra, `pip install 'tgi-backend-neuron[neuron]'`, with AWS's "
    "Neuron package index configured (the Neuron SDK wheels are not on PyPI)"
)


@dataclass(frozen=True, slots=True)
class HardwareCheck:
    """What the probe found; `reason` names what is missing, or what was found."""

    available: bool
    devices: tuple[str, ...]  # e.g. ("neuron0", "neuron1")
    reason: str


def find_devices(dev: Path = DEV) -> tuple[str, ...]:
    """Names of the Neuron device nodes under `dev` (neuron0, neuron1, ...)."""
    try:
        return tuple(sorted(path.name for path in dev.glob("neuron*")))
    except OSError as exc:
        logger.debug("cannot list %s: %s", dev, exc)
        return ()


def _sdk_problem(import_module: Callable[[str], ModuleType]) -> str | None:
    """None when the SDK imports; else what went wrong, in one line."""
    try:
        import_module(SDK_MODULE)
    except ImportError as exc:
        return f"the Neuron SDK ({SDK_MODULE}) does not import ({exc}); {INSTALL_HINT}"
    except Exception as exc:  # a broken SDK install raises anything; report, don't crash
        return f"the Neuron SDK ({SDK_MODULE}) failed to import: {type(exc).__name__}: {exc}"
    return None


def _sdk_installed() -> bool:
    try:
        return importlib.util.find_spec(SDK_MODULE) is not None
    except ImportError:  # the parent package `optimum` is missing
        return False


def check_hardware(
    dev: Path = DEV,
    import_module: Callable[[str], ModuleType] = importlib.import_module,
    sdk_installed: Callable[[], bool] = _sdk_installed,
) -> HardwareCheck:
    """Available only where /dev/neuron* exists and the SDK imports; else say what is missing.

    Without devices the SDK is only looked up, not imported (importing it takes seconds).
    """
    devices = find_devices(dev)
    missing: list[str] = []
    if not devices:
        missing.append(
            f"no Neuron devices ({dev}/neuron*): this is not an Inferentia2/Trainium "
            "instance, or the Neuron driver (aws-neuronx-dkms) is missing"
        )
        if not sdk_installed():
            missing.append(f"the Neuron SDK ({SDK_MODULE}) is not installed; {INSTALL_HINT}")
    else:
        problem = _sdk_problem(import_module)
        if problem:
            missing.append(problem)
    if missing:
        return HardwareCheck(False, devices, "; ".join(missing))
    return HardwareCheck(True, devices, f"{len(devices)} Neuron device(s): {', '.join(devices)}")
