"""The `neuron` entry point of the `tgi.backends` group: probe, validate, create.

Real hardware: available only where `/dev/neuron*` exists and the Neuron SDK
(`optimum.neuron`) imports; the probe otherwise names what is missing. The CPU emulator
runs only when asked for with `TGI_NEURON_EMULATE=1` (and `--backend neuron`): its probe
answers available but `emulated`, so it is never picked automatically, and /info reports
the device as "neuron (emulated)".
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tgi.backend.hookspecs import BackendOptions, BackendProbe, hookimpl
from tgi.errors import BackendUnavailable, ConfigError
from tgi_backend_neuron._checks import check_export
from tgi_backend_neuron._host import read_host
from tgi_backend_neuron._options import AUTO_CAST_TYPES, NeuronOptions
from tgi_backend_neuron._plan import NeuronPlan, check_config, resolve_plan
from tgi_backend_neuron._probe import HardwareCheck, check_hardware

if TYPE_CHECKING:
    from tgi.backend.contract import Backend
    from tgi.config import ServeConfig
    from tgi.models.source import ModelFiles
    from tgi_backend_neuron._emulator import EmulatedNeuronModel

logger = logging.getLogger(__name__)

__all__ = [
    "NAME",
    "PRIORITY",
    "TGI_CONTRACT_VERSION",
    "create_backend",
    "probe",
    "tgi_backend_create",
    "tgi_backend_options",
    "tgi_backend_probe",
    "tgi_validate_config",
]

TGI_CONTRACT_VERSION = 2  # the backend contract this module implements
NAME = "neuron"
PRIORITY = 100  # an accelerator: wins over the CPU (10) wherever its devices are present
DISTRIBUTION = "tgi-backend-neuron"
DEVICE_TYPE = "xla"  # /info's model_device_type on Neuron, as TGI's own Neuron server says


def _version() -> str:
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "0+unknown"


def probe(environ: Mapping[str, str], hardware: HardwareCheck | None = None) -> BackendProbe:
    """The probe's answer for `environ`; `hardware` defaults to looking at this machine."""
    hardware = hardware or check_hardware()
    try:
        emulate = NeuronOptions.from_environ(environ).emulate
    except ConfigError as exc:
        return _answer(False, str(exc))
    if emulate:
        reason = "emulated on the CPU (TGI_NEURON_EMULATE=1); real hardware: " + hardware.reason
        return _answer(True, reason, emulated=True)
    return _answer(hardware.available, hardware.reason)


def _answer(available: bool, reason: str, *, emulated: bool = False) -> BackendProbe:
    return BackendProbe(
        name=NAME,
        version=_version(),
        available=available,
        reason=reason,
        priority=PRIORITY,
        batching="static",
        emulated=emulated,
    )


@hookimpl
def tgi_backend_probe(environ: Mapping[str, str]) -> BackendProbe:
    """Devices and SDK here? Emulation asked for? Never loads weights."""
    return probe(environ)


@hookimpl
def tgi_backend_options() -> BackendOptions:
    """No quantization; --dtype is a compiled auto_cast_type; KV is stored in that dtype."""
    return BackendOptions(
        quantize=frozenset(),
        dtypes=frozenset(AUTO_CAST_TYPES.values()),
        kv_cache_dtypes=frozenset(),
        parallelism="internal",  # --num-shard is the compiled tp degree (HF_NUM_CORES)
    )


def _model_dir(config: ServeConfig) -> tuple[Path | None, int | None]:
    """The model directory (None for a GGUF) and the model's context length."""
    from tgi.models.source import inspect_model

    info = inspect_model(config)
    return (info.location if info.location.is_dir() else None), info.max_position_embeddings


@hookimpl
def tgi_validate_config(config: ServeConfig) -> ServeConfig | None:
    """Pick the compiled shape and check every flag against it, before weights load.

    Raises ConfigError naming the flag, the compiled value and the fix; fills the limits
    left unset (max_batch_size = B, max_total_tokens = L, max_input_tokens = L // 2,
    max_batch_prefill_tokens = max_batch_size x max_input_tokens).
    """
    options = NeuronOptions.from_environ(config.environ)
    if not options.emulate:
        hardware = check_hardware()
        if not hardware.available:
            raise BackendUnavailable(f"backend 'neuron' cannot run here: {hardware.reason}")
    model_dir, context = _model_dir(config)
    plan = resolve_plan(config, model_dir, context)
    if not options.emulate:  # what optimum-neuron would refuse minutes into loading
        check_export(plan, model_dir, read_host(config.environ), config.environ)
    logger.info(
        "neuron%s: compiled %s (from %s)",
        " (emulated)" if options.emulate else "",
        plan.shape.describe(),
        plan.shape.where,
    )
    adjusted = check_config(config, plan)
    return adjusted if adjusted is not config else None


def create_backend(config: ServeConfig, model: ModelFiles) -> Backend:
    """Build the emulated or the real backend for `model` under the validated `config`."""
    from tgi_backend_neuron.backend import NeuronBackend

    plan = resolve_plan(config, model.path, model.max_position_embeddings)
    if plan.options.emulate:
        return NeuronBackend(_emulator(config, model, plan), device_type="neuron (emulated)")
    from tgi_backend_neuron._loading import load_neuron_model
    from tgi_backend_neuron._optimum import OptimumNeuronModel

    host = read_host(config.environ)
    loaded = load_neuron_model(plan, model.path, config.resolved_cache_dir, host)
    executor = OptimumNeuronModel(loaded, pad_token_id=_pad_token_id(model.path))
    return NeuronBackend(executor, device_type=DEVICE_TYPE)


def _emulator(config: ServeConfig, model: ModelFiles, plan: NeuronPlan) -> EmulatedNeuronModel:
    from tgi_backend_neuron._emulator import EmulatedNeuronModel

    shape = plan.shape
    # An exported variant that kept its checkpoint is loaded from its own directory.
    weights = (
        shape.path
        if shape.path is not None and any(shape.path.glob("*.safetensors"))
        else model.path
    )
    user_dtype = config.dtype if not config.source_of("dtype").startswith("backend") else None
    dtype = getattr(torch, user_dtype) if user_dtype else torch.float32
    logger.info(
        "neuron emulator: %d slots x %d tokens in %s on the CPU (%s), weights from %s",
        shape.batch_size,
        shape.sequence_length,
        dtype,
        "insert mode" if shape.continuous_batching else "rebuild mode",
        weights,
    )
    return EmulatedNeuronModel(
        weights,
        batch_size=shape.batch_size,
        sequence_length=shape.sequence_length,
        continuous_batching=shape.continuous_batching,
        max_context_length=shape.max_context_length,
        dtype=dtype,
        trust_remote_code=config.trust_remote_code,
        on_device_sampling=shape.on_device_sampling,
    )


def _pad_token_id(model_dir: Path) -> int:
    """What fills padded positions: the tokenizer's pad token, else EOS (as TGI does)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad or 0)


@hookimpl
def tgi_backend_create(config: ServeConfig, model: ModelFiles) -> Backend:
    """Load `model` on Neuron (or the emulator) and return the static-slots backend."""
    return create_backend(config, model)
