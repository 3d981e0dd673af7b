"""The plugin manager: discovery, validation at load time, the allow-list and selection.

Discovery runs against fake entry points (`importlib.metadata.entry_points` is
monkeypatched, as pluggy's own tests do with `distributions`), so these tests see
exactly the plugins they declare, whatever is installed in the venv.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from tgi.backend.contract import (
    Batching,
    Capabilities,
    KVCapacity,
    KvLayout,
    KVUsage,
    Limits,
    StepOutput,
    StepPlan,
    WarmupReport,
)
from tgi.backend.hookspecs import BackendFlag, BackendOptions, BackendProbe, hookimpl
from tgi.backend.manager import BackendManager, PluginRecord, PluginStatus, discover
from tgi.config import ServeConfig, resolve_config
from tgi.errors import BackendUnavailable, ConfigError, PluginError

# ---------------------------------------------------------------- fakes


class FakeBackend:
    """The smallest object that satisfies the `Backend` Protocol; never stepped."""

    capabilities = Capabilities(batching=Batching.CONTINUOUS, kv_layout=KvLayout.PER_ROW)

    def warmup(self, limits: Limits) -> WarmupReport:
        return WarmupReport(KVCapacity(total_tokens=limits.max_total_tokens, bytes_per_token=1))

    def step(self, plan: StepPlan) -> StepOutput:
        raise NotImplementedError

    def release(self, seq_ids: Sequence[int]) -> None:
        return None

    def kv_usage(self) -> KVUsage:
        return KVUsage(seq_ids=frozenset(), used_tokens=0, capacity_tokens=0)

    def health(self) -> None:
        return None

    def close(self) -> None:
        return None


class FakePlugin:
    """A contract-v2 plugin object with all three hooks; records which of its hooks ran."""

    TGI_CONTRACT_VERSION = 2

    def __init__(
        self,
        name: str,
        *,
        available: bool = True,
        priority: int = 10,
        emulated: bool = False,
        reason: str = "",
        created: object | None = None,
        adjust: dict[str, Any] | None = None,
    ) -> None:
        self.name = name
        self.probe = BackendProbe(
            name=name,
            version="1.2.3",
            available=available,
            reason=reason or ("found it" if available else "no device"),
            priority=priority,
            batching="continuous",
            emulated=emulated,
        )
        self.created = FakeBackend() if created is None else created
        self.adjust = adjust
        self.calls: list[str] = []

    @hookimpl
    def tgi_backend_probe(self) -> BackendProbe:
        self.calls.append("probe")
        return self.probe

    @hookimpl
    def tgi_validate_config(self, config: ServeConfig) -> ServeConfig | None:
        self.calls.append("validate")
        if self.adjust is None:
            return None
        return config.with_values(f"backend {self.name}", **self.adjust)

    @hookimpl
    def tgi_backend_create(self, config: ServeConfig, model: object) -> object:
        self.calls.append("create")
        return self.created


@dataclass(frozen=True)
class FakeDist:
    """What the manager reads of an `importlib.metadata.Distribution`."""

    name: str
    version: str

    @property
    def metadata(self) -> dict[str, str]:
        return {"Name": self.name}


@dataclass(frozen=True)
class FakeEntryPoint:
    """An entry point whose `load()` returns `target`, or raises it when it is an error."""

    name: str
    target: object
    dist: FakeDist | None
    group: str = "tgi.backends"
    loads: list[str] = field(default_factory=list, compare=False)

    @property
    def value(self) -> str:
        return f"fake_{self.name}.plugin"

    def load(self) -> object:
        self.loads.append(self.name)
        if isinstance(self.target, BaseException):
            raise self.target
        return self.target


def entry_point(name: str, target: object) -> FakeEntryPoint:
    """An entry point declared by the fake distribution `tgi-backend-<name>` 1.2.3."""
    return FakeEntryPoint(name, target, FakeDist(f"tgi-backend-{name}", "1.2.3"))


@pytest.fixture
def install(monkeypatch: pytest.MonkeyPatch):
    """`install(*entry_points)` makes them the only ones importlib.metadata reports."""

    def _install(*entry_points: FakeEntryPoint) -> None:
        def fake_entry_points(*, group: str) -> list[FakeEntryPoint]:
            return [ep for ep in entry_points if ep.group == group]

        monkeypatch.setattr("importlib.metadata.entry_points", fake_entry_points)

    return _install


def manager_with(install, *plugins: FakePlugin, environ: dict[str, str] | None = None):
    install(*(entry_point(plugin.name, plugin) for plugin in plugins))
    return BackendManager.from_environ(environ or {})


def by_name(records: Sequence[PluginRecord]) -> dict[str, PluginRecord]:
    return {record.name: record for record in records}


def config_naming(backend: str | None) -> ServeConfig:
    return resolve_config({}, {"TGI_BACKEND": backend} if backend else {})


# ---------------------------------------------------------------- discovery


def test_discovery_records_distribution_version_and_probe(install) -> None:
    plugin = FakePlugin("alpha", reason="2 devices")
    install(entry_point("alpha", plugin))

    [record] = discover({})

    assert record == PluginRecord(
        name="alpha",
        value="fake_alpha.plugin",
        distribution="tgi-backend-alpha",
        distribution_version="1.2.3",
        status=PluginStatus.AVAILABLE,
        probe=plugin.probe,
        reason="2 devices",
        options=BackendOptions(),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        record.status = PluginStatus.BROKEN  # type: ignore[misc]


def test_unavailable_probe_is_recorded_with_its_reason(install) -> None:
    install(entry_point("neuron", FakePlugin("neuron", available=False, reason="no /dev/neuron0")))

    [record] = discover({})

    assert record.status is PluginStatus.UNAVAILABLE
    assert record.reason == "no /dev/neuron0"


def test_plugin_that_raises_on_import_is_broken_and_others_still_load(install, caplog) -> None:
    install(
        entry_point("bad", RuntimeError("kaboom in module body")),
        entry_point("good", FakePlugin("good")),
    )

    with caplog.at_level(logging.WARNING, logger="tgi.backend.manager"):
        records = by_name(discover({}))

    assert records["bad"].status is PluginStatus.BROKEN
    assert records["bad"].reason == "import failed: RuntimeError: kaboom in module body"
    assert records["bad"].distribution == "tgi-backend-bad"
    assert records["bad"].distribution_version == "1.2.3"
    assert records["bad"].probe is None
    assert records["good"].status is PluginStatus.AVAILABLE
    assert "backend plugin 'bad' (tgi-backend-bad) is broken" in caplog.text


def test_missing_sdk_import_error_is_broken_not_fatal(install) -> None:
    missing = ModuleNotFoundError("No module named 'neuronxcc'", name="neuronxcc")
    install(entry_point("neuron", missing))

    [record] = discover({})

    assert record.status is PluginStatus.BROKEN
    assert record.reason == "import failed: ModuleNotFoundError: No module named 'neuronxcc'"


def test_probe_that_raises_is_broken(install) -> None:
    class Exploding(FakePlugin):
        @hookimpl
        def tgi_backend_probe(self) -> BackendProbe:
            raise OSError("driver version mismatch")

    install(entry_point("gaudi", Exploding("gaudi")), entry_point("cpu", FakePlugin("cpu")))

    records = by_name(discover({}))

    assert records["gaudi"].status is PluginStatus.BROKEN
    assert records["gaudi"].reason == "tgi_backend_probe failed: OSError: driver version mismatch"
    assert records["cpu"].status is PluginStatus.AVAILABLE


def test_probe_answering_the_wrong_type_or_name_is_broken(install) -> None:
    class NotAProbe(FakePlugin):
        @hookimpl
        def tgi_backend_probe(self) -> BackendProbe:
            return {"name": "dicty"}  # type: ignore[return-value]

    install(
        entry_point("dicty", NotAProbe("dicty")),
        entry_point("renamed", FakePlugin("other-name")),
    )

    records = by_name(discover({}))

    assert records["dicty"].status is PluginStatus.BROKEN
    assert "expected one BackendProbe, got [{'name': 'dicty'}]" in records["dicty"].reason
    assert records["renamed"].status is PluginStatus.BROKEN
    assert "probe names itself 'other-name', entry point says 'renamed'" in (
        records["renamed"].reason
    )


def test_module_without_hooks_is_broken_with_a_hint(install) -> None:
    class Undecorated:
        TGI_CONTRACT_VERSION = 2

        def tgi_backend_probe(self) -> None:  # forgot @hookimpl
            return None

    install(entry_point("plain", Undecorated()))

    [record] = discover({})

    assert record.status is PluginStatus.BROKEN
    assert record.reason == (
        "implements no tgi hooks (decorate them with tgi.backend.hookimpl); needs "
        "tgi_backend_create, tgi_backend_probe, tgi_validate_config"
    )


def test_module_missing_one_hook_is_broken(install) -> None:
    class NoCreate:
        TGI_CONTRACT_VERSION = 2

        @hookimpl
        def tgi_backend_probe(self) -> BackendProbe:
            return FakePlugin("half").probe

        @hookimpl
        def tgi_validate_config(self, config: ServeConfig) -> None:
            return None

    install(entry_point("half", NoCreate()))

    [record] = discover({})

    assert record.status is PluginStatus.BROKEN
    assert record.reason == "does not implement tgi_backend_create"


def test_hookimpl_with_an_unknown_argument_is_broken(install) -> None:
    class WrongSignature(FakePlugin):
        @hookimpl
        def tgi_backend_create(self, config: ServeConfig, model: object, device: str) -> object:
            return None

    install(
        entry_point("wrongsig", WrongSignature("wrongsig")), entry_point("ok", FakePlugin("ok"))
    )

    records = by_name(discover({}))

    assert records["wrongsig"].status is PluginStatus.BROKEN
    assert records["wrongsig"].reason.startswith("registration failed: PluginValidationError")
    assert "device" in records["wrongsig"].reason
    assert records["ok"].status is PluginStatus.AVAILABLE


def test_hookimpl_for_an_unknown_hook_is_broken(install) -> None:
    class Misspelled(FakePlugin):
        @hookimpl
        def tgi_backend_creat(self, config: ServeConfig) -> None:
            return None

    install(entry_point("typo", Misspelled("typo")), entry_point("ok", FakePlugin("ok")))
    manager = BackendManager.from_environ({})

    records = by_name(manager.records)
    assert records["typo"].status is PluginStatus.BROKEN
    assert "unknown hook 'tgi_backend_creat'" in records["typo"].reason
    # the broken plugin was unregistered, so later validation passes for the rest
    manager.pm.check_pending()
    assert manager.pm.get_plugin("typo") is None


def test_broken_plugin_hooks_are_never_called_again(install) -> None:
    class BrokenAfterProbe(FakePlugin):
        @hookimpl
        def tgi_backend_probe(self) -> BackendProbe:
            raise RuntimeError("probe bug")

    broken = BrokenAfterProbe("broken")
    good = FakePlugin("good")
    install(entry_point("broken", broken), entry_point("good", good))

    manager = BackendManager.from_environ({})
    selected = manager.select_backend(config_naming(None))
    selected.validate_config(config_naming(None))

    assert selected.name == "good"
    assert manager.pm.get_plugin("broken") is None
    assert broken.calls == []
    assert good.calls == ["probe", "validate"]


# ---------------------------------------------------------------- TGI_BACKENDS


def test_allow_list_loads_only_named_plugins(install) -> None:
    skipped = entry_point("neuron", FakePlugin("neuron"))
    install(entry_point("cpu", FakePlugin("cpu")), skipped, entry_point("cuda", FakePlugin("cuda")))

    records = by_name(discover({"TGI_BACKENDS": "cpu, cuda"}))

    assert records["cpu"].status is PluginStatus.AVAILABLE
    assert records["cuda"].status is PluginStatus.AVAILABLE
    assert records["neuron"].status is PluginStatus.DISABLED
    assert records["neuron"].reason == "not in TGI_BACKENDS='cpu, cuda'"
    assert records["neuron"].distribution == "tgi-backend-neuron"
    assert skipped.loads == []  # never imported


def test_allow_list_warns_about_names_nothing_declares(install, caplog) -> None:
    install(entry_point("cpu", FakePlugin("cpu")))

    with caplog.at_level(logging.WARNING, logger="tgi.backend.manager"):
        discover({"TGI_BACKENDS": "cpu,cuda"})

    assert "TGI_BACKENDS names 'cuda', but no installed plugin declares it" in caplog.text


def test_empty_allow_list_is_a_kill_switch(install) -> None:
    first, second = entry_point("cpu", FakePlugin("cpu")), entry_point("cuda", FakePlugin("cuda"))
    install(first, second)
    manager = BackendManager.from_environ({"TGI_BACKENDS": ""})

    assert [record.status for record in manager.records] == [PluginStatus.DISABLED] * 2
    assert first.loads == second.loads == []
    with pytest.raises(BackendUnavailable) as raised:
        manager.select_backend(config_naming(None))
    assert str(raised.value) == (
        "no backend can run here: cpu: disabled (not in TGI_BACKENDS=''); "
        "cuda: disabled (not in TGI_BACKENDS='')"
    )


def test_naming_a_disabled_backend_says_how_to_enable_it(install) -> None:
    manager = manager_with(install, FakePlugin("cpu"), environ={"TGI_BACKENDS": "cuda"})

    with pytest.raises(ConfigError) as raised:
        manager.select_backend(config_naming("cpu"))

    assert str(raised.value) == (
        "--backend 'cpu' (env TGI_BACKEND) is not in TGI_BACKENDS='cuda'; add it to "
        "TGI_BACKENDS or unset that variable"
    )


# ---------------------------------------------------------------- selection


def test_select_by_name_calls_only_that_plugins_hooks(install, caplog) -> None:
    cpu = FakePlugin("cpu", priority=0)
    cuda = FakePlugin("cuda", priority=100, adjust={"max_batch_size": 8})
    manager = manager_with(install, cpu, cuda)
    config = config_naming("cpu")

    with caplog.at_level(logging.INFO, logger="tgi.backend.manager"):
        selected = manager.select_backend(config)
    validated = selected.validate_config(config)
    backend = selected.create_backend(validated, model=object())

    assert selected.record.name == "cpu"
    assert validated is config  # cpu returned None: keep the config as it was
    assert isinstance(backend, FakeBackend)
    assert cpu.calls == ["probe", "validate", "create"]
    assert cuda.calls == ["probe"]
    assert "using backend 'cpu': named by --backend (env TGI_BACKEND); found it" in caplog.text
    assert "backend not chosen: cuda: available (found it)" in caplog.text


def test_validate_config_returns_the_plugins_adjusted_copy(install) -> None:
    manager = manager_with(install, FakePlugin("cuda", adjust={"max_batch_size": 8}))
    config = config_naming(None)

    adjusted = manager.select_backend(config).validate_config(config)

    assert adjusted.max_batch_size == 8
    assert adjusted.source_of("max_batch_size") == "backend cuda"
    assert config.max_batch_size is None  # the original is untouched


def test_validate_config_lets_a_config_error_through_and_wraps_other_errors(install) -> None:
    class Strict(FakePlugin):
        @hookimpl
        def tgi_validate_config(self, config: ServeConfig) -> None:
            raise ConfigError("--max-batch-size (default) must be set for static slots")

    class Buggy(FakePlugin):
        @hookimpl
        def tgi_validate_config(self, config: ServeConfig) -> None:
            raise KeyError("oops")

    manager = manager_with(install, Strict("neuron"), Buggy("gaudi"))

    with pytest.raises(ConfigError, match=r"^--max-batch-size \(default\) must be set"):
        manager.select_backend(config_naming("neuron")).validate_config(config_naming("neuron"))
    with pytest.raises(PluginError) as raised:
        manager.select_backend(config_naming("gaudi")).validate_config(config_naming("gaudi"))
    assert str(raised.value) == "plugin 'gaudi': tgi_validate_config failed: KeyError: 'oops'"
    assert raised.value.plugin == "gaudi"


def test_unknown_backend_name_lists_known_ones(install) -> None:
    manager = manager_with(install, FakePlugin("cpu"), FakePlugin("cuda"))

    with pytest.raises(ConfigError) as raised:
        manager.select_backend(resolve_config({"backend": "tpu"}, {}))

    assert str(raised.value) == (
        "--backend 'tpu' (cli) names no installed backend plugin; known: cpu, cuda"
    )


def test_naming_an_unavailable_backend_gives_the_probes_reason(install) -> None:
    manager = manager_with(install, FakePlugin("cuda", available=False, reason="no CUDA driver"))

    with pytest.raises(BackendUnavailable) as raised:
        manager.select_backend(config_naming("cuda"))

    assert str(raised.value) == "backend 'cuda' (env TGI_BACKEND) cannot run here: no CUDA driver"


def test_naming_a_broken_backend_gives_its_import_error(install) -> None:
    install(entry_point("rocm", ImportError("libamdhip64.so: cannot open shared object file")))
    manager = BackendManager.from_environ({})

    with pytest.raises(PluginError) as raised:
        manager.select_backend(config_naming("rocm"))

    assert str(raised.value) == (
        "plugin 'rocm': chosen by --backend (env TGI_BACKEND) but broken: import failed: "
        "ImportError: libamdhip64.so: cannot open shared object file"
    )


def test_highest_priority_available_backend_is_picked(install, caplog) -> None:
    manager = manager_with(
        install,
        FakePlugin("cpu", priority=0),
        FakePlugin("cuda", priority=100, reason="1 x H100"),
        FakePlugin("rocm", priority=200, available=False, reason="no ROCm"),
    )

    with caplog.at_level(logging.INFO, logger="tgi.backend.manager"):
        selected = manager.select_backend(config_naming(None))

    assert selected.name == "cuda"
    assert "using backend 'cuda': available with the highest priority (100); 1 x H100" in (
        caplog.text
    )
    assert "backend not chosen: rocm: unavailable (no ROCm)" in caplog.text
    assert "backend not chosen: cpu: available (found it)" in caplog.text


def test_tie_at_the_top_priority_asks_for_backend(install) -> None:
    manager = manager_with(
        install,
        FakePlugin("cpu", priority=0),
        FakePlugin("cuda", priority=100),
        FakePlugin("rocm", priority=100),
    )

    with pytest.raises(ConfigError) as raised:
        manager.select_backend(config_naming(None))

    assert str(raised.value) == (
        "several backends are available at priority 100: cuda, rocm; "
        "pass --backend (or TGI_BACKEND) to choose one"
    )
    assert manager.select_backend(config_naming("rocm")).name == "rocm"


def test_emulated_backend_is_never_auto_picked_but_can_be_named(install) -> None:
    manager = manager_with(
        install,
        FakePlugin("cpu", priority=0),
        FakePlugin("neuron", priority=1000, emulated=True, reason="emulated on CPU"),
    )

    assert manager.select_backend(config_naming(None)).name == "cpu"
    assert manager.select_backend(config_naming("neuron")).name == "neuron"


def test_only_emulated_backends_is_an_error_that_says_so(install) -> None:
    manager = manager_with(install, FakePlugin("neuron", emulated=True, reason="emulated on CPU"))

    with pytest.raises(BackendUnavailable) as raised:
        manager.select_backend(config_naming(None))

    assert str(raised.value) == (
        "no backend can run here: neuron: available but emulated, so only used when named "
        "with --backend (emulated on CPU)"
    )


def test_no_available_backend_names_every_candidate(install) -> None:
    install(
        entry_point("cuda", FakePlugin("cuda", available=False, reason="no CUDA driver")),
        entry_point("neuron", ModuleNotFoundError("No module named 'torch_neuronx'")),
    )

    with pytest.raises(BackendUnavailable) as raised:
        BackendManager.from_environ({}).select_backend(config_naming(None))

    assert str(raised.value) == (
        "no backend can run here: cuda: unavailable (no CUDA driver); neuron: broken "
        "(import failed: ModuleNotFoundError: No module named 'torch_neuronx')"
    )


def test_no_plugins_installed_names_the_entry_point_group(install) -> None:
    install()

    with pytest.raises(BackendUnavailable) as raised:
        BackendManager.from_environ({}).select_backend(config_naming(None))

    assert str(raised.value) == (
        "no backend can run here: no plugin of entry-point group 'tgi.backends' is installed"
    )


# ---------------------------------------------------------------- create


def test_create_result_that_is_not_a_backend_is_a_plugin_error(install) -> None:
    manager = manager_with(install, FakePlugin("cpu", created={"not": "a backend"}))
    config = config_naming(None)

    with pytest.raises(PluginError) as raised:
        manager.select_backend(config).create_backend(config, model=object())

    assert raised.value.plugin == "cpu"
    assert str(raised.value) == (
        "plugin 'cpu': tgi_backend_create returned dict, which does not implement "
        "tgi.backend.Backend"
    )


def test_create_that_raises_names_the_plugin(install) -> None:
    class Failing(FakePlugin):
        @hookimpl
        def tgi_backend_create(self, config: ServeConfig, model: object) -> object:
            raise MemoryError("weights do not fit")

    manager = manager_with(install, Failing("cpu"))
    config = config_naming(None)

    with pytest.raises(PluginError) as raised:
        manager.select_backend(config).create_backend(config, model=object())

    assert (
        str(raised.value)
        == "plugin 'cpu': tgi_backend_create failed: MemoryError: weights do not fit"
    )
    assert isinstance(raised.value.__cause__, MemoryError)


def test_duplicate_entry_point_name_keeps_the_first(install) -> None:
    install(
        entry_point("cpu", FakePlugin("cpu")),
        FakeEntryPoint("cpu", FakePlugin("cpu"), FakeDist("someone-elses-cpu", "9.9")),
    )

    records = discover({})

    assert [(r.distribution, r.status) for r in records] == [
        ("tgi-backend-cpu", PluginStatus.AVAILABLE),
        ("someone-elses-cpu", PluginStatus.BROKEN),
    ]
    assert records[1].reason == "entry-point name also declared by tgi-backend-cpu"


# ---------------------------------------------------------------- contract version


class V1Plugin(FakePlugin):
    """A plugin written for contract v1: the same hooks, no TGI_CONTRACT_VERSION."""

    TGI_CONTRACT_VERSION = None  # what getattr finds on a v1 module


def test_plugin_without_a_contract_version_is_broken_and_never_called(install) -> None:
    old, good = V1Plugin("legacy"), FakePlugin("cpu")
    manager = manager_with(install, old, good)

    records = by_name(manager.records)

    assert records["legacy"].status is PluginStatus.BROKEN
    assert records["legacy"].reason == (
        "implements backend contract v1 (it declares no TGI_CONTRACT_VERSION); this "
        "tgi-server speaks v2 (upgrade the plugin)"
    )
    assert records["legacy"].probe is None
    assert manager.pm.get_plugin("legacy") is None  # never registered
    with pytest.raises(PluginError, match="implements backend contract v1"):
        manager.select_backend(config_naming("legacy"))
    assert manager.select_backend(config_naming(None)).name == "cpu"
    assert old.calls == []


@pytest.mark.parametrize(
    ("declared", "reason"),
    [
        (1, "implements backend contract v1; this tgi-server speaks v2 (upgrade the plugin)"),
        (3, "implements backend contract v3; this tgi-server speaks v2 (upgrade tgi-server)"),
        ("2", "TGI_CONTRACT_VERSION must be an int, got '2'"),
    ],
)
def test_plugin_declaring_another_contract_version_is_broken(
    install, declared: object, reason: str
) -> None:
    plugin = FakePlugin("other")
    plugin.TGI_CONTRACT_VERSION = declared  # type: ignore[assignment]
    install(entry_point("other", plugin))

    [record] = discover({})

    assert (record.status, record.reason) == (PluginStatus.BROKEN, reason)
    assert plugin.calls == []


# ---------------------------------------------------------------- options


class OptionsPlugin(FakePlugin):
    """A plugin that declares what it accepts."""

    def __init__(self, name: str, options: BackendOptions, **kwargs: Any) -> None:
        super().__init__(name, **kwargs)
        self.options = options

    @hookimpl
    def tgi_backend_options(self) -> BackendOptions:
        self.calls.append("options")
        return self.options


CPU_OPTIONS = BackendOptions(
    quantize=frozenset({"int8", "int4"}),
    kv_cache_dtypes=frozenset({"float32", "bfloat16", "float16"}),
)
CUDA_OPTIONS = BackendOptions(
    quantize=frozenset({"fp8", "gptq", "awq"}),
    dtypes=frozenset({"bfloat16", "float16"}),
    kv_cache_dtypes=frozenset({"fp8", "fp8_e4m3fn", "fp8_e5m2", "bfloat16", "float16"}),
)


def test_options_are_asked_once_after_the_probe_and_default_when_not_implemented(
    install,
) -> None:
    cpu = OptionsPlugin("cpu", CPU_OPTIONS)
    manager = manager_with(install, cpu, FakePlugin("plain"))

    records = by_name(manager.records)

    assert records["cpu"].options == CPU_OPTIONS
    assert records["plain"].options == BackendOptions()
    assert BackendOptions().dtypes == frozenset({"float32", "bfloat16", "float16"})
    assert BackendOptions().quantize == BackendOptions().kv_cache_dtypes == frozenset()
    assert cpu.calls == ["probe", "options"]
    assert records["cpu"].to_json()["options"] == {
        "quantize": ["int4", "int8"],
        "dtypes": ["bfloat16", "float16", "float32"],
        "kv_cache_dtypes": ["bfloat16", "float16", "float32"],
        "parallelism": "none",
        "flags": [],
    }


def test_options_hook_that_raises_or_answers_the_wrong_type_is_broken(install) -> None:
    class Raising(FakePlugin):
        @hookimpl
        def tgi_backend_options(self) -> BackendOptions:
            raise RuntimeError("options bug")

    class Wrong(FakePlugin):
        @hookimpl
        def tgi_backend_options(self) -> BackendOptions:
            return {"quantize": ["fp8"]}  # type: ignore[return-value]

    manager = manager_with(install, Raising("raising"), Wrong("wrong"))
    records = by_name(manager.records)

    assert records["raising"].status is PluginStatus.BROKEN
    assert records["raising"].reason == "tgi_backend_options failed: RuntimeError: options bug"
    assert records["wrong"].reason == (
        "tgi_backend_options failed: PluginError: plugin 'wrong': expected a "
        "BackendOptions, got {'quantize': ['fp8']}"
    )
    assert manager.pm.get_plugin("raising") is None


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        (
            {"quantize": "gptq"},
            {},
            "--quantize gptq (cli) is not offered by backend 'cpu' (it offers: int4, int8); "
            "installed backends that offer it: cuda",
        ),
        (
            {},
            {"QUANTIZE": "bitsandbytes-nf4"},
            "--quantize bitsandbytes-nf4 (env QUANTIZE) is not offered by backend 'cpu' (it "
            "offers: int4, int8); no installed backend offers it",
        ),
        (
            {},
            {"KV_CACHE_DTYPE": "fp8_e5m2"},
            "--kv-cache-dtype fp8_e5m2 (env KV_CACHE_DTYPE) is not offered by backend 'cpu' "
            "(it offers: bfloat16, float16, float32); installed backends that offer it: cuda",
        ),
    ],
)
def test_a_value_the_chosen_backend_does_not_offer_names_who_does(
    install, cli: dict[str, str], environ: dict[str, str], message: str
) -> None:
    cpu = OptionsPlugin("cpu", CPU_OPTIONS, priority=100)
    manager = manager_with(install, cpu, OptionsPlugin("cuda", CUDA_OPTIONS, available=False))
    config = resolve_config(cli, environ)

    with pytest.raises(ConfigError) as raised:
        manager.select_backend(config).validate_config(config)

    assert str(raised.value) == message
    assert "validate" not in cpu.calls  # rejected before the plugin's own checks


def test_a_backend_without_quantization_says_it_offers_none(install) -> None:
    manager = manager_with(install, OptionsPlugin("neuron", BackendOptions()))
    config = resolve_config({"quantize": "int8", "dtype": "fp32"}, {})

    with pytest.raises(ConfigError) as raised:
        manager.select_backend(config).validate_config(config)

    assert str(raised.value) == (
        "--quantize int8 (cli) is not offered by backend 'neuron' (it offers: none); "
        "no installed backend offers it"
    )


def test_num_shard_is_refused_by_a_backend_that_does_not_split_models(install) -> None:
    manager = manager_with(
        install,
        OptionsPlugin("single", BackendOptions(), priority=100),
        OptionsPlugin("ranked", BackendOptions(parallelism="ranks")),
    )
    config = resolve_config({"num_shard": 2}, {})

    with pytest.raises(ConfigError) as raised:
        manager.select_backend(config).validate_config(config)
    assert str(raised.value) == (
        "--num-shard 2 (cli): backend 'single' serves from one device and does not split "
        "a model over several; leave --num-shard at 1"
    )
    ranked = resolve_config({"num_shard": 2, "backend": "ranked"}, {})
    assert manager.select_backend(ranked).validate_config(ranked).num_shard == 2


def test_offered_values_pass_and_the_plugin_sees_them(install) -> None:
    manager = manager_with(install, OptionsPlugin("cuda", CUDA_OPTIONS))
    config = resolve_config({"quantize": "FP8", "dtype": "bf16"}, {"KV_CACHE_DTYPE": "fp8_e4m3"})

    validated = manager.select_backend(config).validate_config(config)

    assert (validated.quantize, validated.dtype, validated.kv_cache_dtype) == (
        "fp8",
        "bfloat16",
        "fp8_e4m3fn",
    )


def test_plugin_filling_a_value_it_does_not_declare_is_a_plugin_error(install) -> None:
    manager = manager_with(
        install, OptionsPlugin("cuda", CUDA_OPTIONS, adjust={"dtype": "float32"})
    )
    config = config_naming(None)

    with pytest.raises(PluginError) as raised:
        manager.select_backend(config).validate_config(config)

    assert str(raised.value) == (
        "plugin 'cuda': tgi_validate_config set --dtype float32, which its "
        "tgi_backend_options does not declare"
    )


# ---------------------------------------------------------------- backend flags

FLAGS = BackendOptions(
    flags=(
        BackendFlag("engine", "which engine", default="auto", choices=("auto", "paged")),
        BackendFlag("num_slots", "compiled slots", type=int, default=4),
        BackendFlag("emulate", "run on the CPU", type=bool, default=False, env="FOO_EMULATE"),
    )
)


class FlagsPlugin(OptionsPlugin):
    """Records the typed backend options its validate hook was handed."""

    seen: dict[str, Any] | None = None

    @hookimpl
    def tgi_validate_config(self, config: ServeConfig) -> ServeConfig | None:
        self.seen = dict(config.backend_options)
        return None


def test_backend_flags_come_from_cli_then_env_then_default_typed(install) -> None:
    plugin = FlagsPlugin("foo", FLAGS)
    manager = manager_with(install, plugin)
    config = resolve_config(
        {"backend_option": ["num-slots=8"]},
        {"TGI_FOO_NUM_SLOTS": "2", "FOO_EMULATE": "yes", "TGI_FOO_EMULATE": "no"},
    )

    validated = manager.select_backend(config).validate_config(config)

    assert validated.backend_options == {"engine": "auto", "num_slots": 8, "emulate": True}
    assert plugin.seen == validated.backend_options
    assert [
        validated.source_of(f"backend_option.{n}") for n in ("engine", "num_slots", "emulate")
    ] == [
        "default",
        "cli",
        "env FOO_EMULATE",
    ]
    assert config.backend_options == {}  # the original is untouched


@pytest.mark.parametrize(
    ("cli", "environ", "message"),
    [
        (
            ["slots=2"],
            {},
            "--backend-option slots (cli): backend 'foo' declares no such option; its "
            "options: emulate, engine, num_slots",
        ),
        (
            [],
            {"TGI_FOO_NUM_SLOTS": "many"},
            "--backend-option num_slots=many (env TGI_FOO_NUM_SLOTS) for backend 'foo': "
            "expected int, got 'many'",
        ),
        (
            ["engine=turbo"],
            {},
            "--backend-option engine=turbo (cli) for backend 'foo': expected one of auto, "
            "paged; got 'turbo'",
        ),
    ],
)
def test_bad_backend_flags_name_the_option_and_its_source(
    install, cli: list[str], environ: dict[str, str], message: str
) -> None:
    manager = manager_with(install, FlagsPlugin("foo", FLAGS))
    config = resolve_config({"backend_option": cli}, environ)

    with pytest.raises(ConfigError) as raised:
        manager.select_backend(config).validate_config(config)

    assert str(raised.value) == message


# ---------------------------------------------------------------- rank and world size


def test_create_hands_rank_and_world_size_to_a_hookimpl_that_takes_them(install) -> None:
    seen: list[tuple[int, int]] = []

    class Sharded(FakePlugin):
        @hookimpl
        def tgi_backend_create(
            self, config: ServeConfig, model: object, rank: int, world_size: int
        ) -> object:
            seen.append((rank, world_size))
            return self.created

    manager = manager_with(install, Sharded("cuda"), FakePlugin("cpu", priority=0))
    config = config_naming(None)
    selected = manager.select_backend(config)

    assert isinstance(selected.create_backend(config, model=object()), FakeBackend)
    selected.create_backend(config, model=object(), rank=1, world_size=2)
    # the two-argument hookimpl of contract v1's signature keeps working
    cpu = manager.select_backend(config_naming("cpu"))
    assert isinstance(cpu.create_backend(config, model=object(), rank=0, world_size=1), FakeBackend)

    assert seen == [(0, 1), (1, 2)]


# ---------------------------------------------------------------- own scheduling policy


def test_a_plugin_may_bring_its_own_scheduling_policy(install) -> None:
    from tgi.router.policies import ContinuousPolicy, PolicyLimits

    class OwnPolicy(ContinuousPolicy):
        """A built-in policy in disguise: what matters is that it is the one used."""

    class WithPolicy(FakePlugin):
        @hookimpl
        def tgi_scheduling_policy(
            self, capabilities: Capabilities, limits: PolicyLimits
        ) -> OwnPolicy:
            self.calls.append("policy")
            return OwnPolicy(limits, join_immediately=True)

    plugin, plain = WithPolicy("own"), FakePlugin("plain")
    manager = manager_with(install, plugin, plain)
    limits = PolicyLimits(max_batch_prefill_tokens=8, max_batch_total_tokens=64, max_batch_size=2)
    report = FakeBackend().warmup(Limits(8, 16, 8, None, None))
    caps = FakeBackend.capabilities
    own = manager.select_backend(config_naming("own"))
    policy = own.scheduling_policy(config_naming("own"), caps, limits, report)
    assert isinstance(policy, OwnPolicy) and policy.limits is limits
    assert "policy" in plugin.calls
    # a plugin without the hook leaves the choice to the core
    other = manager.select_backend(config_naming("plain"))
    assert other.scheduling_policy(config_naming("plain"), caps, limits, report) is None
