"""Can optimum-neuron load (or export) this model on this host? Checked before any weight.

Each check is a failure users meet at load time otherwise, minutes in, as an error
from deep inside optimum-neuron or the Neuron runtime. Here each names what differs
and the fix:

    architecture     optimum-neuron 0.4.x exports text generation for SUPPORTED_MODEL_TYPES
    export format    a transformers-neuronx export (the `neuron` section of config.json)
                     cannot be loaded by optimum-neuron >= 0.3; a GGUF file cannot be exported
    SDK versions     an NxD export loads only with the optimum-neuron and neuronx-cc
                     versions that compiled it (its neuron_config.json records both)
    target           trn1 code (trn1, trn1n, inf2) does not run on trn2, nor the reverse
    cores            tp_degree NeuronCores must be visible to this process
    weights          an export needs its sharded checkpoint (checkpoint/) or the model's
                     safetensors beside it, or a hub checkpoint_id it can download
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tgi.errors import ConfigError
from tgi_backend_neuron._compiled import NEURON_CONFIG_FILE
from tgi_backend_neuron._host import NeuronHost
from tgi_backend_neuron._plan import NeuronPlan

__all__ = ["OPTIMUM_NEURON_RANGE", "SUPPORTED_MODEL_TYPES", "check_export"]

# The optimum-neuron releases whose API `_optimum.py` and `_loading.py` call.
OPTIMUM_NEURON_RANGE = ((0, 4, 5), (0, 5, 0))
# optimum-neuron 0.4.5's text-generation models (`models/inference/auto_models.py`);
# a test compares this with the registry of the version the compat run installs.
SUPPORTED_MODEL_TYPES = frozenset(
    {
        "granite",
        "llama",
        "llama4_text",
        "mixtral",
        "phi3",
        "qwen2",
        "qwen3",
        "qwen3_moe",
        "smollm3",
    }
)
EXPORT_HINT = (
    "optimum-cli export neuron --model <checkpoint> --batch_size <B> --sequence_length <L> "
    "--num_cores <N> <output dir>"
)


def _read(path: Path) -> dict[str, Any]:
    try:
        loaded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _release(text: str | None) -> tuple[int, ...] | None:
    """(0, 4, 5) from "0.4.5", "0.4.5rc1" or "0.4.5.dev0"; None when it cannot be read."""
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", text or "")
    return tuple(int(part) for part in found.groups()) if found else None


def check_export(
    plan: NeuronPlan, model_dir: Path | None, host: NeuronHost, environ: Mapping[str, str]
) -> None:
    """ConfigError for the first thing that stops optimum-neuron serving `plan` here."""
    _check_sdk(host)
    shape = plan.shape
    if model_dir is None:
        raise ConfigError(
            "optimum-neuron exports from a transformers checkpoint directory (config.json and "
            "safetensors), not from a GGUF file. Fix: serve the model's checkpoint directory, "
            f"or export it first: {EXPORT_HINT}"
        )
    source = shape.path if shape.path is not None else model_dir
    _check_architecture(source)
    if plan.export:
        _check_cores(shape.num_cores, host, "the export's num_cores")
        _check_sampling_guard(source, plan, host)
        if not any(model_dir.glob("*.safetensors")):
            raise ConfigError(
                f"{model_dir} holds no *.safetensors weights to export. Fix: serve a "
                "checkpoint saved with safetensors"
            )
        return
    if not (source / NEURON_CONFIG_FILE).is_file():
        raise ConfigError(
            f"{shape.where}: this model was exported by transformers-neuronx, which "
            "optimum-neuron >= 0.3 cannot load. Fix: export the checkpoint again with "
            f"optimum-neuron: {EXPORT_HINT}"
        )
    recorded = _read(source / NEURON_CONFIG_FILE)
    where = str(source / NEURON_CONFIG_FILE)
    _check_versions(recorded, host, where)
    _check_target(recorded.get("target"), host, where)
    max_topk = recorded.get("max_topk", 256)
    if recorded.get("on_device_sampling") and isinstance(max_topk, int) and max_topk < 1:
        raise ConfigError(
            f"{where}: exported with on_device_sampling and max_topk={max_topk}, whose "
            "sampler accepts only top_k=-1 (uniform): nothing can be served greedily. Fix: "
            "export it again with max_topk >= 1"
        )
    _check_cores(shape.num_cores, host, f"{where}: tp_degree")
    _check_weights(source, recorded, environ, where)


def _check_sdk(host: NeuronHost) -> None:
    release = _release(host.optimum_neuron_version)
    low, high = OPTIMUM_NEURON_RANGE
    if release is None or not low <= release < high:
        found = host.optimum_neuron_version or "not installed"
        raise ConfigError(
            f"tgi-backend-neuron drives optimum-neuron >= {'.'.join(map(str, low))}, < "
            f"{'.'.join(map(str, high))}; found {found}. Fix: pip install "
            "'tgi-backend-neuron[neuron]' with AWS's Neuron package index configured"
        )


def _check_architecture(model_dir: Path) -> None:
    config = _read(model_dir / "config.json")
    text_config = config.get("text_config") if isinstance(config.get("text_config"), dict) else {}
    model_type = config.get("model_type")
    candidates = {model_type, (text_config or {}).get("model_type")} - {None}
    if candidates and not candidates & SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{model_dir / 'config.json'}: model_type {model_type!r} is not one optimum-neuron "
            f"exports for text generation ({', '.join(sorted(SUPPORTED_MODEL_TYPES))}). Fix: "
            "serve a supported architecture, or another backend"
        )


def _check_target(target: Any, host: NeuronHost, where: str) -> None:
    """optimum-neuron loads an export only on the instance family it was compiled for."""
    if host.instance is None:
        return  # no DMI here (a container without /sys): optimum-neuron says it at load
    if target is None or host.target is None or target != host.target:
        runs = f"runs {host.target} code" if host.target else "is no instance type it knows"
        raise ConfigError(
            f"{where}: compiled for target {target}, but this {host.instance} {runs} (trn1 "
            "for trn1, trn1n and inf2; trn2). Fix: export the model again on (or for) this "
            "instance type"
        )


# optimum-neuron switches on-device sampling off for these with continuous batching over
# more than one core (its Qwen2/Qwen3 classes: that combination samples garbage); forcing
# it back on through the neuron config would undo that guard.
_SAMPLING_GUARDED = frozenset({"qwen2", "qwen3"})


def _check_sampling_guard(model_dir: Path, plan: NeuronPlan, host: NeuronHost) -> None:
    options = plan.options
    cores = plan.shape.num_cores or host.cores
    model_type = _read(model_dir / "config.json").get("model_type")
    continuous = plan.shape.continuous_batching
    if options.on_device_sampling and continuous and cores > 1 and model_type in _SAMPLING_GUARDED:
        raise ConfigError(
            f"TGI_NEURON_ON_DEVICE_SAMPLING=1 ({options.source('on_device_sampling')}) with "
            f"continuous batching over {cores} NeuronCores: optimum-neuron turns on-device "
            f"sampling off for {model_type} in that case, as it samples wrong tokens there. "
            "Fix: unset the variable"
        )


def _check_versions(recorded: Mapping[str, Any], host: NeuronHost, where: str) -> None:
    pairs = (
        ("optimum_neuron_version", host.optimum_neuron_version, "optimum-neuron"),
        ("neuronxcc_version", host.neuronxcc_version, "neuronx-cc"),
    )
    for key, installed, distribution in pairs:
        compiled = recorded.get(key)
        if compiled is None:
            raise ConfigError(
                f"{where} records no {key}: it was not written by optimum-neuron >= 0.4. "
                f"Fix: export the model again: {EXPORT_HINT}"
            )
        if installed is not None and str(compiled) != installed:
            raise ConfigError(
                f"{where}: exported with {distribution} {compiled}, but {installed} is "
                f"installed, and optimum-neuron loads only exports of the versions that made "
                f"them. Fix: export the model again with {distribution} {installed}, or "
                f"install {distribution}=={compiled}"
            )


def _check_cores(needed: int | None, host: NeuronHost, what: str) -> None:
    if needed is not None and needed > host.cores:
        raise ConfigError(
            f"{what} is {needed} NeuronCores, but this process sees {host.cores} (devices "
            "x cores per device, capped by NEURON_RT_NUM_CORES / NEURON_RT_VISIBLE_CORES). "
            "Fix: free or expose more cores, or use a model exported for fewer "
            "(--num-shard / HF_NUM_CORES)"
        )


def _check_weights(
    source: Path, recorded: Mapping[str, Any], environ: Mapping[str, str], where: str
) -> None:
    sharded = source / "checkpoint" / "weights" / "tp0_sharded_checkpoint.safetensors"
    if sharded.is_file() or any(source.glob("*.safetensors")):
        return
    checkpoint = recorded.get("checkpoint_id")
    offline = environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if checkpoint and not offline:
        return  # optimum-neuron downloads the checkpoint's safetensors at load
    reason = (
        f"and its checkpoint_id {checkpoint} cannot be downloaded with HF_HUB_OFFLINE set"
        if checkpoint
        else "and records no checkpoint_id to download them from"
    )
    raise ConfigError(
        f"{where}: the export holds no weights (no checkpoint/ and no *.safetensors) {reason}. "
        "Fix: export with optimum-neuron from a local checkpoint (its save_pretrained writes "
        "checkpoint/), or copy the checkpoint's *.safetensors into the export directory"
    )
