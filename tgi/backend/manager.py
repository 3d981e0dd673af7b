"""Find backend plugins, say which can run here, and pick one.

NOTE: a plugin can never take the server down while it is being discovered. Every
entry point of the group `tgi.backends` is loaded, registered and probed inside its own
`try`; whatever goes wrong becomes a BROKEN record that `tgi backends` shows with its
error text, and the other plugins carry on. Only the chosen plugin's hooks are ever
called after the probe (`pm.subset_hook_caller`), so a second plugin's
`tgi_validate_config` never answers for the first.

Each plugin module declares the contract it implements (`TGI_CONTRACT_VERSION`); one
without it, or with another version than `tgi.backend.contract.CONTRACT_VERSION`, is
BROKEN and never registered. After its probe, each plugin says what it accepts
(`tgi_backend_options`); the chosen one's sets are enforced in `validate_config`.

`TGI_BACKENDS` restricts loading: unset loads every plugin, "cpu,neuron" loads those
entry-point names, an empty value loads none (a kill switch, as llm's LLM_LOAD_PLUGINS).
"""

from __future__ import annotations

import importlib.metadata
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any

import pluggy

from tgi.backend import hookspecs
from tgi.backend.contract import CONTRACT_VERSION, Backend
from tgi.backend.hookspecs import BackendOptions, BackendProbe
from tgi.config import ServeConfig, resolve_backend_options
from tgi.errors import BackendUnavailable, ConfigError, PluginError, TgiError

if TYPE_CHECKING:
    from tgi.backend.contract import Capabilities, WarmupReport
    from tgi.models.source import ModelFiles
    from tgi.router.policies import PolicyLimits, SchedulingPolicy

logger = logging.getLogger(__name__)

__all__ = [
    "CONTRACT_ATTRIBUTE",
    "ENTRY_POINT_GROUP",
    "REQUIRED_HOOKS",
    "BackendManager",
    "PluginRecord",
    "PluginStatus",
    "SelectedBackend",
    "discover",
    "select_backend",
]

ENTRY_POINT_GROUP = "tgi.backends"
ALLOW_LIST_ENV = "TGI_BACKENDS"
REQUIRED_HOOKS = frozenset({"tgi_backend_probe", "tgi_validate_config", "tgi_backend_create"})
CONTRACT_ATTRIBUTE = "TGI_CONTRACT_VERSION"
# (ServeConfig field, its flag, the BackendOptions set that must hold its value)
_OFFERED: tuple[tuple[str, str, str], ...] = (
    ("quantize", "--quantize", "quantize"),
    ("dtype", "--dtype", "dtypes"),
    ("kv_cache_dtype", "--kv-cache-dtype", "kv_cache_dtypes"),
)


class PluginStatus(str, Enum):
    """What discovery found out about one plugin."""

    AVAILABLE = "available"  # loaded, and its probe found the hardware
    UNAVAILABLE = "unavailable"  # loaded, but its probe says it cannot run here
    BROKEN = "broken"  # import, registration or probe failed
    DISABLED = "disabled"  # left out by TGI_BACKENDS, never imported


@dataclass(frozen=True, slots=True)
class PluginRecord:
    """One discovered entry point and what became of it."""

    name: str  # entry-point name: what --backend and TGI_BACKENDS name
    value: str  # entry-point target, e.g. "tgi_backend_cpu.plugin"
    distribution: str | None  # the installed distribution that declares it
    distribution_version: str | None
    status: PluginStatus
    probe: BackendProbe | None = None  # the probe's answer, when it was probed
    reason: str = ""  # why unavailable, broken or disabled; what was found otherwise
    options: BackendOptions | None = None  # what it accepts, when it was probed

    @property
    def version(self) -> str | None:
        """The plugin's own version when it answered, else its distribution's."""
        return self.probe.version if self.probe is not None else self.distribution_version

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view for `tgi backends --json`."""
        probe = self.probe
        return {
            "name": self.name,
            "version": self.version,
            "distribution": self.distribution,
            "distribution_version": self.distribution_version,
            "module": self.value,
            "status": self.status.value,
            "available": self.status is PluginStatus.AVAILABLE,
            "reason": self.reason,
            "priority": probe.priority if probe is not None else None,
            "batching": probe.batching if probe is not None else None,
            "emulated": probe.emulated if probe is not None else None,
            "options": self.options.to_json() if self.options is not None else None,
        }


def _allow_list(environ: Mapping[str, str]) -> frozenset[str] | None:
    """None when TGI_BACKENDS is unset (load all), else the names it allows."""
    raw = environ.get(ALLOW_LIST_ENV)
    if raw is None:
        return None
    return frozenset(part.strip() for part in raw.split(",") if part.strip())


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _record_of(
    entry_point: Any,
    status: PluginStatus,
    reason: str,
    probe: BackendProbe | None = None,
    options: BackendOptions | None = None,
) -> PluginRecord:
    dist = getattr(entry_point, "dist", None)  # None for an entry point outside a distribution
    return PluginRecord(
        name=entry_point.name,
        value=entry_point.value,
        distribution=dist.metadata["Name"] if dist is not None else None,
        distribution_version=dist.version if dist is not None else None,
        status=status,
        probe=probe,
        reason=reason,
        options=options,
    )


def _contract_problem(plugin: object) -> str | None:
    """None when `plugin` declares this core's contract version; else why it is refused."""
    declared = getattr(plugin, CONTRACT_ATTRIBUTE, None)
    if declared is None:
        return (
            f"implements backend contract v1 (it declares no {CONTRACT_ATTRIBUTE}); this "
            f"tgi-server speaks v{CONTRACT_VERSION} (upgrade the plugin)"
        )
    if not isinstance(declared, int) or isinstance(declared, bool):
        return f"{CONTRACT_ATTRIBUTE} must be an int, got {declared!r}"
    if declared != CONTRACT_VERSION:
        upgrade = "the plugin" if declared < CONTRACT_VERSION else "tgi-server"
        return (
            f"implements backend contract v{declared}; this tgi-server speaks "
            f"v{CONTRACT_VERSION} (upgrade {upgrade})"
        )
    return None


