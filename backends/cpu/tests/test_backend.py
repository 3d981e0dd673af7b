"""CPU-specific behaviour: dtype and thread choice, KV sizing and refusals, the hooks."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pluggy
import pytest
import torch
from tgi_backend_cpu import _host, plugin
from tgi_backend_cpu.backend import TransformersCpuBackend

from tgi.backend import hookspecs
from tgi.backend.contract import (
    Backend,
    Limits,
    NewSequence,
    RunningSequence,
    StepPlan,
)
from tgi.config import ServeConfig, parse_bytes
from tgi.errors import BackendError, ConfigError
from tgi.testing.tiny_models import build_tiny_model

# tiny llama: 2 layers x 2 KV heads x head_dim 16 x (K and V) x 4 bytes (float32)
TINY_BYTES_PER_TOKEN = 512
LIMITS = Limits(
    max_input_tokens=16,
    max_total_tokens=32,
    max_batch_prefill_tokens=64,
    max_batch_total_tokens=None,
    max_batch_size=None,
)


@dataclass(frozen=True)
class FakeModelFiles:
    """Stands in for tgi.models.source.ModelFiles: the hooks only read these fields."""

    model_id: str
    path: Path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def restore_threads() -> Iterator[int]:
    before = torch.get_num_threads()
    try:
        yield before
    finally:
        torch.set_num_threads(before)


def _meminfo(tmp_path: Path, available_kb: int) -> Path:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal: 99999999 kB\nMemFree: 1 kB\nMemAvailable: {available_kb} kB\n")
    return path


def _backend(model_dir: Path, **kwargs: object) -> TransformersCpuBackend:
    return TransformersCpuBackend(model_dir, dtype=torch.float32, **kwargs)  # type: ignore[arg-type]


def _warm(model_dir: Path, tmp_path: Path, capacity_tokens: int) -> TransformersCpuBackend:
    budget = capacity_tokens * TINY_BYTES_PER_TOKEN
    backend = _backend(model_dir, kv_cache_memory=budget, meminfo=_meminfo(tmp_path, 10**9))
    backend.warmup(LIMITS)
    return backend


def _prefill(backend: TransformersCpuBackend, seq_id: int, num_tokens: int) -> None:
    backend.step(StepPlan(new=(NewSequence(seq_id, tuple(range(1, num_tokens + 1))),)))


def _decode(seq_id: int, position: int, *tokens: int) -> StepPlan:
    row = RunningSequence(seq_id, position, tokens[1:], decode=True, last_token=tokens[0])
    return StepPlan(running=(row,))


def _cpu(flags: str = "", threads: int = 4) -> _host.CpuInfo:
    return _host.CpuInfo("Test CPU", frozenset(flags.split()), "AVX2", threads)


# -- host facts ---------------------------------------------------------------------------


def test_read_cpu_info_parses_the_first_processor(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nmodel name\t: Xeon Test\nflags\t\t: fpu avx2 amx_bf16\n\n"
        "processor\t: 1\nmodel name\t: Other\nflags\t\t: fpu\n"
    )
    info = _host.read_cpu_info(cpuinfo)
    assert info.model_name == "Xeon Test"
    assert info.flags == frozenset({"fpu", "avx2", "amx_bf16"})
    assert info.fast_bf16 and not info.fast_fp16
    assert info.num_threads == len(os.sched_getaffinity(0))
    assert "Xeon Test" in info.describe() and "amx_bf16" in info.describe()


def test_read_cpu_info_without_the_file_has_no_flags(tmp_path: Path) -> None:
    info = _host.read_cpu_info(tmp_path / "missing")
    assert info.flags == frozenset() and info.model_name == ""


@pytest.mark.parametrize(
    ("requested", "flags", "expected"),
    [
        (None, "avx2 avx512f", torch.float32),
        (None, "avx512f avx512_bf16", torch.float32),
        (None, "avx512_bf16 amx_bf16", torch.bfloat16),
        ("float32", "amx_bf16", torch.float32),
        ("bfloat16", "avx2", torch.bfloat16),
        ("float16", "avx2", torch.float16),
    ],
)
def test_choose_dtype(requested: str | None, flags: str, expected: torch.dtype) -> None:
    choice = _host.choose_dtype(requested, _cpu(flags))
    assert choice.dtype == expected
    assert ("asked for" in choice.reason) == (requested is not None)


@pytest.mark.parametrize(
    ("flags", "expected"),
    [("avx512f avx512_bf16", torch.bfloat16), ("avx2 avx512f", torch.float32)],
)
def test_quantized_models_compute_in_bf16_where_the_cpu_has_it(
    flags: str, expected: torch.dtype
) -> None:
    assert _host.choose_dtype(None, _cpu(flags), quantized=True).dtype == expected


def test_choose_threads_prefers_the_setting_then_the_affinity_mask() -> None:
    assert _host.choose_threads(3, _cpu(threads=8)) == (3, "--cpu-threads")
    assert _host.choose_threads(None, _cpu(threads=8))[0] == 8


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2GiB", 2 * 2**30), ("512MB", 512_000_000), ("1000", 1000), (" 1.5 kib ", 1536)],
)
def test_parse_bytes(text: str, expected: int) -> None:
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("text", ["", "GiB", "2 GiBs", "-1GiB", "two"])
def test_parse_bytes_rejects_junk(text: str) -> None:
    with pytest.raises(ValueError, match="expected a size"):
        parse_bytes(text)


def test_kv_budget_says_where_it_came_from(tmp_path: Path) -> None:
    meminfo = _meminfo(tmp_path, 1000)
    assert _host.kv_budget_bytes(2**20, meminfo, 0.5) == (
        2**20,
        "--kv-cache-memory / TGI_KV_CACHE_MEMORY",
    )
    assert _host.kv_budget_bytes(None, meminfo, 0.5) == (
        512000,
        "50% of 1024000 bytes available",
    )


def test_mem_available_reads_kilobytes(tmp_path: Path) -> None:
    assert _host.mem_available_bytes(_meminfo(tmp_path, 2048)) == 2048 * 1024
    assert _host.mem_available_bytes(tmp_path / "missing") is None


# -- the backend ---------------------------------------------------------------------------


def test_threads_are_set_from_the_argument(model_dir: Path, restore_threads: int) -> None:
    _backend(model_dir, num_threads=1)
    assert torch.get_num_threads() == 1


def test_bytes_per_token_follows_the_model_config_and_dtype(model_dir: Path) -> None:
    assert _backend(model_dir).bytes_per_token == TINY_BYTES_PER_TOKEN
    bf16 = TransformersCpuBackend(model_dir, dtype=torch.bfloat16)
    assert bf16.bytes_per_token == TINY_BYTES_PER_TOKEN // 2


def test_bfloat16_backend_returns_float32_logits(model_dir: Path, tmp_path: Path) -> None:
    backend = TransformersCpuBackend(
        model_dir, dtype=torch.bfloat16, meminfo=_meminfo(tmp_path, 10**6)
    )
    backend.warmup(LIMITS)
    out = backend.step(StepPlan(new=(NewSequence(1, (5, 6, 7)),)))
    assert out.logits is not None
    assert out.logits.dtype == torch.float32 and tuple(out.logits.shape) == (1, 1, 259)


def test_warmup_sizes_kv_from_the_override(model_dir: Path, tmp_path: Path) -> None:
    backend = _backend(
        model_dir, kv_cache_memory=parse_bytes("1MiB"), meminfo=_meminfo(tmp_path, 10**9)
    )
    report = backend.warmup(LIMITS)
    assert report.kv.total_tokens == 2**20 // TINY_BYTES_PER_TOKEN == 2048
    assert report.kv.bytes_per_token == TINY_BYTES_PER_TOKEN
    assert report.seconds > 0
    assert backend.kv_usage().capacity_tokens == 2048


def test_warmup_sizes_kv_from_half_of_mem_available(model_dir: Path, tmp_path: Path) -> None:
    backend = _backend(model_dir, meminfo=_meminfo(tmp_path, 1000))
    assert backend.warmup(LIMITS).kv.total_tokens == 1000 * 1024 // 2 // TINY_BYTES_PER_TOKEN


def test_warmup_takes_max_batch_total_tokens_when_given(model_dir: Path, tmp_path: Path) -> None:
    backend = _backend(model_dir, meminfo=_meminfo(tmp_path, 10**6))
    limits = Limits(16, 32, 64, max_batch_total_tokens=96, max_batch_size=None)
    assert backend.warmup(limits).kv.total_tokens == 96


def test_warmup_refuses_max_batch_total_tokens_beyond_memory(
    model_dir: Path, tmp_path: Path
) -> None:
    backend = _backend(model_dir, meminfo=_meminfo(tmp_path, 1))  # 1024 bytes: 2 tokens
    limits = Limits(16, 32, 64, max_batch_total_tokens=96, max_batch_size=None)
    with pytest.raises(BackendError, match="--max-batch-total-tokens 96"):
        backend.warmup(limits)


def test_warmup_refuses_a_budget_below_one_full_sequence(model_dir: Path, tmp_path: Path) -> None:
    backend = _backend(
        model_dir, kv_cache_memory=parse_bytes("8KiB"), meminfo=_meminfo(tmp_path, 10**9)
    )  # 16 tokens < 32
    with pytest.raises(
        BackendError, match=r"--max-total-tokens 32.*--kv-cache-memory / TGI_KV_CACHE_MEMORY"
    ):
        backend.warmup(LIMITS)


def test_warmup_without_meminfo_asks_for_a_budget(model_dir: Path, tmp_path: Path) -> None:
    backend = _backend(model_dir, meminfo=tmp_path / "missing")
    with pytest.raises(BackendError, match="--kv-cache-memory / TGI_KV_CACHE_MEMORY"):
        backend.warmup(LIMITS)


def test_steps_before_warmup_are_refused(model_dir: Path) -> None:
    with pytest.raises(BackendError, match="warmup"):
        _prefill(_backend(model_dir), 1, 3)


def test_mixed_steps_match_generate(
    model_dir: Path, tmp_path: Path, make_driver: Any, reference: Any
) -> None:
    """New prompts, a later chunk and decode rows with drafts in the same plans: each row
    runs alone, so every row's tokens are what generate() gives it alone."""
    backend = _warm(model_dir, tmp_path, capacity_tokens=1000)
    generator = torch.Generator().manual_seed(3)
    prompts = {
        seq: torch.randint(0, 259, (5 + 4 * seq,), generator=generator).tolist()
        for seq in (1, 2, 3)
    }
    want = {seq: reference.greedy(model_dir, prompt, 6) for seq, prompt in prompts.items()}
    driver = make_driver(backend)
    driver.step(driver.new(1, prompts[1]), driver.new(2, prompts[2], end=4))
    driver.step(driver.new(3, prompts[3]), driver.chunk(2), driver.decode(1))
    while len(driver.tokens(3)) < 6:
        out = driver.step(
            driver.decode(3),
            driver.decode(1, want[1][len(driver.tokens(1)) :][:1]),
            driver.decode(2),
        )
        assert out.seq_ids == (3, 1, 2)
    assert {seq: driver.tokens(seq)[:6] for seq in prompts} == want
    driver.step(finished=[1])
    assert backend.kv_usage().seq_ids == {2, 3}


