"""The probe: real hardware only with /dev/neuron* and an importable SDK; the emulator
only when asked for, and then never picked automatically."""

from __future__ import annotations

import types
from pathlib import Path

import pytest
from tgi_backend_neuron._probe import HardwareCheck, check_hardware, find_devices
from tgi_backend_neuron.plugin import PRIORITY, probe

from tgi.backend.manager import PluginStatus, discover, select_backend
from tgi.config import resolve_config
from tgi.errors import BackendUnavailable


def fake_dev(tmp_path: Path, *names: str) -> Path:
    for name in names:
        (tmp_path / name).touch()
    return tmp_path


def importable(name: str) -> types.ModuleType:
    return types.ModuleType(name)


def test_no_devices_and_no_sdk_names_both(tmp_path: Path) -> None:
    check = check_hardware(dev=fake_dev(tmp_path, "null"), sdk_installed=lambda: False)
    assert not check.available and check.devices == ()
    assert f"no Neuron devices ({tmp_path}/neuron*)" in check.reason
    assert "the Neuron SDK (optimum.neuron) is not installed" in check.reason
    assert "tgi-backend-neuron[neuron]" in check.reason


def test_no_devices_with_the_sdk_installed_names_the_devices_only(tmp_path: Path) -> None:
    check = check_hardware(dev=tmp_path, sdk_installed=lambda: True)
    assert not check.available
    assert "no Neuron devices" in check.reason and "SDK" not in check.reason


def test_devices_without_an_importable_sdk_are_unavailable(tmp_path: Path) -> None:
    def failing(name: str) -> types.ModuleType:
        raise ImportError("No module named 'torch_neuronx'")

    check = check_hardware(dev=fake_dev(tmp_path, "neuron0", "neuron1"), import_module=failing)
    assert not check.available
    assert check.devices == ("neuron0", "neuron1")
    assert "(optimum.neuron) does not import (No module named 'torch_neuronx')" in check.reason


def test_a_broken_sdk_is_reported_not_raised(tmp_path: Path) -> None:
    def broken(name: str) -> types.ModuleType:
        raise RuntimeError("libnrt.so: version mismatch")

    check = check_hardware(dev=fake_dev(tmp_path, "neuron0"), import_module=broken)
    assert not check.available
    assert "failed to import: RuntimeError: libnrt.so: version mismatch" in check.reason


def test_devices_and_sdk_make_it_available(tmp_path: Path) -> None:
    check = check_hardware(dev=fake_dev(tmp_path, "neuron0"), import_module=importable)
    assert check == HardwareCheck(True, ("neuron0",), "1 Neuron device(s): neuron0")
    answer = probe({}, hardware=check)
    assert answer.available and not answer.emulated
    assert answer.priority == PRIORITY and answer.batching == "static"


def test_emulation_is_available_but_marked_emulated() -> None:
    missing = HardwareCheck(False, (), "no Neuron devices (/dev/neuron*)")
    answer = probe({"TGI_NEURON_EMULATE": "1"}, hardware=missing)
    assert answer.available and answer.emulated
    assert answer.reason == (
        "emulated on the CPU (TGI_NEURON_EMULATE=1); "
        "real hardware: no Neuron devices (/dev/neuron*)"
    )
    assert not probe({"TGI_NEURON_EMULATE": "0"}, hardware=missing).available


def test_an_unreadable_emulation_switch_makes_it_unavailable_with_the_reason() -> None:
    answer = probe({"TGI_NEURON_EMULATE": "maybe"}, hardware=HardwareCheck(False, (), "x"))
    assert not answer.available
    assert "TGI_NEURON_EMULATE='maybe'" in answer.reason


@pytest.fixture
def no_emulation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TGI_NEURON_EMULATE", raising=False)


@pytest.mark.usefixtures("no_emulation")
def test_this_machine_lists_neuron_unavailable_with_the_reason() -> None:
    if find_devices():
        pytest.skip("this machine has Neuron devices; the listing would say available")
    records = {record.name: record for record in discover({})}
    record = records["neuron"]
    assert record.status is PluginStatus.UNAVAILABLE
    assert record.distribution == "tgi-backend-neuron"
    assert "no Neuron devices (/dev/neuron*)" in record.reason


@pytest.mark.usefixtures("no_emulation")
def test_naming_neuron_without_hardware_or_emulation_says_why() -> None:
    if find_devices():
        pytest.skip("this machine has Neuron devices")
    config = resolve_config({"backend": "neuron"}, environ={"TGI_BACKENDS": "cpu,neuron"})
    with pytest.raises(BackendUnavailable, match=r"backend 'neuron' \(cli\) cannot run here: no"):
        select_backend(config)


def test_the_emulator_is_used_only_when_named(monkeypatch: pytest.MonkeyPatch) -> None:
    environ = {"TGI_BACKENDS": "cpu,neuron", "TGI_NEURON_EMULATE": "1"}
    assert select_backend(resolve_config({}, environ)).name == "cpu"
    assert select_backend(resolve_config({"backend": "neuron"}, environ)).name == "neuron"
