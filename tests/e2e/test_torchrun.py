"""`tgi serve` as a torchrun job, the multi-node way on one host: two processes started by
`torchrun --nnodes 1 --nproc-per-node 2`; rank 0's serves HTTP and runs rank 0's worker,
rank 1's is the worker of rank 1. It serves transformers' greedy tokens; when rank 1 is
killed, the job ends non-zero and torchrun's summary names the rank."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tgi.parallel.env import free_port
from tgi.testing.reference import ReferenceModel
from tgi.testing.servers import wait_healthy
from tgi.testing.tiny_models import build_tiny_model

pytestmark = pytest.mark.slow

PROMPT = "hello world"
NEW_TOKENS = 12


def _greedy_reference(model_dir: Path) -> list[int]:
    import transformers

    prompt = transformers.AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    return ReferenceModel(model_dir).greedy(prompt, NEW_TOKENS, stop_at_eos=False)


def test_a_torchrun_job_serves_greedy_tokens_and_names_a_lost_rank(tmp_path: Path) -> None:
    model_dir = build_tiny_model(tmp_path / "llama", "llama", seed=1)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TGI_", "MAX_"))}
    env["TGI_BACKENDS"] = "cpu"
    log_path = tmp_path / "torchrun.log"
    with log_path.open("w") as log:
        job = subprocess.Popen(
            [
                *(sys.executable, "-m", "torch.distributed.run", "--nnodes", "1"),
                *("--nproc-per-node", "2", "--master-addr", "127.0.0.1"),
                *("--master-port", str(free_port()), "-m", "tgi.cli", "serve"),
                *("--model-id", str(model_dir), "--port", str(port), "--hostname", "127.0.0.1"),
                *("--max-total-tokens", "128", "--dtype", "float32", "--cpu-threads", "1"),
                *("--kv-cache-memory", "4MiB", "--cache-dir", str(tmp_path / "cache")),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            wait_healthy(url, job, log_path, timeout_s=180)
            answer = httpx.post(
                f"{url}/generate",
                json={
                    "inputs": PROMPT,
                    "parameters": {"max_new_tokens": NEW_TOKENS, "details": True},
                },
                timeout=60,
            ).json()
            info = httpx.get(f"{url}/info", timeout=10).json()
            rank1 = _rank1_pid(log_path)
            os.kill(rank1, signal.SIGKILL)
            status = job.wait(timeout=60)
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
                job.wait()
    text = log_path.read_text()
    assert [t["id"] for t in answer["details"]["tokens"]] == _greedy_reference(model_dir)
    assert info["engine"]["num_shard"] == 2
    assert status != 0
    assert "rank      : 1" in text  # torchrun's failure summary


def _rank1_pid(log: Path) -> int:
    for line in log.read_text().splitlines():
        if "rank 1 of 2 loaded in pid" in line:
            return int(line.rsplit(" ", 1)[1])
    pytest.fail(f"rank 1 never loaded: {log.read_text()}")
