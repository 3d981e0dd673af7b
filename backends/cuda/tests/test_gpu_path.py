"""The CUDA backend's device-neutral parts on the CPU: decode graphs' sizes and padding,
KV sizing from given memory figures, the attention choice, fp8 KV, and the whole path
(Triton kernels interpreted, graphs' stand-in) against transformers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tgi_backend_cuda.attention import ATTENTION_ENV, available_attention, choose_attention
from tgi_backend_cuda.backend import CudaBackend
from tgi_backend_cuda.device import GRAPH_RESERVE_FRACTION, GpuDevice, kv_budget_bytes
from tgi_backend_cuda.graphs import DEFAULT_GRAPH_SIZES, graph_size_for, parse_graph_sizes
from tgi_backend_cuda.platform import ROCM

from tgi.backend.contract import Limits, NewSequence, RunningSequence, StepPlan
from tgi.errors import BackendError, ConfigError
from tgi.testing import ReferenceModel
from tgi.testing.ranks import greedy_steps
from tgi.testing.tiny_models import build_tiny_model

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40))]
LIMITS = Limits(64, 128, 256, 1024, 8)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


# -- graphs ---------------------------------------------------------------------------------


def test_graph_sizes_parse_like_tgis_flag() -> None:
    assert parse_graph_sizes(None) == DEFAULT_GRAPH_SIZES
    assert parse_graph_sizes("8, 1,2,2") == (1, 2, 8)
    assert parse_graph_sizes("0") == ()
    assert parse_graph_sizes("") == ()
    # no step has more rows than --max-batch-size: one size at or above it is enough
    assert parse_graph_sizes("1,2,4,8,16,32", max_batch_size=10) == (1, 2, 4, 8, 16)
    assert parse_graph_sizes("1,2,4,8,16", max_batch_size=8) == (1, 2, 4, 8)
    with pytest.raises(ConfigError, match="comma-separated"):
        parse_graph_sizes("1,two")
    with pytest.raises(ConfigError, match="positive"):
        parse_graph_sizes("-1")


def test_a_step_takes_the_smallest_graph_that_holds_it() -> None:
    sizes = (1, 2, 4, 8)
    assert [graph_size_for(n, sizes) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, None]


def _decode_plan(lengths: dict[int, int], tokens: dict[int, int]) -> StepPlan:
    return StepPlan(
        running=tuple(
            RunningSequence(seq, n, decode=True, last_token=tokens[seq])
            for seq, n in lengths.items()
        )
    )


def test_padded_graph_steps_equal_eager_steps_and_leave_live_blocks_alone(
    model_dir: Path,
) -> None:
    """Three decode rows run as the 4-row graph (its CPU stand-in: the same static
    buffers and padding, eager): logits equal the eager backend's, and the padding row
    writes only the scratch block past the policy's."""
    pytest.importorskip("triton")

    def backend(graphs: tuple[int, ...]) -> CudaBackend:
        made = CudaBackend.from_path(
            model_dir, device="cpu", dtype=torch.float32, attention="triton", cuda_graphs=graphs
        )
        made.warmup(LIMITS)
        return made

    graphed, eager = backend((1, 2, 4)), backend(())
    assert graphed.device.graphed is not None and eager.device.graphed is None
    plan = StepPlan(
        new=tuple(
            NewSequence(seq, tuple(p), block_ids=tuple(range(8 * seq, 8 * seq + 8)))
            for seq, p in enumerate(PROMPTS)
        )
    )
    first = [b.step(plan).logits for b in (graphed, eager)]
    torch.testing.assert_close(first[0], first[1])
    lengths = {seq: len(p) for seq, p in enumerate(PROMPTS)}
    tokens = {seq: int(t) for seq, t in enumerate(first[0][:, -1].argmax(-1))}
    scratch = graphed.runner._warm.pool.num_blocks - 1  # type: ignore[union-attr]
    for _ in range(3):
        outs = [b.step(_decode_plan(lengths, tokens)).logits for b in (graphed, eager)]
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
        tokens = {seq: int(t) for seq, t in enumerate(outs[0][:, -1].argmax(-1))}
        lengths = {seq: n + 1 for seq, n in lengths.items()}
    assert graphed.device.graphed.replays == 3
    pools = [b.runner._warm.pool for b in (graphed, eager)]  # type: ignore[union-attr]
    live = scratch * 16  # slots below the scratch block: the policy's blocks
    for layer in range(len(pools[0].keys)):
        torch.testing.assert_close(pools[0].keys[layer][:live], pools[1].keys[layer][:live])
    assert graphed.warmup(LIMITS).constraints.graph_batch_sizes == (1, 2, 4)
    assert graphed.engine_details["graphs"] == "1,2,4"


def test_sdpa_attention_runs_eagerly_without_graphs(model_dir: Path) -> None:
    made = CudaBackend.from_path(
        model_dir, device="cpu", dtype=torch.float32, attention="sdpa", cuda_graphs=(1, 2)
    )
    report = made.warmup(LIMITS)
    assert made.device.graphed is None and report.constraints.graph_batch_sizes == ()
    details = made.engine_details  # what /info shows as engine.details
    assert (details["attention"], details["graphs"], details["device"]) == ("sdpa", "off", "cpu")
    assert details["attention_reason"] == f"asked for ({ATTENTION_ENV})"