def _rejection(record: PluginRecord) -> str:
    """Why a plugin was not chosen: `name: status (reason)`."""
    text = f"{record.name}: {record.status.value}"
    if record.status is PluginStatus.AVAILABLE and record.probe and record.probe.emulated:
        text += " but emulated, so only used when named with --backend"
    return text + (f" ({record.reason})" if record.reason else "")


class BackendManager:
    """The loaded plugins of one process; build it with `from_environ`."""

    def __init__(self) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self._records: list[PluginRecord] = []
        self._by_name: dict[str, PluginRecord] = {}  # the first record of each name
        self._environ: dict[str, str] = {}  # what probes read their settings from

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> BackendManager:
        """Discover, load and probe every plugin TGI_BACKENDS allows."""
        manager = cls()
        manager._environ = dict(environ)
        allowed = _allow_list(environ)
        found = sorted(
            importlib.metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name
        )
        for entry_point in found:
            first = manager._by_name.get(entry_point.name)
            if first is not None:
                why = f"entry-point name also declared by {first.distribution}"
                record = _record_of(entry_point, PluginStatus.BROKEN, why)
            elif allowed is not None and entry_point.name not in allowed:
                why = f"not in {ALLOW_LIST_ENV}={environ[ALLOW_LIST_ENV]!r}"
                record = _record_of(entry_point, PluginStatus.DISABLED, why)
            else:
                record = manager._load(entry_point)
            manager._add(record)
        for name in sorted((allowed or frozenset()) - {ep.name for ep in found}):
            logger.warning("%s names %r, but no installed plugin declares it", ALLOW_LIST_ENV, name)
        return manager

    @property
    def records(self) -> tuple[PluginRecord, ...]:
        """Every discovered plugin, sorted by entry-point name."""
        return tuple(self._records)

    def _add(self, record: PluginRecord) -> None:
        if record.status is PluginStatus.BROKEN:
            where = record.distribution or record.value
            logger.warning(
                "backend plugin %r (%s) is broken: %s", record.name, where, record.reason
            )
        self._records.append(record)
        self._by_name.setdefault(record.name, record)

    def _load(self, entry_point: Any) -> PluginRecord:
        """Import, register, validate and probe one plugin; any failure makes it BROKEN."""
        name = entry_point.name
        try:
            plugin = entry_point.load()
        except Exception as exc:  # a missing SDK or a bug in the plugin must not stop us
            logger.debug("importing plugin %r failed", name, exc_info=True)
            return _record_of(
                entry_point, PluginStatus.BROKEN, reason=f"import failed: {_describe(exc)}"
            )
        problem = _contract_problem(plugin) or self._register(name, plugin)
        if problem is not None:
            return _record_of(entry_point, PluginStatus.BROKEN, reason=problem)
        try:
            hook = "tgi_backend_probe"
            probe = self._probe(name)
            hook = "tgi_backend_options"
            options = self._options(name)
        except Exception as exc:
            self.pm.unregister(name=name)
            logger.debug("calling %s of plugin %r failed", hook, name, exc_info=True)
            return _record_of(
                entry_point, PluginStatus.BROKEN, reason=f"{hook} failed: {_describe(exc)}"
            )
        status = PluginStatus.AVAILABLE if probe.available else PluginStatus.UNAVAILABLE
        return _record_of(entry_point, status, probe=probe, reason=probe.reason, options=options)

    def _register(self, name: str, plugin: object) -> str | None:
        """Register and validate one plugin; on failure unregister it and say why."""
        try:
            self.pm.register(plugin, name=name)  # checks each hookimpl's arguments
        except Exception as exc:  # PluginValidationError, or ValueError for a duplicate
            return f"registration failed: {_describe(exc)}"
        try:
            self.pm.check_pending()  # earlier plugins passed, so a failure is this one's
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(plugin)
            return f"registration failed: {_describe(exc)}"
        implemented = {caller.name for caller in self.pm.get_hookcallers(plugin) or ()}
        missing = sorted(REQUIRED_HOOKS - implemented)
        if missing:
            self.pm.unregister(plugin)
            if not implemented:
                return (
                    "implements no tgi hooks (decorate them with tgi.backend.hookimpl); "
                    f"needs {', '.join(sorted(REQUIRED_HOOKS))}"
                )
            return f"does not implement {', '.join(missing)}"
        return None

    def _hook(self, hook_name: str, plugin_name: str) -> Any:
        """A caller of `hook_name` that reaches the plugin `plugin_name` only."""
        others = [plugin for name, plugin in self.pm.list_name_plugin() if name != plugin_name]
        return self.pm.subset_hook_caller(hook_name, remove_plugins=others)

    def _probe(self, name: str) -> BackendProbe:
        answers = self._hook("tgi_backend_probe", name)(environ=self._environ)
        if len(answers) != 1 or not isinstance(answers[0], BackendProbe):
            raise PluginError(f"expected one BackendProbe, got {answers!r}", plugin=name)
        probe: BackendProbe = answers[0]
        if probe.name != name:
            raise PluginError(
                f"probe names itself {probe.name!r}, entry point says {name!r}", plugin=name
            )
        return probe

    def _options(self, name: str) -> BackendOptions:
        answers = self._hook("tgi_backend_options", name)()
        if answers is None:  # the optional hook is not implemented
            return BackendOptions()
        if not isinstance(answers, BackendOptions):
            raise PluginError(f"expected a BackendOptions, got {answers!r}", plugin=name)
        return answers

    def offering(self, field_name: str, value: str) -> list[str]:
        """Names of the loaded plugins whose options accept `value` for `field_name`."""
        attribute = {field: attr for field, _, attr in _OFFERED}[field_name]
        return [
            record.name
            for record in self.records
            if record.options is not None and value in getattr(record.options, attribute)
        ]

    def select_backend(self, config: ServeConfig) -> SelectedBackend:
        """The backend `config.backend` names, else the best available one; raise otherwise."""
        record = self._named(config) if config.backend else self._auto()
        for other in self.records:
            if other.name != record.name:
                logger.info("backend not chosen: %s", _rejection(other))
        return SelectedBackend(record, self)

    def _named(self, config: ServeConfig) -> PluginRecord:
        name, source = config.backend, config.source_of("backend")
        record = self._by_name.get(name or "")
        if record is None:
            known = ", ".join(sorted(self._by_name)) or "none installed"
            raise ConfigError(
                f"--backend {name!r} ({source}) names no installed backend plugin; known: {known}"
            )
        if record.status is PluginStatus.DISABLED:
            raise ConfigError(
                f"--backend {name!r} ({source}) is {record.reason}; add it "
                f"to {ALLOW_LIST_ENV} or unset that variable"
            )
        if record.status is PluginStatus.BROKEN:
            raise PluginError(
                f"chosen by --backend ({source}) but broken: {record.reason}", plugin=record.name
            )
        if record.status is PluginStatus.UNAVAILABLE:
            raise BackendUnavailable(
                f"backend {name!r} ({source}) cannot run here: {record.reason}"
            )
        logger.info("using backend %r: named by --backend (%s); %s", name, source, record.reason)
        return record

    def _auto(self) -> PluginRecord:
        candidates = [
            r
            for r in self.records
            if r.status is PluginStatus.AVAILABLE and r.probe is not None and not r.probe.emulated
        ]
        if not candidates:
            why = "; ".join(_rejection(r) for r in self.records) or (
                f"no plugin of entry-point group {ENTRY_POINT_GROUP!r} is installed"
            )
            raise BackendUnavailable(f"no backend can run here: {why}")
        top = max(r.probe.priority for r in candidates if r.probe is not None)
        best = [r for r in candidates if r.probe is not None and r.probe.priority == top]
        if len(best) > 1:
            names = ", ".join(r.name for r in best)
            raise ConfigError(
                f"several backends are available at priority {top}: {names}; "
                "pass --backend (or TGI_BACKEND) to choose one"
            )
        logger.info(
            "using backend %r: available with the highest priority (%d); %s",
            best[0].name,
            top,
            best[0].reason,
        )
        return best[0]