@pytest.mark.parametrize(
    ("plan", "message"),
    [
        (_decode(9, 4, 5), "seq 9 runs at position 4 but the backend holds None"),
        (_decode(1, 3, 5), "position 3 but the backend holds 4"),
        (StepPlan(new=(NewSequence(1, (5,)),)), "holds it already"),
        (StepPlan(new=(NewSequence(2, (5,), start_position=3),)), "cannot share a cached"),
        (StepPlan(running=(RunningSequence(1, 4, decode=True),)), "without a token"),
    ],
)
def test_broken_plans_are_refused_before_any_cache_changes(
    model_dir: Path, tmp_path: Path, plan: StepPlan, message: str
) -> None:
    backend = _warm(model_dir, tmp_path, capacity_tokens=1000)
    _prefill(backend, 1, 4)
    with pytest.raises(BackendError, match=message):
        backend.step(plan)
    assert backend.kv_usage().used_tokens == 4 and backend.kv_usage().seq_ids == {1}


def test_kv_usage_counts_the_tokens_the_caches_really_hold(model_dir: Path, tmp_path: Path) -> None:
    backend = _warm(model_dir, tmp_path, capacity_tokens=1000)
    _prefill(backend, 1, 7)
    out = backend.step(_decode(1, 7, 3, 4))  # a draft: two tokens at once
    assert out.logits is not None and tuple(out.logits.shape) == (1, 2, 259)
    assert backend.kv_usage().used_tokens == 9
    assert backend._seqs[1].cache.get_seq_length() == 9


