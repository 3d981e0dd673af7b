"""The hooks a backend plugin implements. Hooks only ever gain arguments, never renames.

A plugin is one module registered under the entry-point group `tgi.backends`. It
declares the contract it implements, `TGI_CONTRACT_VERSION = 2` (a module attribute;
the manager lists any other version as broken and never calls it), and implements the
three required hooks below with `@tgi.backend.hookimpl`: `tgi_backend_probe`,
`tgi_validate_config`, `tgi_backend_create`. `tgi_backend_options` is optional.

A hookimpl may take fewer arguments than its spec names (pluggy's opt-in arguments):
`def tgi_backend_create(config, model)` keeps working now that the spec also passes
`rank` and `world_size`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import pluggy

if TYPE_CHECKING:
    from tgi.backend.contract import Backend, Capabilities, WarmupReport
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles
    from tgi.router.policies import PolicyLimits, SchedulingPolicy

PROJECT = "tgi"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

__all__ = [
    "FLOAT_DTYPES",
    "PROJECT",
    "BackendFlag",
    "BackendOptions",
    "BackendProbe",
    "hookimpl",
    "hookspec",
]

FLOAT_DTYPES = frozenset({"float32", "bfloat16", "float16"})  # what any torch device computes in


@dataclass(frozen=True, slots=True)
class BackendProbe:
    """A backend's answer to "can you run here?", cheap enough to ask at every start."""

    name: str  # what `--backend` names, e.g. "cpu"
    version: str  # the plugin's version
    available: bool  # its hardware and libraries are present
    reason: str  # why not, or what was found
    priority: int  # higher wins when no backend is named
    batching: str  # the batching policy it uses, for `tgi backends`
    emulated: bool = False  # runs on hardware other than its name says (never auto-picked)


@dataclass(frozen=True, slots=True)
class BackendFlag:
    """One setting of a backend's own, parsed and typed by the core.

    Given as `--backend-option NAME=VALUE` on the command line, or in the environment
    as `env` (default `TGI_<BACKEND>_<NAME>`, upper-cased, e.g. `TGI_CPU_ENGINE`); the
    backend reads the typed value from `config.backend_options[NAME]`.
    """

    name: str  # lower_snake_case key, e.g. "engine"
    help: str  # one line for `tgi backends --json` and error messages
    type: type[str] | type[int] | type[float] | type[bool] = str  # how VALUE parses
    default: Any = None  # the value when neither the CLI nor the environment sets it
    env: str | None = None  # its environment variable; None: TGI_<BACKEND>_<NAME>
    choices: tuple[str, ...] = ()  # allowed values (as text), () when any value parses


@dataclass(frozen=True, slots=True)
class BackendOptions:
    """What a backend accepts beyond the core's settings; fixed for the plugin's life.

    The core's flags accept TGI's full spellings (`tgi.config.QUANTIZE_CHOICES`,
    `DTYPE_CHOICES`, `KV_CACHE_DTYPE_CHOICES`); after selection, a value outside the
    chosen backend's sets is a `ConfigError` that names the installed backends offering it.
    """

    quantize: frozenset[str] = frozenset()  # --quantize methods it runs; none by default
    dtypes: frozenset[str] = FLOAT_DTYPES  # --dtype values it computes in
    kv_cache_dtypes: frozenset[str] = frozenset()  # --kv-cache-dtype values; none by default
    flags: tuple[BackendFlag, ...] = ()  # its own settings
    # What --num-shard N > 1 means for it: "ranks", the core starts one worker process
    # per rank and the backend builds its slice for the rank it is given; "internal", the
    # backend splits the model itself (Neuron's tp_degree) and maps --num-shard onto its
    # own setting in `tgi_validate_config`, one worker; "none", --num-shard > 1 is refused.
    parallelism: Literal["none", "ranks", "internal"] = "none"

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view for `tgi backends --json`."""
        return {
            "quantize": sorted(self.quantize),
            "dtypes": sorted(self.dtypes),
            "kv_cache_dtypes": sorted(self.kv_cache_dtypes),
            "parallelism": self.parallelism,
            "flags": [
                {"name": f.name, "help": f.help, "type": f.type.__name__, "env": f.env}
                for f in self.flags
            ],
        }


@hookspec
def tgi_backend_probe(environ: Mapping[str, str]) -> BackendProbe:  # type: ignore[empty-body]
    """Say who you are and whether your hardware is here. Must not load weights.

    Called for every loaded plugin at every start and every `tgi backends`, in the
    front process BEFORE worker ranks fork: it must never initialise a device runtime
    (no device context, no tensor on a device, no import of a runtime module). Count
    devices with what leaves the runtime alone: the vendor's management library, /dev
    nodes, `importlib.util.find_spec` for an SDK (`plugins/README.md` has examples);
    `tests/backend/test_probes.py` runs the in-tree probes under a guard.

    `environ` is the environment at start-up (opt-in: a hookimpl may omit it); read
    your own settings from it, never from `os.environ`.
    """
    ...


@hookspec(firstresult=True)
def tgi_backend_options() -> BackendOptions:  # type: ignore[empty-body]
    """Declare the quantize methods, dtypes, KV-cache dtypes and own flags you accept.

    Optional: a plugin without it gets `BackendOptions()` (the float dtypes, no
    quantization, no KV-cache dtype, no flags). Called once per loaded plugin right
    after its probe, so a rejected value can name the backends that offer it; like the
    probe, it must be static and touch no device.
    """
    ...


@hookspec(firstresult=True)
def tgi_validate_config(config: ServeConfig) -> ServeConfig | None:
    """Check the settings before any weight loads; called on the chosen backend only.

    Return an adjusted copy (`config.with_values("backend <name>", ...)`) or None to
    keep it; raise `tgi.errors.ConfigError` naming the flag, its source and the fix.
    """
    ...


@hookspec(firstresult=True)
def tgi_backend_create(  # type: ignore[empty-body]
    config: ServeConfig, model: ModelFiles, rank: int, world_size: int
) -> Backend:
    """Build the backend and load the weights; called on the chosen backend only.

    Called once per rank, in that rank's worker process: `rank` in [0, world_size).
    world_size is `--num-shard` for a backend whose options declare
    `parallelism="ranks"` (build rank `rank`'s slice; the rank group is
    `tgi.parallel.rank_group()`, joined before this call), else 1. `rank` and
    `world_size` are opt-in: a hookimpl that takes only `(config, model)` keeps working.
    """
    ...


@hookspec(firstresult=True)
def tgi_scheduling_policy(
    config: ServeConfig,
    capabilities: Capabilities,
    limits: PolicyLimits,
    warmup: WarmupReport,
) -> SchedulingPolicy | None:
    """Optional: a `tgi.router.policies.SchedulingPolicy` of your own, where the built-in
    continuous, static-slots and paged policies do not fit your hardware.

    Called on the chosen backend once, after warmup. Return None to use the built-in
    policy the capabilities call for. The policy then owns slots and blocks alone and
    must keep the contract's promises (see `tgi.backend.contract`).
    """
