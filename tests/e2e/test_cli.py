"""The `tgi` command as users run it: real processes, real ports, the real model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tgi.testing.servers import wait_healthy

from .conftest import CACHE_DIR, free_port

TGI = str(Path(sys.executable).with_name("tgi"))


def write_broken_plugin(root: Path) -> None:
    """An installed distribution whose backend module raises on import."""
    dist = root / "broken_backend-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-backend\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[tgi.backends]\nbroken = broken_backend_mod\n")
    (root / "broken_backend_mod.py").write_text(
        "raise ImportError('libfancyaccel.so: cannot open shared object file')\n"
    )


def cli_env(extra_path: Path | None = None, **values: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TGI_", "MAX_"))}
    if extra_path is not None:
        env["PYTHONPATH"] = str(extra_path)
    env.update(values)
    return env


def test_backends_lists_cpu_and_a_broken_plugin(tmp_path: Path) -> None:
    write_broken_plugin(tmp_path)
    result = subprocess.run(
        [TGI, "backends", "--json"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    records = {record["name"]: record for record in json.loads(result.stdout)}
    assert records["cpu"]["available"] is True
    assert records["cpu"]["distribution"] == "tgi-backend-cpu"
    assert records["broken"]["status"] == "broken"
    assert "libfancyaccel.so" in records["broken"]["reason"]
    table = subprocess.run(
        [TGI, "backends"],
        env=cli_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "broken" in table and "libfancyaccel.so" in table


def test_config_shows_where_each_value_came_from() -> None:
    env = cli_env(MAX_INPUT_TOKENS="300", TGI_CACHE_DIR=str(CACHE_DIR))
    result = subprocess.run(
        [TGI, "config", "--max-total-tokens", "400"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    rows = json.loads(result.stdout)
    assert rows["max_total_tokens"] == {"value": 400, "source": "cli"}
    assert rows["max_input_tokens"] == {"value": 300, "source": "env MAX_INPUT_TOKENS"}
    # TGI's max_input_tokens + 50 would be 350; the cpu backend's GEMMs want more rows
    assert rows["max_batch_prefill_tokens"]["value"] == 1536
    assert rows["max_batch_prefill_tokens"]["source"].startswith("backend cpu (prefill steps")
    assert rows["backend"]["value"] == "cpu"


def test_bad_flags_stop_start_up_before_weights_load() -> None:
    result = subprocess.run(
        [TGI, "serve", "--max-input-tokens", "500", "--max-total-tokens", "400"],
        env=cli_env(TGI_CACHE_DIR=str(CACHE_DIR)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "--max-input-tokens (500, cli) must be below --max-total-tokens (400, cli)" in (
        result.stderr
    )
    assert "cpu backend loaded" not in result.stderr  # failed before weights loaded


def test_serve_refuses_a_port_in_use_before_loading_anything() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = subprocess.run(
            [TGI, "serve", "--hostname", "127.0.0.1", "--port", str(port)],
            env=cli_env(TGI_CACHE_DIR=str(CACHE_DIR)),
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1
    assert f"--port {port} on 127.0.0.1 is in use" in result.stderr
    assert "engine worker started" not in result.stderr


@pytest.mark.slow
@pytest.mark.smollm2
def test_sigterm_lets_the_running_request_finish_then_exits_0(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                *(TGI, "serve", "--port", str(port), "--hostname", "127.0.0.1"),
                *("--max-total-tokens", "512", "--shutdown-timeout", "60"),
            ],
            env=cli_env(TGI_CACHE_DIR=str(CACHE_DIR)),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, process, log_path)
            payload = {"inputs": "Once upon a time", "parameters": {"max_new_tokens": 200}}
            with (
                httpx.Client(base_url=url, timeout=300) as client,
                client.stream("POST", "/generate_stream", json=payload) as stream,
            ):
                lines = stream.iter_lines()
                first = next(line for line in lines if line.startswith("data:"))
                process.send_signal(signal.SIGTERM)  # mid-stream
                rest = [line for line in lines if line.startswith("data:")]
            events = [json.loads(line[5:]) for line in [first, *rest]]
            assert "error" not in events[-1], events[-1]
            assert events[-1]["generated_text"] is not None  # the final event, not a cut
            assert process.wait(timeout=60) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
    text = log_path.read_text()
    assert "draining 1 running" in text
    assert "Traceback" not in text


@pytest.mark.slow
@pytest.mark.smollm2
def test_serve_answers_despite_a_broken_plugin_and_exits_3_when_its_worker_dies(
    tmp_path: Path,
) -> None:
    write_broken_plugin(tmp_path)
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    process = subprocess.Popen(
        [
            *(TGI, "serve", "--port", str(port), "--hostname", "127.0.0.1"),
            *("--max-total-tokens", "512", "--max-engine-restarts", "0"),
        ],
        env=cli_env(tmp_path, TGI_CACHE_DIR=str(CACHE_DIR)),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process, tmp_path / "serve.log")
        prompt = (
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
        )
        response = httpx.post(
            f"{url}/generate",
            timeout=120,
            json={"inputs": prompt, "parameters": {"max_new_tokens": 20}},
        )
        assert response.status_code == 200
        assert "Paris" in response.json()["generated_text"]
        info = httpx.get(f"{url}/info", timeout=10).json()
        assert info["backend"] == "cpu"
        assert info["model_id"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        # no restarts allowed: a dead engine worker stops the server with status 3
        assert info["engine"]["placement"] == "process"
        os.kill(info["engine"]["pid"], signal.SIGKILL)
        assert process.wait(timeout=60) == 3
        assert "--max-engine-restarts 0" in (tmp_path / "serve.log").read_text()
    finally:
        if process.poll() is None:
            process.terminate()
            process.wait(timeout=60)
        log.close()
    logged = (tmp_path / "serve.log").read_text()
    assert "broken" in logged and "libfancyaccel.so" in logged
