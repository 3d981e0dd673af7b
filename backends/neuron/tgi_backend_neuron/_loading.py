"""Load an exported model with optimum-neuron 0.4.x, or export a checkpoint once and keep it.

Compiling a model for Neuron takes minutes to hours, so an export is saved under the
cache directory (`<cache>/neuron-exports/<name>-<key>/`) and the next start loads it:

    exported variant found          NeuronModelForCausalLM.from_pretrained(variant)
    checkpoint, export in cache     NeuronModelForCausalLM.from_pretrained(cached)
    checkpoint, nothing cached      get_neuron_config(...) + export(...)   (compiles; logged)
                                    save_pretrained(<cached>.partial) -> rename -> load it

The cache key covers what changes the compiled graphs or the weights: the checkpoint
(its config.json and the names, sizes and times of its safetensors), the shape asked,
and the optimum-neuron / neuronx-cc versions and target (an export loads only with the
versions that made it). The export itself goes through optimum-neuron, whose compiler
cache also reuses graphs compiled before (its hub cache, where configured).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from tgi.errors import BackendError
from tgi_backend_neuron._host import NeuronHost
from tgi_backend_neuron._plan import NeuronPlan

logger = logging.getLogger(__name__)

__all__ = ["EXPORTS_DIR", "export_dir", "export_settings", "load_neuron_model"]

EXPORTS_DIR = "neuron-exports"


def export_settings(plan: NeuronPlan, host: NeuronHost) -> dict[str, Any]:
    """What the export asks of `get_neuron_config` and the neuron config, from the plan;
    None leaves optimum-neuron's own default (the model's dtype, its on-device sampling
    and continuous batching choices). The cores are always explicit (optimum-neuron's
    default is every visible core), so the kept export's key names them."""
    shape, options = plan.shape, plan.options
    return {
        "batch_size": shape.batch_size,
        "sequence_length": shape.sequence_length,
        "tensor_parallel_size": shape.num_cores or host.cores,
        "torch_dtype": shape.auto_cast_type,
        "continuous_batching": options.continuous_batching,
        "on_device_sampling": options.on_device_sampling,
    }


def export_dir(plan: NeuronPlan, model_dir: Path, cache_dir: Path, host: NeuronHost) -> Path:
    """Where the export of `model_dir` with `plan`'s settings is kept on this host."""
    files = sorted(model_dir.glob("*.safetensors"))
    key = {
        "model": str(model_dir.resolve()),
        "config": hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest(),
        "weights": [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files],
        "settings": export_settings(plan, host),
        "optimum_neuron": host.optimum_neuron_version,
        "neuronx_cc": host.neuronxcc_version,
        "target": host.target,
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / EXPORTS_DIR / f"{model_dir.name}-{digest}"


def load_neuron_model(
    plan: NeuronPlan, model_dir: Path, cache_dir: Path, host: NeuronHost, api: Any = None
) -> Any:
    """The loaded `NxDModelForCausalLM`; `api` is optimum-neuron's NeuronModelForCausalLM
    (tests hand in a stand-in)."""
    if api is None:
        from optimum.neuron import NeuronModelForCausalLM  # type: ignore[import-not-found]

        api = NeuronModelForCausalLM
    started = time.perf_counter()
    if not plan.export:
        path = plan.shape.path or model_dir
        logger.info("neuron: loading the exported model %s", path)
        model = api.from_pretrained(str(path))
    else:
        target = export_dir(plan, model_dir, cache_dir, host)
        if not (target / "neuron_config.json").is_file():
            _export(api, plan, model_dir, target, host)
        else:
            logger.info("neuron: loading the export kept from an earlier start: %s", target)
        model = api.from_pretrained(str(target))
    logger.info("neuron: model ready in %.1f s", time.perf_counter() - started)
    config = model.neuron_config
    if (int(config.batch_size), int(config.sequence_length)) != (
        plan.shape.batch_size,
        plan.shape.sequence_length,
    ):
        raise BackendError(
            f"the loaded model runs batch_size={config.batch_size}, sequence_length="
            f"{config.sequence_length}, but start-up validated {plan.shape.describe()}"
        )
    return model


def _export(api: Any, plan: NeuronPlan, model_dir: Path, target: Path, host: NeuronHost) -> None:
    """Compile `model_dir` with the plan's settings and save it as `target`, whole or not
    at all: it is written to a `.partial-<pid>` directory and renamed, so a crash leaves
    no half export to load, and two servers sharing the cache do not clobber each other
    (the second to finish keeps the first one's export)."""
    settings = export_settings(plan, host)
    neuron_config = api.get_neuron_config(
        str(model_dir),
        batch_size=settings["batch_size"],
        sequence_length=settings["sequence_length"],
        tensor_parallel_size=settings["tensor_parallel_size"],
    )
    if settings["torch_dtype"] is not None:
        neuron_config.torch_dtype = getattr(torch, settings["torch_dtype"])
    for name in ("continuous_batching", "on_device_sampling"):
        if settings[name] is not None:
            setattr(neuron_config, name, settings[name])
    logger.warning(
        "neuron: no export of %s for batch_size=%d, sequence_length=%d here; compiling one "
        "(minutes to hours, once: it is kept in %s)",
        model_dir,
        settings["batch_size"],
        settings["sequence_length"],
        target,
    )
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.partial-*"):
        if not _alive(stale.name.rsplit("-", 1)[-1]):
            shutil.rmtree(stale, ignore_errors=True)  # a crashed export's leftovers
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    try:
        model = api.export(str(model_dir), neuron_config=neuron_config, load_weights=False)
        model.save_pretrained(str(partial))  # the graphs, the configs, the sharded weights
        del model
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if (target / "neuron_config.json").is_file():  # another server finished first
        shutil.rmtree(partial, ignore_errors=True)
        return
    shutil.rmtree(target, ignore_errors=True)  # an incomplete directory in the way
    os.replace(partial, target)
    logger.info("neuron: exported in %.0f s to %s", time.perf_counter() - started, target)


def _alive(pid: str) -> bool:
    """Whether process `pid` (a `.partial-<pid>` suffix) still runs on this host."""
    if not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
