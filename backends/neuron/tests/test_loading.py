"""A checkpoint is exported once and kept; the next start loads the kept export
(`_loading.py`), against a stand-in of optimum-neuron 0.4's NeuronModelForCausalLM API
(`get_neuron_config`, `export`, `save_pretrained`, `from_pretrained`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from tgi_backend_neuron._host import NeuronHost
from tgi_backend_neuron._loading import EXPORTS_DIR, export_dir, load_neuron_model
from tgi_backend_neuron._plan import NeuronPlan, resolve_plan

from tgi.config import resolve_config
from tgi.errors import BackendError

from .conftest import write_neuron_config

HOST = NeuronHost("inf2.xlarge", "trn1", 2, "0.4.5", "2.21.33363.0")


class FakeOptimumNeuron:
    """Records the calls; exports write what save_pretrained writes (configs, model.pt,
    sharded weights), and from_pretrained reads neuron_config.json back."""

    def __init__(self, fail_saving: bool = False) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.fail_saving = fail_saving

    def get_neuron_config(self, path: str, **kwargs: Any) -> SimpleNamespace:
        self.calls.append(("get_neuron_config", kwargs))
        batch = kwargs["batch_size"]
        return SimpleNamespace(
            batch_size=batch,
            sequence_length=kwargs["sequence_length"],
            tp_degree=kwargs["tensor_parallel_size"] or HOST.cores,
            torch_dtype=torch.float32,  # the checkpoint's dtype
            continuous_batching=batch > 1,  # optimum-neuron's Llama defaults
            on_device_sampling=True,
        )

    def export(self, path: str, neuron_config: Any, load_weights: bool) -> Any:
        self.calls.append(("export", (path, load_weights)))
        fake = self

        class Exported:
            def save_pretrained(self, directory: str) -> None:
                Path(directory).mkdir(parents=True, exist_ok=True)  # as optimum-neuron does
                if fake.fail_saving:
                    Path(directory, "model.pt").write_bytes(b"half")
                    raise OSError("disk full")
                values = {**vars(neuron_config), "torch_dtype": str(neuron_config.torch_dtype)}
                Path(directory, "neuron_config.json").write_text(json.dumps(values))
                Path(directory, "model.pt").write_bytes(b"graphs")

        return Exported()

    def from_pretrained(self, path: str) -> Any:
        self.calls.append(("from_pretrained", path))
        values = json.loads(Path(path, "neuron_config.json").read_text())
        return SimpleNamespace(neuron_config=SimpleNamespace(**values))

    def names(self) -> list[str]:
        return [name for name, _ in self.calls]


def plan_for(model_dir: Path, **environ: str) -> NeuronPlan:
    config = resolve_config({"model_id": str(model_dir)}, environ)
    return resolve_plan(config, model_dir, 2048)


def test_a_checkpoint_is_exported_once_and_loaded_from_the_cache_after(
    tiny_model: Path, tmp_path: Path
) -> None:
    plan = plan_for(tiny_model, HF_BATCH_SIZE="4", HF_SEQUENCE_LENGTH="256")
    first = FakeOptimumNeuron()
    model = load_neuron_model(plan, tiny_model, tmp_path, HOST, api=first)
    assert first.names() == ["get_neuron_config", "export", "from_pretrained"]
    assert first.calls[0][1] == {
        "batch_size": 4,
        "sequence_length": 256,
        "tensor_parallel_size": HOST.cores,  # every visible core, named in the key
    }
    assert first.calls[1][1] == (str(tiny_model), False)
    kept = export_dir(plan, tiny_model, tmp_path, HOST)
    assert kept.parent == tmp_path / EXPORTS_DIR and (kept / "model.pt").is_file()
    assert model.neuron_config.batch_size == 4
    second = FakeOptimumNeuron()
    load_neuron_model(plan, tiny_model, tmp_path, HOST, api=second)
    assert second.names() == ["from_pretrained"]  # no recompilation
    assert second.calls[0][1] == str(kept)


def test_export_settings_reach_the_neuron_config(tiny_model: Path, tmp_path: Path) -> None:
    plan = plan_for(
        tiny_model,
        HF_BATCH_SIZE="2",
        HF_SEQUENCE_LENGTH="128",
        HF_NUM_CORES="2",
        HF_AUTO_CAST_TYPE="bf16",
        TGI_NEURON_CONTINUOUS_BATCHING="0",
        TGI_NEURON_ON_DEVICE_SAMPLING="0",
    )
    api = FakeOptimumNeuron()
    model = load_neuron_model(plan, tiny_model, tmp_path, HOST, api=api)
    config = model.neuron_config
    assert (config.tp_degree, config.torch_dtype) == (2, "torch.bfloat16")
    assert (config.continuous_batching, config.on_device_sampling) == (False, False)


def test_another_shape_or_sdk_gets_its_own_export(tiny_model: Path, tmp_path: Path) -> None:
    four = plan_for(tiny_model, HF_BATCH_SIZE="4")
    eight = plan_for(tiny_model, HF_BATCH_SIZE="8")
    assert export_dir(four, tiny_model, tmp_path, HOST) != export_dir(
        eight, tiny_model, tmp_path, HOST
    )
    newer = NeuronHost("inf2.xlarge", "trn1", 2, "0.4.6", "2.21.33363.0")
    fewer_cores = NeuronHost("inf2.xlarge", "trn1", 1, "0.4.5", "2.21.33363.0")
    for other in (newer, fewer_cores):
        assert export_dir(four, tiny_model, tmp_path, HOST) != export_dir(
            four, tiny_model, tmp_path, other
        )


def test_a_failed_export_leaves_nothing_to_load(tiny_model: Path, tmp_path: Path) -> None:
    plan = plan_for(tiny_model, HF_BATCH_SIZE="4")
    with pytest.raises(OSError, match="disk full"):
        load_neuron_model(plan, tiny_model, tmp_path, HOST, api=FakeOptimumNeuron(True))
    kept = export_dir(plan, tiny_model, tmp_path, HOST)
    assert not kept.exists() and not list(tmp_path.glob(f"{EXPORTS_DIR}/*.partial-*"))
    crashed = kept.with_name(f"{kept.name}.partial-999999999")  # a dead process's leftovers
    crashed.mkdir()
    retry = FakeOptimumNeuron()
    load_neuron_model(plan, tiny_model, tmp_path, HOST, api=retry)
    assert "export" in retry.names() and (kept / "neuron_config.json").is_file()
    assert not list(tmp_path.glob(f"{EXPORTS_DIR}/*.partial-*"))


def test_an_exported_variant_is_loaded_where_it_is(tiny_model: Path, tmp_path: Path) -> None:
    target = tmp_path / "exported"
    shutil.copytree(tiny_model, target)
    write_neuron_config(target, batch_size=4, sequence_length=128, tp_degree=2)
    api = FakeOptimumNeuron()
    load_neuron_model(plan_for(target), target, tmp_path, HOST, api=api)
    assert api.calls == [("from_pretrained", str(target))]
    # A loaded model whose shape is not the validated one is refused.
    plan = plan_for(target)
    (target / "neuron_config.json").write_text(json.dumps({"batch_size": 2, "sequence_length": 8}))
    with pytest.raises(BackendError, match="runs batch_size=2, sequence_length=8"):
        load_neuron_model(plan, target, tmp_path, HOST, api=FakeOptimumNeuron())