def test_a_failed_forward_drops_the_row_and_raises(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = _warm(model_dir, tmp_path, capacity_tokens=1000)
    _prefill(backend, 1, 4)

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(backend._model, "forward", broken)
    with pytest.raises(BackendError, match="forward of seq 1 failed: out of memory"):
        backend.step(_decode(1, 4, 5))
    assert backend.kv_usage().seq_ids == frozenset()


def test_health_runs_until_close(model_dir: Path, tmp_path: Path) -> None:
    backend = _warm(model_dir, tmp_path, capacity_tokens=100)
    backend.health()
    backend.close()
    with pytest.raises(BackendError, match="closed"):
        backend.health()


# -- the plugin hooks ----------------------------------------------------------------------


@pytest.fixture
def pm() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT)
    manager.add_hookspecs(hookspecs)
    manager.register(plugin, name="cpu")
    return manager


def test_entry_point_names_the_plugin_module() -> None:
    found = [ep for ep in entry_points(group="tgi.backends") if ep.name == "cpu"]
    assert [ep.value for ep in found] == ["tgi_backend_cpu.plugin"]


def test_probe_is_available_at_low_priority(pm: pluggy.PluginManager) -> None:
    (probe,) = pm.hook.tgi_backend_probe(environ={})
    assert (probe.name, probe.available, probe.priority, probe.batching) == (
        "cpu",
        True,
        10,
        "continuous",
    )
    assert probe.version == "0.1.0"
    assert torch.backends.cpu.get_cpu_capability() in probe.reason
    assert f"{len(os.sched_getaffinity(0))} usable threads" in probe.reason


