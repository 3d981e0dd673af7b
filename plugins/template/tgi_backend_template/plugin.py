"""The three hooks tgi calls on a backend plugin, found through the `tgi.backends` entry point.

tgi imports this module when it starts (unless TGI_BACKENDS leaves it out), registers
it with pluggy, checks that all three hooks are here with the hookspecs' argument
names, and calls `tgi_backend_probe` at once. The other two hooks run only when this
backend is chosen: by `--backend template`, or automatically when it is available and has
the highest priority.

Keep this module cheap to import: import your device SDK inside the probe (or guard it),
so a missing SDK becomes an "unavailable" line in `tgi backends` rather than a broken
plugin, and never load weights before `tgi_backend_create`.
"""

from __future__ import annotations

import logging
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING

from tgi.backend.hookspecs import FLOAT_DTYPES, BackendOptions, BackendProbe, hookimpl

if TYPE_CHECKING:
    from tgi.backend.contract import Backend
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles

logger = logging.getLogger(__name__)

__all__ = [
    "NAME",
    "PRIORITY",
    "TGI_CONTRACT_VERSION",
    "tgi_backend_create",
    "tgi_backend_options",
    "tgi_backend_probe",
    "tgi_validate_config",
]

# The backend contract this module implements; tgi refuses (lists as broken) a plugin
# that declares another version, so bump it only when you port to a new contract.
TGI_CONTRACT_VERSION = 2

NAME = "template"  # must equal the entry-point name in pyproject.toml
DISTRIBUTION = "tgi-backend-template"
# Higher wins when --backend names none. The CPU backend uses 10; a real accelerator
# should use more, so it is picked wherever its hardware is present.
PRIORITY = 0


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:  # running from a source checkout that is not installed
        return "0+unknown"


@hookimpl
def tgi_backend_probe() -> BackendProbe:
    """Say whether the hardware is here. Called at every start: no weights, no long waits.

    Replace the check below with yours, e.g. import your SDK and count devices:

        try:
            import torch_foo
        except ImportError as exc:
            return _probe(False, f"torch_foo is not installed: {exc}")
        count = torch_foo.device_count()
        return _probe(count > 0, f"{count} foo devices" if count else "no foo device found")
    """
    return _probe(False, "template: replace with your hardware check")


def _probe(available: bool, reason: str) -> BackendProbe:
    return BackendProbe(
        name=NAME,
        version=_version(),
        available=available,
        reason=reason,
        priority=PRIORITY,
        batching="continuous",  # what `tgi backends` shows; match your Capabilities
    )


@hookimpl
def tgi_backend_options() -> BackendOptions:
    """Say which --quantize, --dtype and --kv-cache-dtype values you run, and your flags.

    tgi rejects any other value before a weight loads, naming the installed backends
    that do offer it. Declare a flag of your own like this; users then set it with
    `--backend-option max_slots=8` or `TGI_TEMPLATE_MAX_SLOTS=8`, and you read the typed
    value from `config.backend_options["max_slots"]`:

        flags=(BackendFlag("max_slots", "rows the device runs at once", type=int, default=4),)
    """
    return BackendOptions(
        quantize=frozenset(),  # no quantization
        dtypes=FLOAT_DTYPES,  # the default, spelled out: float32, bfloat16, float16
        kv_cache_dtypes=frozenset(),  # no KV cache to store
    )


@hookimpl
def tgi_validate_config(config: ServeConfig) -> ServeConfig | None:
    """Check settings before any weight loads; return an adjusted copy or None.

    Never mutate `config`: derive a copy with `config.with_values("backend template", ...)`
    so `tgi config` shows where each value came from. Reject what your hardware cannot
    do with `tgi.errors.ConfigError`, naming the flag, its source and the fix, e.g.

        if config.max_batch_size is not None and config.max_batch_size > 8:
            raise ConfigError(
                f"--max-batch-size {config.max_batch_size} "
                f"({config.source_of('max_batch_size')}) is above the 8 slots foo compiles")

    Read your own settings from `config.environ` (never `os.environ`).
    """
    if config.dtype is None:
        # Say which dtype we compute in, so it is logged and shown instead of "None".
        return config.with_values(f"backend {NAME}", dtype="float32")
    return None


@hookimpl
def tgi_backend_create(config: ServeConfig, model: ModelFiles) -> Backend:
    """Load the weights and return the backend; called once, on the chosen backend only."""
    from tgi_backend_template.backend import TemplateBackend  # torch loads only when chosen

    return TemplateBackend.from_config(config, model)
