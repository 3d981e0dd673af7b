"""What stops optimum-neuron serving a model on this host is refused before weights load,
naming what differs and the fix (`_checks.py`, `_host.py`)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from tgi_backend_neuron._checks import SUPPORTED_MODEL_TYPES, check_export
from tgi_backend_neuron._host import NeuronHost, available_cores, read_host, target_of
from tgi_backend_neuron._plan import resolve_plan

from tgi.config import resolve_config
from tgi.errors import ConfigError

from .conftest import write_neuron_config, write_neuron_section

HOST = NeuronHost(
    instance="inf2.24xlarge",
    target="trn1",
    cores=12,
    optimum_neuron_version="0.4.5",
    neuronxcc_version="2.21.33363.0+82129205",
)
NXD = {
    "batch_size": 4,
    "sequence_length": 128,
    "tp_degree": 2,
    "torch_dtype": "bfloat16",
    "continuous_batching": True,
    "target": "trn1",
    "optimum_neuron_version": "0.4.5",
    "neuronxcc_version": "2.21.33363.0+82129205",
    "_serialized_key": "NxDNeuronConfig",
}


def check(model_dir: Path | None, host: NeuronHost = HOST, **environ: str) -> None:
    config = resolve_config({"model_id": str(model_dir) if model_dir else None}, environ)
    plan = resolve_plan(config, model_dir, 2048)
    check_export(plan, model_dir, host, environ)


@pytest.fixture
def nxd_export(tiny_model: Path, tmp_path: Path) -> Any:
    made = iter(range(1000))

    def factory(weights: bool = True, **changes: Any) -> Path:
        target = tmp_path / f"export{next(made)}"
        shutil.copytree(tiny_model, target)
        if not weights:
            for path in target.glob("*.safetensors"):
                path.unlink()
        return write_neuron_config(target, **{**NXD, **changes})

    return factory


def test_a_matching_export_passes(nxd_export: Any) -> None:
    check(nxd_export())


def test_an_export_of_another_sdk_version_names_both_and_the_fix(nxd_export: Any) -> None:
    with pytest.raises(ConfigError) as raised:
        check(nxd_export(optimum_neuron_version="0.4.4"))
    assert "exported with optimum-neuron 0.4.4, but 0.4.5 is installed" in str(raised.value)
    assert "Fix: export the model again with optimum-neuron 0.4.5" in str(raised.value)
    with pytest.raises(ConfigError, match=r"neuronx-cc 2\.20\.1, but 2\.21\.33363"):
        check(nxd_export(neuronxcc_version="2.20.1"))


def test_an_export_for_another_target_is_refused(nxd_export: Any) -> None:
    with pytest.raises(ConfigError, match=r"compiled for target trn2, but this inf2.24xlarge"):
        check(nxd_export(target="trn2"))


def test_more_cores_than_visible_is_refused(nxd_export: Any) -> None:
    host = NeuronHost("inf2.xlarge", "trn1", 2, "0.4.5", NXD["neuronxcc_version"])
    with pytest.raises(ConfigError, match=r"tp_degree is 8 NeuronCores, but this process sees 2"):
        check(nxd_export(tp_degree=8), host)


def test_an_export_without_weights_needs_a_downloadable_checkpoint(nxd_export: Any) -> None:
    with pytest.raises(ConfigError, match=r"holds no weights .* records no checkpoint_id"):
        check(nxd_export(weights=False))
    model = nxd_export(weights=False, checkpoint_id="org/model")
    check(model)  # optimum-neuron downloads it
    with pytest.raises(ConfigError, match="cannot be downloaded with HF_HUB_OFFLINE"):
        check(model, HF_HUB_OFFLINE="1")
    sharded = model / "checkpoint" / "weights"
    sharded.mkdir(parents=True)
    (sharded / "tp0_sharded_checkpoint.safetensors").write_bytes(b"")
    check(model, HF_HUB_OFFLINE="1")  # save_pretrained's sharded weights


def test_a_transformers_neuronx_export_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "tnx"
    shutil.copytree(tiny_model, target)
    write_neuron_section(target, batch_size=4, sequence_length=128, num_cores=2)
    with pytest.raises(ConfigError, match=r"exported by transformers-neuronx, which optimum"):
        check(target)


def test_an_unsupported_architecture_is_refused(tiny_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "gpt2ish"
    shutil.copytree(tiny_model, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(ConfigError, match=r"model_type 'gpt2' is not one optimum-neuron"):
        check(target)


def test_exporting_checks_cores_the_sdk_and_gguf(tiny_model: Path) -> None:
    check(tiny_model, HF_NUM_CORES="2")
    with pytest.raises(ConfigError, match=r"num_cores is 16 NeuronCores, but this process"):
        check(tiny_model, HF_NUM_CORES="16")
    old_sdk = NeuronHost("inf2.xlarge", "trn1", 2, "0.3.0", None)
    with pytest.raises(ConfigError, match=r"optimum-neuron >= 0\.4\.5, < 0\.5\.0; found 0\.3\.0"):
        check(tiny_model, old_sdk)
    with pytest.raises(ConfigError, match="not from a GGUF file"):
        check(None)


def test_the_host_is_read_as_optimum_neuron_reads_it(tmp_path: Path) -> None:
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("neuron0", "neuron1", "neuron_bogus", "null"):
        (dev / name).touch()
    product = tmp_path / "product_name"
    product.write_text("trn2.48xlarge\n")
    host = read_host(
        {"NEURON_RT_VISIBLE_CORES": "2-6"},
        dev,
        product,
        installed=lambda name: {"optimum-neuron": "0.4.5"}.get(name),
        neuronxcc_version=lambda: "2.21",
    )
    assert host == NeuronHost("trn2.48xlarge", "trn2", 5, "0.4.5", "2.21")
    assert available_cores(1, "inf2.xlarge", {}) == 2
    assert available_cores(6, "inf2.24xlarge", {"NEURON_RT_NUM_CORES": "4"}) == 4
    assert available_cores(6, "inf2.24xlarge", {"NEURON_RT_VISIBLE_CORES": "3"}) == 1
    assert available_cores(0, None, {}) == 0
    assert [target_of(name) for name in ("inf2.xlarge", "trn1n.32xlarge", "trn2.3xlarge")] == [
        "trn1",
        "trn1",
        "trn2",
    ]


def test_the_supported_architectures_are_optimum_neurons_own() -> None:
    """The table equals the text-generation registry of the optimum-neuron the compat run
    vendors (read as text: importing it needs the Neuron SDK)."""
    from .nxd_standin import vendored_optimum_neuron

    source = vendored_optimum_neuron() / "optimum/neuron/models/inference/auto_models.py"
    registered = re.findall(
        r'register_neuron_model_for_inference\("([^"]+)", "text-generation"\)', source.read_text()
    )
    assert set(registered) == SUPPORTED_MODEL_TYPES


def test_an_unknown_instance_or_an_export_without_target_is_refused(nxd_export: Any) -> None:
    unknown = NeuronHost("trn9.xlarge", None, 8, "0.4.5", NXD["neuronxcc_version"])
    with pytest.raises(ConfigError, match=r"trn9.xlarge is no instance type it knows"):
        check(nxd_export(), unknown)
    with pytest.raises(ConfigError, match=r"compiled for target None"):
        check(nxd_export(target=None))
    no_dmi = NeuronHost(None, None, 8, "0.4.5", NXD["neuronxcc_version"])
    check(nxd_export(target="trn2"), no_dmi)  # nothing to compare with: loading says it


def test_an_export_whose_sampler_cannot_pick_greedily_is_refused(nxd_export: Any) -> None:
    with pytest.raises(ConfigError, match=r"max_topk=0, whose sampler accepts only top_k=-1"):
        check(nxd_export(on_device_sampling=True, max_topk=0))


def test_forcing_device_sampling_where_optimum_neuron_turns_it_off_is_refused(
    tiny_model: Path, tmp_path: Path
) -> None:
    target = tmp_path / "qwen"
    shutil.copytree(tiny_model, target)
    config = json.loads((target / "config.json").read_text())
    (target / "config.json").write_text(json.dumps({**config, "model_type": "qwen2"}))
    forced = {"HF_BATCH_SIZE": "4", "TGI_NEURON_ON_DEVICE_SAMPLING": "1"}
    with pytest.raises(ConfigError, match=r"turns on-device sampling off for qwen2"):
        check(target, **forced, HF_NUM_CORES="2")
    check(target, **forced, HF_NUM_CORES="1")
    check(target, HF_BATCH_SIZE="4", HF_NUM_CORES="2")  # optimum-neuron's own choice


def test_pre_releases_of_the_supported_sdk_are_read_by_their_release(tiny_model: Path) -> None:
    for version in ("0.4.5rc1", "0.4.6.dev0"):
        check(tiny_model, NeuronHost("inf2.xlarge", "trn1", 2, version, None))
    with pytest.raises(ConfigError, match=r"found 0\.4\.0rc5"):
        check(tiny_model, NeuronHost("inf2.xlarge", "trn1", 2, "0.4.0rc5", None))