def test_validate_fills_dtype_and_threads_as_backend_values(pm: pluggy.PluginManager) -> None:
    config = pm.hook.tgi_validate_config(config=ServeConfig())
    expected = _host.choose_dtype(None, _host.read_cpu_info()).dtype
    assert config.dtype == str(expected).removeprefix("torch.")
    assert config.cpu_threads == len(os.sched_getaffinity(0))
    assert config.source_of("dtype") == config.source_of("cpu_threads") == "backend cpu"


def test_validate_keeps_explicit_settings(pm: pluggy.PluginManager) -> None:
    config = ServeConfig(dtype="float32", cpu_threads=1)
    assert pm.hook.tgi_validate_config(config=config) is None


def test_validate_rejects_more_threads_than_cores(pm: pluggy.PluginManager) -> None:
    cores = len(os.sched_getaffinity(0))
    config = ServeConfig(cpu_threads=cores + 1, sources={"cpu_threads": "env TGI_CPU_THREADS"})
    with pytest.raises(ConfigError, match=rf"--cpu-threads {cores + 1} \(env TGI_CPU_THREADS\)"):
        pm.hook.tgi_validate_config(config=config)


def test_validate_warns_about_float16_without_native_fp16(
    pm: pluggy.PluginManager, caplog: pytest.LogCaptureFixture
) -> None:
    if _host.read_cpu_info().fast_fp16:
        pytest.skip("this CPU has native fp16, so float16 is not warned about")
    config = ServeConfig(dtype="float16", cpu_threads=1, sources={"dtype": "env DTYPE"})
    with caplog.at_level(logging.WARNING, logger="tgi_backend_cpu.plugin"):
        assert pm.hook.tgi_validate_config(config=config) is None
    assert "--dtype float16 (env DTYPE)" in caplog.text


def test_create_builds_the_backend_from_config(
    pm: pluggy.PluginManager, model_dir: Path, restore_threads: int
) -> None:
    config = ServeConfig(dtype="float32", cpu_threads=1, kv_cache_memory=parse_bytes("1MiB"))
    backend = pm.hook.tgi_backend_create(
        config=config, model=FakeModelFiles("tiny", model_dir), rank=0, world_size=1
    )
    assert isinstance(backend, Backend) and isinstance(backend, TransformersCpuBackend)
    assert backend.dtype == torch.float32
    assert torch.get_num_threads() == 1
    assert backend.warmup(LIMITS).kv.total_tokens == 2**20 // TINY_BYTES_PER_TOKEN
    backend.close()


def test_create_logs_the_dtype_and_thread_choice(
    pm: pluggy.PluginManager,
    model_dir: Path,
    restore_threads: int,
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = ServeConfig(dtype="float32", cpu_threads=1)
    with caplog.at_level(logging.INFO, logger="tgi_backend_cpu.backend"):
        pm.hook.tgi_backend_create(
            config=config, model=FakeModelFiles("tiny", model_dir), rank=0, world_size=1
        ).close()
    assert "computes in torch.float32 because --dtype float32 was asked for" in caplog.text
    assert "uses 1 threads (--cpu-threads)" in caplog.text


def test_create_recomputes_a_dtype_the_validate_hook_filled(
    pm: pluggy.PluginManager, model_dir: Path, restore_threads: int
) -> None:
    config = ServeConfig(dtype="bfloat16", cpu_threads=1, sources={"dtype": "backend cpu"})
    backend = pm.hook.tgi_backend_create(
        config=config, model=FakeModelFiles("tiny", model_dir), rank=0, world_size=1
    )
    assert backend.dtype == _host.choose_dtype(None, _host.read_cpu_info()).dtype
    backend.close()