# -- the whole path against transformers ---------------------------------------------------


@pytest.mark.parametrize("attention", ["sdpa", "triton"])
def test_greedy_tokens_equal_transformers_alone_and_in_a_mixed_batch(
    model_dir: Path, attention: str
) -> None:
    if attention == "triton":
        pytest.importorskip("triton")
    made = CudaBackend.from_path(
        model_dir, device="cpu", dtype=torch.float32, attention=attention, cuda_graphs=(1, 2, 4)
    )
    run = greedy_steps(made, PROMPTS, 6)
    reference = ReferenceModel(model_dir)
    expected = [list(reference.greedy(p, 6, stop_at_eos=False)) for p in PROMPTS]
    assert run.tokens == expected
    assert run.alone == expected[0]


def test_an_fp8_kv_cache_stores_fp8_and_stays_close_to_float32(model_dir: Path) -> None:
    def first_logits(kv_dtype: torch.dtype | None) -> torch.Tensor:
        made = CudaBackend.from_path(
            model_dir, device="cpu", dtype=torch.float32, attention="sdpa", kv_dtype=kv_dtype
        )
        run = greedy_steps(made, PROMPTS[:1], 4)
        pool = made.runner._warm.pool  # type: ignore[union-attr]
        assert pool.dtype == (kv_dtype or torch.float32)
        return run.first_logits

    exact, fp8 = first_logits(None), first_logits(torch.float8_e4m3fn)
    cosine = torch.nn.functional.cosine_similarity(exact, fp8, dim=-1)
    assert float(cosine.min()) > 0.99
    assert not torch.equal(exact, fp8)  # it really went through fp8


# -- KV sizing ---------------------------------------------------------------------------


def test_the_kv_budget_is_what_is_left_after_weights_the_largest_step_and_a_reserve() -> None:
    gib = 2**30
    total = 80 * gib
    reserve = int(total * GRAPH_RESERVE_FRACTION)
    # 60 GiB free of 80, 20 allocated (weights), fraction 1: free is the limit
    budget = kv_budget_bytes(
        free=60 * gib, total=total, allocated=20 * gib, peak_step=gib, fraction=1.0
    )
    assert budget == 60 * gib - gib - reserve
    # fraction 0.5: 40 GiB of the device, 20 already taken
    budget = kv_budget_bytes(
        free=60 * gib, total=total, allocated=20 * gib, peak_step=gib, fraction=0.5
    )
    assert budget == 20 * gib - gib - reserve
    assert kv_budget_bytes(free=gib, total=total, allocated=0, peak_step=2 * gib, fraction=1.0) == 0


def _device(memory: tuple[int, int], **kwargs: object) -> GpuDevice:
    return GpuDevice(
        "cpu", kv_dtype=torch.float32, attention="sdpa", memory_info=lambda: memory, **kwargs
    )  # type: ignore[arg-type]


def test_kv_blocks_follow_the_settings_first_then_device_memory(model_dir: Path) -> None:
    made = CudaBackend.from_path(model_dir, device="cpu", dtype=torch.float32, attention="sdpa")
    model = made.runner.model
    per_token, block = made.bytes_per_token, 16
    limits = Limits(64, 128, 256, None, 8)
    gib = 2**30
    device = _device((gib, gib))
    device.prepare_model(model)
    peak = device._profile_peak(limits)
    expected = kv_budget_bytes(free=gib, total=gib, allocated=0, peak_step=peak, fraction=1.0)
    assert device.num_blocks(limits, block, per_token) == expected // (per_token * block)
    half = _device((gib, gib), memory_fraction=0.5)
    half.prepare_model(model)
    assert half.num_blocks(limits, block, per_token) < device.num_blocks(limits, block, per_token)
    fixed = _device((gib, gib), kv_cache_memory=per_token * block * 10)
    assert fixed.num_blocks(limits, block, per_token) == 10
    assert device.num_blocks(Limits(64, 128, 256, 1000, 8), block, per_token) == 63  # ceil
    starved = _device((peak, 4 * peak))
    starved.prepare_model(model)
    with pytest.raises(BackendError, match="no device memory left"):
        starved.num_blocks(limits, block, per_token)


def test_the_pool_has_one_scratch_block_past_the_policys(model_dir: Path) -> None:
    made = CudaBackend.from_path(
        model_dir, device="cpu", dtype=torch.float32, attention="sdpa", kv_cache_memory=2**20
    )
    report = made.warmup(LIMITS)
    pool = made.runner._warm.pool  # type: ignore[union-attr]
    assert pool.num_blocks == report.kv.num_blocks + 1


# -- attention choice ------------------------------------------------------------------


def test_attention_falls_back_in_order_and_refuses_what_cannot_run(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert available_attention("cpu") == ["sdpa"]
    name, why = choose_attention(None, "cpu")
    assert name == "sdpa" and "flashinfer" in why and "triton" in why
    with pytest.raises(ConfigError, match="not usable on cpu"):
        choose_attention("triton", "cpu")
    with pytest.raises(ConfigError, match="offers triton, sdpa"):
        choose_attention("flashinfer", "cpu", ROCM)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    if pytest.importorskip("triton"):
        assert available_attention("cpu") == ["triton", "sdpa"]
        assert choose_attention("triton", "cpu")[0] == "triton"
