"""The CPU plugin's default prefill budget: `PREFILL_BUDGET_TOKENS` where TGI's
max_input_tokens + 50 would be smaller, and never in the way of what the user set."""

from __future__ import annotations

from typing import Any

import pytest
from tgi_backend_cpu import plugin
from tgi_backend_cpu.plugin import PREFILL_BUDGET_TOKENS

from tgi.config import ServeConfig, derive_limits, parse_bytes


def _validated(environ: dict[str, str] | None = None, **values: Any) -> ServeConfig:
    """What `tgi serve` resolves: the plugin's defaults, then the core's derived limits."""
    config = ServeConfig(
        dtype="float32",
        cpu_threads=1,
        kv_cache_memory=parse_bytes("1MiB"),
        environ=environ or {},
        **values,
    )
    return derive_limits(plugin.tgi_validate_config(config=config) or config, 8192)


def test_a_short_context_gets_the_cpu_budget_with_its_reason() -> None:
    config = _validated(max_total_tokens=512)
    assert config.max_input_tokens == 511
    assert config.max_batch_prefill_tokens == PREFILL_BUDGET_TOKENS
    assert config.source_of("max_batch_prefill_tokens").startswith("backend cpu (prefill steps")


@pytest.mark.parametrize(
    ("values", "expected", "source"),
    [
        ({"max_total_tokens": 512, "max_batch_prefill_tokens": 600}, 600, "default"),
        ({"max_input_tokens": 3000, "max_total_tokens": 3100}, 3050, "derived"),
        ({}, 4145, "derived"),  # the core's default from the model's context: wider already
        # at most half the pool: a plan made ahead needs a budget's blocks free
        ({"max_total_tokens": 512, "max_batch_total_tokens": 3000}, 1500, "backend cpu"),
        ({"max_total_tokens": 512, "max_batch_total_tokens": 1024}, 561, "derived"),
    ],
)
def test_the_budget_gives_way(values: dict[str, int], expected: int, source: str) -> None:
    config = _validated(**values)
    assert config.max_batch_prefill_tokens == expected
    assert config.source_of("max_batch_prefill_tokens").startswith(source)


def test_an_explicit_generic_engine_keeps_tgis_default() -> None:
    config = _validated({plugin.ENGINE_ENV: "generic"}, max_total_tokens=512)
    assert config.max_batch_prefill_tokens == 561
    assert config.source_of("max_batch_prefill_tokens").startswith("derived")
