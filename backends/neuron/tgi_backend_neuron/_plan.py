"""Before any weight loads: which compiled shape to serve, and do the flags fit it?

NOTE: a Neuron model runs only the shapes it was compiled for, so the scheduler must
never send more than B rows or let a sequence outgrow L tokens. `check_config` makes that
impossible by construction; every mismatch stops start-up with the flag, the compiled
value and the fix:

    --max-batch-size     <= batch_size B          (default B)
    --max-total-tokens   <= sequence_length L     (default L; rebuild mode: at most
                                                   max_context_length + 1)
    --max-input-tokens   <  L, <= max_context     (default L // 2, as TGI's Neuron image)
    --max-batch-prefill-tokens                    (default max_batch_size x max_input)
    --max-batch-total-tokens <= B x L

The compiled shape comes from the exported model (neuron_config.json, or the neuron
section of config.json; the best of several variants), else from the export
parameters: HF_BATCH_SIZE / --max-batch-size / 1, HF_SEQUENCE_LENGTH /
--max-total-tokens / min(model context, 4096), HF_NUM_CORES, HF_AUTO_CAST_TYPE.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tgi.config import ServeConfig
from tgi.errors import ConfigError
from tgi_backend_neuron._compiled import (
    CompiledShape,
    Wanted,
    find_variants,
    select_variant,
)
from tgi_backend_neuron._options import ENV, NeuronOptions

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_SEQUENCE_LENGTH_CAP", "NeuronPlan", "check_config", "resolve_plan"]

# optimum-neuron caps the default export length here: some models state huge contexts.
DEFAULT_SEQUENCE_LENGTH_CAP = 4096


@dataclass(frozen=True, slots=True)
class NeuronPlan:
    """What the backend will run: options, the compiled shape, and whether to export."""

    options: NeuronOptions
    shape: CompiledShape
    export: bool  # no exported variant: export (or emulate) with `shape`'s parameters


def _wanted(config: ServeConfig, options: NeuronOptions) -> dict[str, list[Wanted]]:
    """What the flags and HF_* variables ask of the compiled model."""
    wanted: dict[str, list[Wanted]] = {}

    def add(name: str, value: int | str | None, flag: str, source: str) -> None:
        if value is not None:
            wanted.setdefault(name, []).append(Wanted(value, flag, source))

    add("batch_size", options.batch_size, "HF_BATCH_SIZE", options.source("batch_size"))
    add("batch_size", config.max_batch_size, "--max-batch-size", config.source_of("max_batch_size"))
    seq_source = options.source("sequence_length")
    add("sequence_length", options.sequence_length, "HF_SEQUENCE_LENGTH", seq_source)
    total_source = config.source_of("max_total_tokens")
    add("sequence_length", config.max_total_tokens, "--max-total-tokens", total_source)
    add("num_cores", options.num_cores, "HF_NUM_CORES", options.source("num_cores"))
    add("num_cores", _shards(config), "--num-shard", config.source_of("num_shard"))
    cast_source = options.source("auto_cast_type")
    add("auto_cast_type", options.auto_cast_type, "HF_AUTO_CAST_TYPE", cast_source)
    if _user_dtype(config) is not None:
        add("auto_cast_type", config.dtype, "--dtype", config.source_of("dtype"))
    return wanted


def _shards(config: ServeConfig) -> int | None:
    """--num-shard when the user set it: the NeuronCores (tp degree) to compile for; the
    model is split inside the Neuron runtime, by one process (`parallelism="internal"`)."""
    return config.num_shard if config.source_of("num_shard") != "default" else None


def _user_dtype(config: ServeConfig) -> str | None:
    """--dtype when the user set it; a value our own validation filled in is not a request."""
    if config.source_of("dtype").startswith("backend neuron"):
        return None
    return config.dtype


def _export_shape(
    config: ServeConfig, options: NeuronOptions, context_length: int | None
) -> CompiledShape:
    """The shape an export (or the emulator) gets from the settings."""
    batch_size = options.batch_size or config.max_batch_size or 1
    if options.sequence_length is not None:
        length, length_from = options.sequence_length, options.source("sequence_length")
    elif config.max_total_tokens is not None:
        length, length_from = config.max_total_tokens, "--max-total-tokens"
    else:
        context = context_length or DEFAULT_SEQUENCE_LENGTH_CAP
        length = min(context, DEFAULT_SEQUENCE_LENGTH_CAP)
        length_from = f"min(model context {context}, {DEFAULT_SEQUENCE_LENGTH_CAP})"
    if options.batch_size is not None:
        batch_from = options.source("batch_size")
    elif config.max_batch_size is not None:
        batch_from = "--max-batch-size"
    else:
        batch_from = "default 1"
    continuous = options.continuous_batching
    if continuous is None:
        continuous = batch_size > 1  # what optimum-neuron compiles for B > 1
    return CompiledShape(
        batch_size=batch_size,
        sequence_length=length,
        num_cores=options.num_cores or _shards(config),
        auto_cast_type=options.auto_cast_type or _user_dtype(config),
        continuous_batching=continuous,
        max_context_length=length,
        on_device_sampling=bool(options.on_device_sampling),
        where="export parameters",
        path=None,
        batch_size_from=f"export parameter from {batch_from}",
        sequence_length_from=f"export parameter from {length_from}",
    )


def resolve_plan(
    config: ServeConfig, model_dir: Path | None, context_length: int | None
) -> NeuronPlan:
    """The compiled shape to serve `model_dir` with (None: a GGUF, always exported)."""
    options = NeuronOptions.from_environ(config.environ)
    variants = find_variants(model_dir) if model_dir is not None else []
    if not variants:
        return NeuronPlan(options, _export_shape(config, options, context_length), export=True)
    # One variant: the flag checks below name the exact mismatch. Several: pick one.
    shape = (
        variants[0] if len(variants) == 1 else select_variant(variants, _wanted(config, options))
    )
    for name in ("continuous_batching", "on_device_sampling"):  # fixed at export time
        asked, compiled = getattr(options, name), getattr(shape, name)
        if asked is not None and asked != compiled:
            raise ConfigError(
                f"{ENV[name]}={int(asked)} ({options.source(name)}) contradicts the compiled "
                f"{name}={compiled} ({shape.where}); it is fixed at export time: unset the "
                "variable, or export the model again"
            )
    return NeuronPlan(options, shape, export=False)


def _fail(flag: str, value: object, source: str, problem: str, fix: str) -> ConfigError:
    return ConfigError(f"{flag} {value} ({source}) {problem}. Fix: {fix}")


def _check_export_params(plan: NeuronPlan) -> None:
    """HF_* variables describe an export; an exported model must match them."""
    options, shape = plan.options, plan.shape
    if plan.export:
        return
    pairs: list[tuple[str, Any, Any, str]] = [
        ("batch_size", options.batch_size, shape.batch_size, "HF_BATCH_SIZE"),
        ("sequence_length", options.sequence_length, shape.sequence_length, "HF_SEQUENCE_LENGTH"),
        ("num_cores", options.num_cores, shape.num_cores, "HF_NUM_CORES"),
        ("auto_cast_type", options.auto_cast_type, shape.auto_cast_type, "HF_AUTO_CAST_TYPE"),
    ]
    for name, asked, compiled, var in pairs:
        if asked is None or compiled is None or asked == compiled:
            continue
        if name in ("batch_size", "sequence_length") and asked < compiled:
            continue  # a larger compiled shape serves a smaller request
        raise _fail(
            var,
            asked,
            f"env {var}",
            f"does not match the compiled {name} {compiled} ({shape.where})",
            f"unset {var} or set it to {compiled}, or export the model again with {name}={asked}",
        )


Updates = dict[str, tuple[Any, str]]  # setting -> (value, where it came from)


def check_config(config: ServeConfig, plan: NeuronPlan) -> ServeConfig:
    """`config` with the Neuron defaults filled in; ConfigError for what cannot run."""
    shape = plan.shape
    _check_export_params(plan)
    shards = _shards(config)
    if not plan.export and None not in (shards, shape.num_cores) and shards != shape.num_cores:
        raise _fail(
            "--num-shard",
            shards,
            config.source_of("num_shard"),
            f"does not match the compiled num_cores {shape.num_cores} ({shape.where})",
            f"leave --num-shard unset or set it to {shape.num_cores}, or export the model "
            f"again with num_cores={shards}",
        )
    updates: Updates = {}
    batch = _batch_size(config, shape, updates)
    total = _total_tokens(config, shape, updates)
    inputs = _input_tokens(config, shape, total, updates)
    if config.max_batch_prefill_tokens is None:
        why = f"max_batch_size {batch} x max_input_tokens {inputs}"
        updates["max_batch_prefill_tokens"] = (batch * inputs, why)
    _check_batch_total(config, shape)
    _dtype(config, plan, updates)
    if batch < shape.batch_size:
        logger.info(
            "neuron: --max-batch-size %d uses %d compiled slots of %d",
            batch,
            batch,
            shape.batch_size,
        )
    for name, (value, why) in updates.items():
        config = config.with_values(f"backend neuron ({why})", **{name: value})
    return config


def _batch_size(config: ServeConfig, shape: CompiledShape, updates: Updates) -> int:
    size, batch = shape.batch_size, config.max_batch_size
    if batch is not None and batch > size:
        raise _fail(
            "--max-batch-size",
            batch,
            config.source_of("max_batch_size"),
            f"is more than the compiled batch_size {size} ({shape.where}): a static batch "
            "cannot grow",
            f"set --max-batch-size to at most {size} (or leave it unset), or export the "
            f"model with batch_size {batch} (HF_BATCH_SIZE={batch})",
        )
    if batch is None:
        batch = size
        updates["max_batch_size"] = (
            size,
            f"compiled batch_size {size}, {shape.origin('batch_size')}",
        )
    return batch


def _total_tokens(config: ServeConfig, shape: CompiledShape, updates: Updates) -> int:
    length, total = shape.sequence_length, config.max_total_tokens
    if total is not None and total > length:
        raise _fail(
            "--max-total-tokens",
            total,
            config.source_of("max_total_tokens"),
            f"is more than the compiled sequence_length {length} ({shape.where}): a slot "
            f"holds at most {length} tokens",
            f"set --max-total-tokens to at most {length} (or leave it unset), or export the "
            f"model with sequence_length {total} (HF_SEQUENCE_LENGTH={total})",
        )
    given = total is not None
    if total is None:
        total = length
        why = f"compiled sequence_length {length}, {shape.origin('sequence_length')}"
        updates["max_total_tokens"] = (total, why)
    # A rebuild re-prefills a live slot's KV: up to max_total_tokens - 1 tokens in one row.
    rebuild_limit = shape.max_context_length + 1
    if shape.continuous_batching or shape.batch_size == 1 or total <= rebuild_limit:
        return total
    if given:
        raise _fail(
            "--max-total-tokens",
            total,
            config.source_of("max_total_tokens"),
            f"is more than max_context_length + 1 = {rebuild_limit} ({shape.where}): "
            "without continuous batching a new sequence makes the backend re-prefill "
            "each running one, up to max_total_tokens - 1 tokens in one row",
            f"set --max-total-tokens to at most {rebuild_limit}, or export the model "
            "with continuous batching",
        )
    updates["max_total_tokens"] = (rebuild_limit, f"max_context_length + 1, {shape.where}")
    return rebuild_limit


def _input_tokens(config: ServeConfig, shape: CompiledShape, total: int, updates: Updates) -> int:
    length, inputs = shape.sequence_length, config.max_input_tokens
    longest = min(length - 1, shape.max_context_length)
    if inputs is not None and inputs > longest:
        raise _fail(
            "--max-input-tokens",
            inputs,
            config.source_of("max_input_tokens"),
            f"is not below the compiled sequence_length {length} (max context "
            f"{shape.max_context_length}, {shape.where}): a prompt needs room for at least "
            "one generated token",
            f"set --max-input-tokens to at most {longest} (default {length // 2})",
        )
    if inputs is None:
        inputs = max(1, min(length // 2, total - 1, longest))
        why = f"half the compiled sequence_length {length}, {shape.origin('sequence_length')}"
        updates["max_input_tokens"] = (inputs, why)
    return inputs


def _check_batch_total(config: ServeConfig, shape: CompiledShape) -> None:
    size, length = shape.batch_size, shape.sequence_length
    batch_total = config.max_batch_total_tokens
    if batch_total is not None and batch_total > size * length:
        raise _fail(
            "--max-batch-total-tokens",
            batch_total,
            config.source_of("max_batch_total_tokens"),
            f"is more than the {size} x {length} tokens the compiled slots hold ({shape.where})",
            f"set it to at most {size * length} or leave it unset",
        )


def _dtype(config: ServeConfig, plan: NeuronPlan, updates: Updates) -> None:
    """--dtype must be the compiled cast type; unset, it becomes that (real hardware)."""
    compiled, dtype = plan.shape.auto_cast_type, _user_dtype(config)
    if compiled is None:
        return
    if dtype is not None and dtype != compiled:
        raise _fail(
            "--dtype",
            dtype,
            config.source_of("dtype"),
            f"differs from the compiled auto_cast_type {compiled} ({plan.shape.where})",
            f"leave --dtype unset, or export the model with auto_cast_type {dtype}",
        )
    if dtype is None and not plan.options.emulate:
        updates["dtype"] = (compiled, f"compiled auto_cast_type, {plan.shape.where}")
