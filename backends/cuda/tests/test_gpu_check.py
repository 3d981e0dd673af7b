"""The staged GPU check (backends/cuda/gpu_check/run.sh), dry run on the CPU.

The GPU machine is lent rarely and for minutes, so the script must work the first time
it meets one: here its stages 2-4 run in the backend's CPU test mode with tiny shapes,
through the same script and the same files.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from tgi_backend_cuda.gpu_check._shapes import BENCH_SHAPES, SMOLLM2_135M

RUN_SH = Path(__file__).resolve().parents[1] / "gpu_check" / "run.sh"
# what a device call may bring back: at most eight files
RESULT_FILES = {
    "summary.txt",
    "log.txt",
    "stage2-tests.json",
    "stage2-junit.xml",
    "stage3-parity.json",
    "stage4-bench.json",
    "stage4-bench.md",
}


def _run(out: Path, *args: str, **limits: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(OUT=str(out), PYTHON=sys.executable, **limits)
    return subprocess.run(
        ["bash", str(RUN_SH), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_dry_run_writes_every_stage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run(out, "--dry-run")
    assert done.returncode == 0, done.stdout[-6000:] + done.stderr[-2000:]
    assert {p.name for p in out.iterdir()} == RESULT_FILES
    summary = (out / "summary.txt").read_text().splitlines()
    assert summary[0] == "stage 1: skipped (dry run)"
    assert [line.split(" (")[0] for line in summary[1:]] == [
        "stage 2: passed",
        "stage 3: passed",
        "stage 4: passed",
    ]

    suites = json.loads((out / "stage2-tests.json").read_text())["suites"]
    assert [s["name"] for s in suites] == ["gpu", "kernels"]
    assert suites[1]["status"] == "passed"
    assert suites[1]["tests"] == 2  # the dry run's two interpreted kernel tests

    parity = json.loads((out / "stage3-parity.json").read_text())
    assert parity["fp32_exact"] is True
    statuses = {run["attention"]: run["status"] for run in parity["runs"]}
    assert statuses["triton"] == statuses["sdpa"] == "ok"
    assert statuses["flashinfer"].startswith("not run")
    for run in parity["runs"]:
        for row in run["rows"]:
            assert row["tgi"] == row["transformers"]
            assert len(row["tgi"]) == parity["max_new_tokens"] == 8
            assert len(set(row["tgi"])) > 1  # the tokens follow the context

    bench = json.loads((out / "stage4-bench.json").read_text())
    assert [(r["shape"], r["streams"]) for r in bench["rows"]] == [("tiny", 1), ("tiny", 4)]
    for row in bench["rows"]:
        assert row["tgi_tok_s"] > 0 and row["transformers_tok_s"] > 0
        assert row["engine_tok_s"] > 0 and row["engine_overlap_tok_s"] > 0, row["engine_error"]
    assert bench["bandwidth_gb_s"] > 0
    assert "| tiny | 4 |" in (out / "stage4-bench.md").read_text()


def test_a_stage_over_its_limit_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    out = tmp_path / "out"
    done = _run(out, "--dry-run", STAGE2_S="1", STAGE3_S="1", STAGE4_S="1")
    assert done.returncode == 1
    summary = (out / "summary.txt").read_text().splitlines()
    assert [line.split(" (")[0] for line in summary] == [
        "stage 1: skipped",
        "stage 2: timeout",
        "stage 3: timeout",
        "stage 4: timeout",
    ]


def test_decode_weight_bytes_count_the_head_but_not_the_table() -> None:
    # Llama-3.1-8B: 8.03e9 parameters, of which 525,336,576 are the embedding table
    assert BENCH_SHAPES["8b"].decode_weight_bytes(torch.bfloat16) == 15_009_849_344
    # SmolLM2-135M ties its head to the table: read once, as the head
    assert SMOLLM2_135M.decode_weight_bytes(torch.float32) == 4 * 134_515_008
