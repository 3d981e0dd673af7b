"""The compute dtype by measurement (`tgi_backend_cpu._dtype_probe`): bf16 only with a
clear margin, the answer cached so a restart never flips it, shown in the log and /info."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tgi_backend_cpu._dtype_probe import MARGIN, choose_by_measurement, time_step_linears
from tgi_backend_cpu.paged import PagedCpuBackend

from tgi.config import ServeConfig
from tgi.models.source import ModelFiles, ModelKind
from tgi.testing.tiny_models import build_tiny_model


def fake_timer(bf16_speedup: float):  # type: ignore[no-untyped-def]
    def timer(rows: int, dtype: torch.dtype) -> float:
        seconds = 0.001 * rows
        return seconds / bf16_speedup if dtype == torch.bfloat16 else seconds

    return timer


@pytest.mark.parametrize(
    ("speedup", "chosen"), [(2.0, "bfloat16"), (MARGIN + 0.01, "bfloat16"), (1.05, "float32")]
)
def test_bfloat16_needs_a_clear_margin(tmp_path: Path, speedup: float, chosen: str) -> None:
    measured = choose_by_measurement(fake_timer(speedup), tmp_path / "choice.json")
    assert measured.dtype == chosen and not measured.cached
    assert measured.speedup == pytest.approx(speedup)
    assert f"bfloat16 is {speedup:.2f}x float32" in measured.reason()


def test_a_restart_reads_the_cached_choice_instead_of_measuring_again(tmp_path: Path) -> None:
    cache = tmp_path / "cpu-dtype" / "choice.json"
    first = choose_by_measurement(fake_timer(2.0), cache)
    again = choose_by_measurement(fake_timer(0.5), cache)  # would choose float32 now
    assert again.dtype == first.dtype == "bfloat16" and again.cached
    assert again.reason().startswith("cached measurement on this CPU")
    cache.write_text("{not json")
    assert choose_by_measurement(fake_timer(0.5), cache).dtype == "float32"  # re-measured


def test_the_timer_times_real_linears_and_scales_by_their_count() -> None:
    timer = time_step_linears([(64, 32, 1)])
    once = timer(4, torch.float32)
    assert once > 0
    assert time_step_linears([(64, 32, 1000)])(4, torch.float32) > 10 * once


def test_the_paged_engine_measures_when_dtype_is_unset(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "tiny", "llama")
    files = ModelFiles("tiny", ModelKind.LOCAL_DIR, model_dir, "LlamaForCausalLM", 512, None)
    config = ServeConfig(
        dtype="float32",
        cpu_threads=1,
        cache_dir=str(tmp_path / "cache"),
        sources={"dtype": "backend cpu"},  # filled by the validate hook, not asked for
    )
    backends = [PagedCpuBackend.from_config(config, files) for _ in range(2)]
    for backend in backends:
        backend.close()
    first, second = (backend.dtype_reason or "" for backend in backends)
    assert first.startswith("measured on this CPU") and "1 rows" in first
    assert second.startswith("cached measurement on this CPU")
    assert backends[0].dtype == backends[1].dtype
    assert list((tmp_path / "cache" / "cpu-dtype").glob("*.json"))
    asked = ServeConfig(dtype="float32", cpu_threads=1, cache_dir=str(tmp_path / "cache"))
    kept = PagedCpuBackend.from_config(asked, files)
    kept.close()
    assert kept.dtype == torch.float32 and kept.dtype_reason == "--dtype float32 was asked for"
