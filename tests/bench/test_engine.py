"""`tgi bench engine` on the fake backend: every step runs, positions are right, KV is freed."""

from __future__ import annotations

import dataclasses

import pytest

from tgi.backend.contract import Batching, Capabilities, KvLayout, Limits
from tgi.bench.engine import EngineParameters, _addressing, run_engine
from tgi.testing.fake_backend import FakeBackend, FakeDeviceSamplingBackend, FakePagedBackend


def _warm(backend: FakeBackend) -> FakeBackend:
    backend.warmup(Limits(32, 64, 512, None, 8))
    return backend


def test_engine_times_every_batch_size_and_releases_kv() -> None:
    backend = _warm(FakeBackend(vocab_size=50))
    parameters = EngineParameters(
        batch_sizes=(1, 2, 4), input_len=16, decode_steps=5, runs=3, warmup_runs=1, seed=0
    )
    seen: list[tuple[int, int]] = []
    levels = run_engine(backend, parameters, 50, on_run=lambda b, r: seen.append((b, r)))
    assert [level.batch_size for level in levels] == [1, 2, 4]
    assert seen == [(b, r) for b in (1, 2, 4) for r in range(4)]
    for level in levels:
        assert level.prefill_ms.count == 3  # warm-up runs are not counted
        assert level.decode_step_ms.count == 3 * 5
        assert level.decode_total_ms.count == 3
        assert level.prefill_tokens_per_s == pytest.approx(
            level.batch_size * 16 / (level.prefill_ms.mean / 1000)
        )
        assert level.decode_tokens_per_s == pytest.approx(
            level.batch_size / (level.decode_step_ms.mean / 1000)
        )
    # the fake raises on a decode at the wrong position; all sequences were released
    assert backend.kv == {}
    assert len(backend.released) == (1 + 2 + 4) * 4
    prefills = [ids for call, ids in backend.calls if call == "prefill"]
    decodes = [ids for call, ids in backend.calls if call == "decode"]
    assert [len(ids) for ids in prefills] == [1] * 4 + [2] * 4 + [4] * 4
    assert len(decodes) == 12 * 5


def test_engine_releases_kv_when_a_step_fails() -> None:
    backend = _warm(FakeBackend(vocab_size=50, capacity_tokens=100))
    parameters = EngineParameters((8,), input_len=16, decode_steps=4, runs=1, warmup_runs=0, seed=0)
    with pytest.raises(Exception, match="KV capacity"):
        run_engine(backend, parameters, 50)  # the 7th prompt of 16 tokens exceeds 100
    assert backend.kv == {}


def test_rows_are_addressed_for_each_kv_layout() -> None:
    backend = FakeBackend()
    assert _addressing(backend, 3, 100) == (None, ())
    slots = Capabilities(Batching.STATIC, KvLayout.SLOTS, static_batch_size=8)
    backend._capabilities = slots
    assert _addressing(backend, 3, 100) == (3, ())
    backend._capabilities = dataclasses.replace(slots, kv_layout=KvLayout.PAGED, block_size=16)
    assert _addressing(backend, 1, 40) == (None, (3, 4, 5))  # 3 blocks per row


def test_engine_drives_a_paged_backend_with_whole_tables_up_front() -> None:
    backend = FakePagedBackend(vocab_size=50, num_blocks=64, block_size=4)
    backend.warmup(Limits(32, 64, 512, None, 8))
    parameters = EngineParameters((3,), input_len=9, decode_steps=6, runs=1, warmup_runs=1, seed=0)
    (level,) = run_engine(backend, parameters, 50)
    assert level.decode_step_ms.count == 6
    assert backend.kv_usage().seq_ids == frozenset()


def test_engine_reads_the_tokens_a_device_sampling_backend_returns() -> None:
    backend = FakeDeviceSamplingBackend(vocab_size=50)
    backend.warmup(Limits(32, 64, 512, None, 8))
    parameters = EngineParameters((2,), input_len=5, decode_steps=3, runs=1, warmup_runs=0, seed=0)
    (level,) = run_engine(backend, parameters, 50)
    assert level.decode_step_ms.count == 3
    decodes = [ids for call, ids in backend.calls if call == "decode"]
    assert decodes == [(0, 1)] * 3
