"""Settings resolution: command line over environment over derived values over defaults."""

from __future__ import annotations

import pytest

from tgi.backend.hookspecs import BackendFlag
from tgi.config import (
    KV_CACHE_DTYPE_CHOICES,
    QUANTIZE_CHOICES,
    derive_limits,
    parse_backend_option_args,
    resolve_backend_options,
    resolve_config,
)
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
        ({"quantize": "gguf"}, {}, "--quantize: expected one of awq, compressed-tensors, "),
        ({}, {"KV_CACHE_DTYPE": "int8"}, "KV_CACHE_DTYPE='int8': expected one of float32, "),
        ({}, {"DTYPE": "fp8"}, "DTYPE='fp8': expected one of float32, bfloat16, float16"),
        ({}, {"TGI_KV_CACHE_MEMORY": "lots"}, "TGI_KV_CACHE_MEMORY='lots'"),
        ({"speculate": -1}, {}, "--speculate must not be negative"),
    ],
)
def test_bad_engine_settings_are_named(
    values: dict[str, object], environ: dict[str, str], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve_config(values, environ=environ)


def test_quantize_accepts_tgis_whole_set_and_tgis_own() -> None:
    assert QUANTIZE_CHOICES == (
        "awq",
        "compressed-tensors",
        "eetq",
        "exl2",
        "gptq",
        "marlin",
        "bitsandbytes",
        "bitsandbytes-nf4",
        "bitsandbytes-fp4",
        "fp8",
        "int8",
        "int4",
    )
    for method in QUANTIZE_CHOICES:
        assert resolve_config({"quantize": method.upper()}, environ={}).quantize == method
    config = resolve_config({}, environ={"QUANTIZE": "bitsandbytes_nf4"})
    assert (config.quantize, config.source_of("quantize")) == ("bitsandbytes-nf4", "env QUANTIZE")


@pytest.mark.parametrize(
    ("given", "parsed"),
    [
        ("fp8", "fp8"),
        ("fp8_e4m3fn", "fp8_e4m3fn"),
        ("FP8_E4M3", "fp8_e4m3fn"),
        ("fp8_e5m2", "fp8_e5m2"),
        ("bf16", "bfloat16"),
        ("torch.float16", "float16"),
    ],
)
def test_kv_cache_dtype_takes_fp8_variants_and_float_aliases(given: str, parsed: str) -> None:
    assert resolve_config({"kv_cache_dtype": given}, environ={}).kv_cache_dtype == parsed
    assert parsed in KV_CACHE_DTYPE_CHOICES


def test_backend_option_args_are_keyed_and_checked() -> None:
    assert parse_backend_option_args(["engine=paged", "Num-Cores = 2", "path=a=b"]) == {
        "engine": "paged",
        "num_cores": "2",
        "path": "a=b",
    }
    with pytest.raises(ConfigError, match=r"--backend-option 'engine': expected KEY=VALUE"):
        parse_backend_option_args(["engine"])
    with pytest.raises(ConfigError, match="--backend-option engine is given twice"):
        resolve_config({"backend_option": ["engine=a", "engine=b"]}, environ={})
    config = resolve_config({"backend_option": ["engine=paged"]}, environ={})
    assert (config.backend_option_args, config.backend_options) == ({"engine": "paged"}, {})


def test_backend_options_resolve_typed_with_their_sources() -> None:
    flags = (
        BackendFlag("threads", "worker threads", type=int, default=1),
        BackendFlag("ratio", "a float", type=float, default=0.5),
        BackendFlag("fast", "a bool", type=bool, default=False, env="FOO_FAST"),
        BackendFlag("mode", "a choice", default="a", choices=("a", "b")),
    )
    config = resolve_config(
        {"backend_option": ["ratio=0.25"]},
        environ={"TGI_MY_BACKEND_THREADS": "3", "FOO_FAST": "1", "TGI_MY_BACKEND_MODE": ""},
    )

    resolved = resolve_backend_options(config, "my-backend", flags)

    assert resolved.backend_options == {"threads": 3, "ratio": 0.25, "fast": True, "mode": "a"}
    assert {
        name: resolved.source_of(f"backend_option.{name}")
        for name in ["threads", "ratio", "fast", "mode"]
    } == {
        "threads": "env TGI_MY_BACKEND_THREADS",
        "ratio": "cli",
        "fast": "env FOO_FAST",
        "mode": "default",
    }
