"""Start-up validation: launcher flags against the compiled shapes, before weights load.

Every bad combination must stop `tgi serve` in `prepare()` (before `materialize` and
any weight load) with a ConfigError naming the flag, the compiled value and the fix.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from tgi_backend_neuron._plan import check_config, resolve_plan
from tgi_backend_neuron.plugin import tgi_validate_config

from tgi import launcher
from tgi.config import ServeConfig, derive_limits, resolve_config
from tgi.errors import BackendUnavailable, ConfigError

from .conftest import ExportedFactory, write_neuron_config

EMULATED = {"TGI_NEURON_EMULATE": "1", "TGI_BACKENDS": "neuron"}


def config_for(
    model_dir: Path | None, environ: dict[str, str] | None = None, **flags: Any
) -> ServeConfig:
    values = {"model_id": str(model_dir) if model_dir else None, **flags}
    return resolve_config(values, {**EMULATED, **(environ or {})})


def validated(config: ServeConfig) -> ServeConfig:
    return tgi_validate_config(config) or config


def test_unset_limits_are_derived_from_the_compiled_shape(exported: ExportedFactory) -> None:
    model = exported(batch_size=4, sequence_length=128)
    config = validated(config_for(model))
    assert (config.max_batch_size, config.max_total_tokens) == (4, 128)
    assert config.max_input_tokens == 64  # half the sequence length, as TGI's Neuron image
    assert config.max_batch_prefill_tokens == 4 * 64
    section = f"the neuron section of {model / 'config.json'}"
    assert (
        config.source_of("max_batch_size") == f"backend neuron (compiled batch_size 4, {section})"
    )
    assert config.source_of("max_total_tokens") == (
        f"backend neuron (compiled sequence_length 128, {section})"
    )
    assert config.source_of("max_input_tokens") == (
        f"backend neuron (half the compiled sequence_length 128, {section})"
    )
    assert config.source_of("max_batch_prefill_tokens") == (
        "backend neuron (max_batch_size 4 x max_input_tokens 64)"
    )
    derived = derive_limits(config, 512)  # the core's checks agree with the filled values
    assert derived.max_input_tokens == 64


def test_values_within_the_compiled_shape_are_kept(exported: ExportedFactory) -> None:
    model = exported(batch_size=4, sequence_length=128)
    config = validated(config_for(model, max_batch_size=2, max_total_tokens=100))
    assert (config.max_batch_size, config.max_total_tokens, config.max_input_tokens) == (2, 100, 64)
    assert config.source_of("max_batch_size") == "cli"
    assert config.max_batch_prefill_tokens == 2 * 64


def test_a_plain_checkpoint_is_exported_with_the_hf_parameters(tiny_model: Path) -> None:
    environ = {
        "HF_BATCH_SIZE": "3",
        "HF_SEQUENCE_LENGTH": "96",
        "TGI_NEURON_CONTINUOUS_BATCHING": "0",
    }
    config = config_for(tiny_model, environ)
    plan = resolve_plan(config, tiny_model, 512)
    assert plan.export
    assert (plan.shape.batch_size, plan.shape.sequence_length) == (3, 96)
    assert plan.shape.continuous_batching is False
    checked = check_config(config, plan)
    assert (checked.max_batch_size, checked.max_total_tokens, checked.max_input_tokens) == (
        3,
        96,
        48,
    )
    assert checked.source_of("max_batch_size") == (
        "backend neuron (compiled batch_size 3, export parameter from env HF_BATCH_SIZE)"
    )


def test_export_parameters_fall_back_to_the_launcher_flags_then_defaults(tiny_model: Path) -> None:
    plan = resolve_plan(
        config_for(tiny_model, max_batch_size=2, max_total_tokens=64), tiny_model, 512
    )
    assert (plan.shape.batch_size, plan.shape.sequence_length) == (2, 64)
    assert plan.shape.continuous_batching  # what optimum-neuron compiles for B > 1
    plan = resolve_plan(config_for(tiny_model), tiny_model, 8192)
    assert (plan.shape.batch_size, plan.shape.sequence_length) == (1, 4096)
    assert plan.shape.origin("sequence_length") == (
        "export parameter from min(model context 8192, 4096)"
    )


def test_num_shard_is_the_tp_degree_of_an_export_and_starts_no_ranks(tiny_model: Path) -> None:
    config = config_for(tiny_model, num_shard=2)
    plan = resolve_plan(config, tiny_model, 512)
    assert plan.export and plan.shape.num_cores == 2
    assert resolve_plan(config_for(tiny_model), tiny_model, 512).shape.num_cores is None
    from tgi_backend_neuron.plugin import tgi_backend_options

    assert tgi_backend_options().parallelism == "internal"  # one worker, not one per rank


def test_a_torchrun_job_of_several_processes_is_refused(tiny_model: Path) -> None:
    """Neuron splits a model inside one process: N torchrun ranks would each load it."""
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1"}
    with pytest.raises(ConfigError, match="does not split a model over ranks"):
        launcher.prepare(config_for(tiny_model, torchrun, backend="neuron"))


def test_the_variant_with_the_exact_batch_size_serves(exported: ExportedFactory) -> None:
    root = exported("root", batch_size=8, sequence_length=128)
    (root / "bs4").mkdir()
    write_neuron_config(root / "bs4", batch_size=4, sequence_length=128)
    config = validated(config_for(root, max_batch_size=4))
    assert config.max_batch_size == 4 and config.max_total_tokens == 128
    plan = resolve_plan(config, root, 512)
    assert plan.shape.path == root / "bs4" and plan.shape.continuous_batching


# -- every bad combination stops start-up before weights load ------------------------------

BAD = [
    pytest.param(
        {"max_batch_size": 8},
        {},
        r"--max-batch-size 8 \(cli\) is more than the compiled batch_size 4 \(the neuron "
        r"section of .*config.json\): a static batch cannot grow. Fix: set --max-batch-size "
        r"to at most 4 \(or leave it unset\), or export the model with batch_size 8 "
        r"\(HF_BATCH_SIZE=8\)",
        id="max-batch-size",
    ),
    pytest.param(
        {"max_total_tokens": 256},
        {},
        r"--max-total-tokens 256 \(cli\) is more than the compiled sequence_length 128 .* Fix: "
        r"set --max-total-tokens to at most 128 \(or leave it unset\), or export the model "
        r"with sequence_length 256 \(HF_SEQUENCE_LENGTH=256\)",
        id="max-total-tokens",
    ),
    pytest.param(
        {"max_input_tokens": 128},
        {},
        r"--max-input-tokens 128 \(cli\) is not below the compiled sequence_length 128 .* Fix: "
        r"set --max-input-tokens to at most 127 \(default 64\)",
        id="max-input-tokens",
    ),
    pytest.param(
        {"max_batch_total_tokens": 1000},
        {},
        r"--max-batch-total-tokens 1000 \(cli\) is more than the 4 x 128 tokens the compiled "
        r"slots hold .* Fix: set it to at most 512 or leave it unset",
        id="max-batch-total-tokens",
    ),
    pytest.param(
        {"dtype": "float16"},
        {},
        r"--dtype float16 \(cli\) differs from the compiled auto_cast_type bfloat16 .* Fix: "
        r"leave --dtype unset, or export the model with auto_cast_type float16",
        id="dtype",
    ),
    pytest.param(
        {},
        {"HF_BATCH_SIZE": "8"},
        r"HF_BATCH_SIZE 8 \(env HF_BATCH_SIZE\) does not match the compiled batch_size 4 .* "
        r"Fix: unset HF_BATCH_SIZE or set it to 4, or export the model again with batch_size=8",
        id="HF_BATCH_SIZE",
    ),
    pytest.param(
        {},
        {"HF_NUM_CORES": "8"},
        r"HF_NUM_CORES 8 \(env HF_NUM_CORES\) does not match the compiled num_cores 2",
        id="HF_NUM_CORES",
    ),
    pytest.param(
        {"num_shard": 4},
        {},
        r"--num-shard 4 \(cli\) does not match the compiled num_cores 2",
        id="num-shard",
    ),
    pytest.param(
        {},
        {"TGI_NEURON_CONTINUOUS_BATCHING": "1"},
        r"TGI_NEURON_CONTINUOUS_BATCHING=1 \(env TGI_NEURON_CONTINUOUS_BATCHING\) contradicts "
        r"the compiled continuous_batching=False .*: unset the variable, or export the model again",
        id="continuous-batching",
    ),
    pytest.param(
        {},
        {"HF_SEQUENCE_LENGTH": "long"},
        r"environment variable HF_SEQUENCE_LENGTH='long': invalid literal",
        id="unreadable-env",
    ),
]


@pytest.mark.parametrize(("flags", "environ", "message"), BAD)
def test_a_bad_combination_stops_start_up_before_weights_load(
    exported: ExportedFactory,
    monkeypatch: pytest.MonkeyPatch,
    flags: dict[str, Any],
    environ: dict[str, str],
    message: str,
) -> None:
    model = exported(batch_size=4, sequence_length=128, num_cores=2, auto_cast_type="bf16")

    def no_weights(*args: object) -> None:
        raise AssertionError("start-up went on to fetch or load the model")

    monkeypatch.setattr(launcher, "materialize", no_weights)
    config = config_for(model, environ, backend="neuron", **flags)
    # A setting the probe already cannot read makes the backend unavailable, same message.
    with pytest.raises((ConfigError, BackendUnavailable), match=message):
        launcher.prepare(config)


def test_on_device_sampling_exports_are_served_and_the_variable_must_agree(
    exported: ExportedFactory,
) -> None:
    model = exported(on_device_sampling=True)
    validated(config_for(model))  # the backend returns the device's token ids
    with pytest.raises(ConfigError, match=r"TGI_NEURON_ON_DEVICE_SAMPLING=0 .* contradicts"):
        validated(config_for(model, {"TGI_NEURON_ON_DEVICE_SAMPLING": "0"}))


def test_several_variants_none_fitting_lists_each(exported: ExportedFactory) -> None:
    root = exported("root", batch_size=2, sequence_length=128)
    (root / "bs4").mkdir()
    write_neuron_config(root / "bs4", batch_size=4, sequence_length=64)
    with pytest.raises(ConfigError, match="no exported Neuron variant fits") as raised:
        validated(config_for(root, max_batch_size=4, max_total_tokens=128))
    assert "batch_size 2 < --max-batch-size 4 (cli)" in str(raised.value)
    assert "sequence_length 64 < --max-total-tokens 128 (cli)" in str(raised.value)


def test_rebuild_mode_keeps_every_history_within_one_prefill(
    tiny_model: Path, tmp_path: Path
) -> None:
    model = tmp_path / "nxd"
    shutil.copytree(tiny_model, model)
    write_neuron_config(
        model, batch_size=4, sequence_length=128, max_context_length=64, continuous_batching=False
    )
    config = validated(config_for(model))
    assert config.max_total_tokens == 65  # a rebuild row holds up to max_total_tokens - 1
    assert config.source_of("max_total_tokens").startswith("backend neuron (max_context_length + 1")
    with pytest.raises(ConfigError, match=r"--max-total-tokens 100 \(cli\) is more than "):
        validated(config_for(model, max_total_tokens=100))