class SelectedBackend:
    """The chosen plugin; its hooks are the only ones called from here on."""

    def __init__(self, record: PluginRecord, manager: BackendManager) -> None:
        self.record = record
        self.name = record.name
        self._manager = manager

    def _call(self, hook_name: str, **kwargs: Any) -> Any:
        try:
            return self._manager._hook(hook_name, self.name)(**kwargs)
        except TgiError:
            raise  # the plugin's own verdict (ConfigError naming a flag, BackendError)
        except Exception as exc:
            raise PluginError(f"{hook_name} failed: {_describe(exc)}", plugin=self.name) from exc

    @property
    def options(self) -> BackendOptions:
        """What the chosen plugin accepts (`tgi_backend_options`)."""
        return self.record.options or BackendOptions()

    def validate_config(self, config: ServeConfig) -> ServeConfig:
        """The config after the core's checks against this backend's options, then the
        plugin's own: unchanged, or an adjusted copy with `backend_options` filled.

        Raises `ConfigError` for a --quantize, --dtype or --kv-cache-dtype value the
        backend does not offer (naming where it came from and the installed backends
        that do offer it) and for a bad or unknown `--backend-option`.
        """
        self._check_offered(config)
        self._check_parallelism(config)
        config = resolve_backend_options(config, self.name, self.options.flags)
        adjusted = self._call("tgi_validate_config", config=config)
        if adjusted is None:
            return config
        if not isinstance(adjusted, ServeConfig):
            raise PluginError(
                f"tgi_validate_config returned {type(adjusted).__name__}, "
                "expected a ServeConfig or None",
                plugin=self.name,
            )
        for field_name, flag, attribute in _OFFERED:
            value = getattr(adjusted, field_name)
            if value is not None and value not in getattr(self.options, attribute):
                raise PluginError(
                    f"tgi_validate_config set {flag} {value}, which its "
                    f"tgi_backend_options does not declare",
                    plugin=self.name,
                )
        return adjusted

    def _check_parallelism(self, config: ServeConfig) -> None:
        if config.num_shard > 1 and self.options.parallelism == "none":
            raise ConfigError(
                f"--num-shard {config.num_shard} ({config.source_of('num_shard')}): backend "
                f"{self.name!r} serves from one device and does not split a model over "
                "several; leave --num-shard at 1"
            )

    def _check_offered(self, config: ServeConfig) -> None:
        for field_name, flag, attribute in _OFFERED:
            value = getattr(config, field_name)
            offered: frozenset[str] = getattr(self.options, attribute)
            if value is None or value in offered:
                continue
            others = [n for n in self._manager.offering(field_name, value) if n != self.name]
            raise ConfigError(
                f"{flag} {value} ({config.source_of(field_name)}) is not offered by backend "
                f"{self.name!r} (it offers: {', '.join(sorted(offered)) or 'none'}); "
                + (
                    f"installed backends that offer it: {', '.join(others)}"
                    if others
                    else "no installed backend offers it"
                )
            )

    def scheduling_policy(
        self,
        config: ServeConfig,
        capabilities: Capabilities,
        limits: PolicyLimits,
        warmup: WarmupReport,
    ) -> SchedulingPolicy | None:
        """The plugin's own scheduling policy (`tgi_scheduling_policy`), or None."""
        return self._call(  # type: ignore[no-any-return]
            "tgi_scheduling_policy",
            config=config,
            capabilities=capabilities,
            limits=limits,
            warmup=warmup,
        )

    def create_backend(
        self, config: ServeConfig, model: ModelFiles, rank: int = 0, world_size: int = 1
    ) -> Backend:
        """Build the backend for `rank` of `world_size`, checking the result really is one."""
        backend = self._call(
            "tgi_backend_create", config=config, model=model, rank=rank, world_size=world_size
        )
        if not isinstance(backend, Backend):
            raise PluginError(
                f"tgi_backend_create returned {type(backend).__name__}, which "
                "does not implement tgi.backend.Backend",
                plugin=self.name,
            )
        return backend


def discover(environ: Mapping[str, str]) -> list[PluginRecord]:
    """Every plugin and its status, for `tgi backends`."""
    return list(BackendManager.from_environ(environ).records)


def select_backend(config: ServeConfig) -> SelectedBackend:
    """Discover plugins under `config.environ` and pick the one to serve with."""
    return BackendManager.from_environ(config.environ).select_backend(config)
