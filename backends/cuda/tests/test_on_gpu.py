"""What only a GPU can show: the real kernels and graphs against transformers, and a
step that never waits on the device. Skipped without a GPU; the GPU check runs them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tgi_backend_cuda.attention import available_attention
from tgi_backend_cuda.backend import CudaBackend

from tgi.backend.contract import Limits, NewSequence, RunningSequence, StepPlan
from tgi.testing import ReferenceModel
from tgi.testing.ranks import greedy_steps
from tgi.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.gpu

PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], list(range(10, 40))]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.mark.parametrize("attention", ["flashinfer", "triton", "sdpa"])
@pytest.mark.parametrize("graphs", [(), (1, 2, 4)], ids=["eager", "graphs"])
def test_greedy_tokens_on_the_gpu_equal_transformers(
    model_dir: Path, attention: str, graphs: tuple[int, ...]
) -> None:
    if attention not in available_attention("cuda"):
        pytest.skip(f"{attention} is not installed here")
    backend = CudaBackend.from_path(
        model_dir, device="cuda", dtype=torch.float32, attention=attention, cuda_graphs=graphs
    )
    run = greedy_steps(backend, PROMPTS, 8)
    reference = ReferenceModel(model_dir)
    expected = [list(reference.greedy(p, 8, stop_at_eos=False)) for p in PROMPTS]
    assert run.tokens == expected
    if graphs and backend.device.graphed is not None:
        assert backend.device.graphed.replays > 0


@pytest.mark.parametrize("attention", ["triton", "sdpa"])
def test_a_decode_step_never_waits_for_the_device(model_dir: Path, attention: str) -> None:
    """Planning, uploading and the forward of a decode step (and a greedy pick on the
    device) run under sync debug "error": any hidden host-device sync raises."""
    backend = CudaBackend.from_path(
        model_dir, device="cuda", dtype=torch.bfloat16, attention=attention, cuda_graphs=(1, 2, 4)
    )
    backend.warmup(Limits(64, 128, 256, 1024, 8))
    new = tuple(
        NewSequence(seq, tuple(p), block_ids=tuple(range(8 * seq, 8 * seq + 8)))
        for seq, p in enumerate(PROMPTS)
    )
    tokens = backend.step(StepPlan(new=new)).logits[:, -1].argmax(-1).cpu().tolist()
    lengths = [len(p) for p in PROMPTS]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        plan = StepPlan(
            running=tuple(
                RunningSequence(seq, lengths[seq], decode=True, last_token=tokens[seq])
                for seq in range(len(PROMPTS))
            )
        )
        picked = backend.step(plan).logits[:, -1].argmax(-1)  # stays on the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = torch.empty(picked.shape, dtype=picked.dtype, pin_memory=True)
    host.copy_(picked, non_blocking=True)  # the step's one host copy
    torch.cuda.synchronize()
    assert host.shape == (len(PROMPTS),)
