"""Settings resolution: command line over environment over derived values over defaults."""

from __future__ import annotations

import pytest

from tgi.config import derive_limits, resolve_config
from tgi.errors import ConfigError


def test_cli_beats_environment_beats_default() -> None:
    config = resolve_config(
        {"port": 9000, "max_best_of": None},
        environ={"PORT": "8000", "MAX_BEST_OF": "3", "MAX_STOP_SEQUENCES": "6"},
    )
    assert (config.port, config.source_of("port")) == (9000, "cli")
    assert (config.max_best_of, config.source_of("max_best_of")) == (3, "env MAX_BEST_OF")
    assert config.max_stop_sequences == 6
    assert (config.max_top_n_tokens, config.source_of("max_top_n_tokens")) == (5, "default")


def test_tgi_environment_names_and_aliases() -> None:
    config = resolve_config(
        {},
        environ={
            "MODEL_ID": "/models/x",
            "MAX_INPUT_LENGTH": "100",
            "TGI_BACKEND": "cpu",
            "JSON_OUTPUT": "true",
            "DTYPE": "bf16",
            "WAITING_SERVED_RATIO": "0.5",
        },
    )
    assert config.model_id == "/models/x"
    assert config.max_input_tokens == 100
    assert config.source_of("max_input_tokens") == "env MAX_INPUT_LENGTH"
    assert config.backend == "cpu"
    assert config.json_output is True
    assert config.dtype == "bfloat16"
    assert config.waiting_served_ratio == 0.5


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MAX_TOTAL_TOKENS='lots'"):
        resolve_config({}, environ={"MAX_TOTAL_TOKENS": "lots"})
    with pytest.raises(ConfigError, match="--dtype"):
        resolve_config({"dtype": "int3"}, environ={})


def test_non_positive_limits_are_rejected_with_their_source() -> None:
    with pytest.raises(ConfigError, match=r"--max-batch-size must be positive, got 0 \(env"):
        resolve_config({}, environ={"MAX_BATCH_SIZE": "0"})


def test_limits_derive_from_the_model_context_as_tgi_does() -> None:
    config = derive_limits(resolve_config({}, environ={}), max_position_embeddings=8192)
    assert config.max_total_tokens == 4096  # capped
    assert config.max_input_tokens == 4095
    assert config.max_batch_prefill_tokens == 4145
    assert config.source_of("max_input_tokens").startswith("derived")
    small = derive_limits(resolve_config({}, environ={}), max_position_embeddings=512)
    assert (small.max_total_tokens, small.max_input_tokens) == (512, 511)


def test_max_input_alone_derives_the_total() -> None:
    config = derive_limits(resolve_config({"max_input_tokens": 200}, environ={}), 8192)
    assert (config.max_input_tokens, config.max_total_tokens) == (200, 201)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"max_input_tokens": 300, "max_total_tokens": 300}, "must be below --max-total-tokens"),
        (
            {"max_input_tokens": 300, "max_total_tokens": 400, "max_batch_prefill_tokens": 299},
            "must be at least --max-input-tokens",
        ),
        (
            {"max_total_tokens": 400, "max_batch_total_tokens": 399},
            "one full-length request must fit",
        ),
    ],
)
def test_contradictory_limits_name_both_flags(values: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        derive_limits(resolve_config(values, environ={}), 8192)


def test_with_values_records_the_new_source_and_leaves_the_original() -> None:
    config = resolve_config({}, environ={})
    adjusted = config.with_values("backend neuron", max_batch_size=4)
    assert adjusted.max_batch_size == 4
    assert adjusted.source_of("max_batch_size") == "backend neuron"
    assert config.max_batch_size is None


def test_engine_settings_parse_from_cli_and_environment() -> None:
    config = resolve_config(
        {"quantize": "INT8", "kv_cache_memory": "2GiB"},
        environ={"SPECULATE": "2", "KV_CACHE_DTYPE": "bf16", "PREFIX_CACHING": "0"},
    )
    assert config.quantize == "int8"
    assert config.kv_cache_memory == 2 * 2**30
    assert (config.speculate, config.source_of("speculate")) == (2, "env SPECULATE")
    assert config.kv_cache_dtype == "bfloat16"
    assert config.prefix_caching is False
    assert resolve_config({}, environ={}).prefix_caching is True


@pytest.mark.parametrize(
    ("values", "environ", "message"),
    [
        ({"quantize": "gptq"}, {}, "--quantize: expected one of int8, int4"),
        ({}, {"TGI_KV_CACHE_MEMORY": "lots"}, "TGI_KV_CACHE_MEMORY='lots'"),
        ({"speculate": -1}, {}, "--speculate must not be negative"),
    ],
)
def test_bad_engine_settings_are_named(
    values: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(values, environ=environ)
