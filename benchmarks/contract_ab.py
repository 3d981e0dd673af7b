"""This commit's tgi against an earlier commit's, side by side in one run: Poisson arrivals.

    .venv/bin/python benchmarks/contract_ab.py --baseline-ref 521365e

checks the baseline out into a git worktree (.cache/ab/<sha>), starts on loopback
`tgi serve --backend cpu` from it (its `tgi` and `tgi_backend_cpu` first on PYTHONPATH,
the same venv otherwise), this tree's `tgi serve`, and this tree with each --variant's
extra flags (`now-overlap`: `--overlap-steps`), all on the embedded SmolLM2; then runs
`tgi bench serve` with Poisson arrivals (`--request-rate`, burstiness 1) capped at
`--max-concurrency` streams, one server under load at a time, rounds interleaved with
the order of systems rotating, and writes `tgi bench compare`'s table:

    benchmarks/results/<name>{.json,.md,.png}       the comparison, baseline first
    benchmarks/results/<name>/<system>-r<N>.json    every run (ratios are to baseline-r1)
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_smollm2 import (
    BIN,
    ROOT,
    System,
    _model_files,
    _start,
    _stop,
    _tgi,
    compare,
    free_port,
)

logger = logging.getLogger("contract_ab")

DEFAULT_VARIANTS = {"now-overlap": ["--overlap-steps"]}


def _worktree(ref: str) -> Path:
    """A detached worktree of `ref` under .cache/ab, made once."""
    sha = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", ref], check=True, capture_output=True, text=True
    ).stdout.strip()
    path = ROOT / ".cache" / "ab" / sha[:12]
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), sha], check=True
        )
    return path


def _bench(
    system: System, label: str, checkpoint: Path, args: argparse.Namespace, output: Path
) -> None:
    command = [
        str(BIN / "tgi"),
        "bench",
        "serve",
        "--url",
        f"http://127.0.0.1:{system.port}",
        "--label",
        label,
        "--tokenizer",
        str(checkpoint),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--request-rate",
        str(args.request_rate),
        "--burstiness",
        "1",
        "--max-concurrency",
        str(args.max_concurrency),
        "--num-prompts",
        str(args.num_prompts),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
        "--no-progress",
        "--output",
        str(output),
    ]
    logger.info("%s: %s", system.name, " ".join(command))
    subprocess.run(command, check=True)


def main() -> None:
    today = datetime.date.today().isoformat()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline-ref", required=True, help="the git ref to compare with")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--request-rate", type=float, default=2.0)
    parser.add_argument("--max-concurrency", type=int, default=32)
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--kv-cache-memory", default="1GiB")
    parser.add_argument("--name", default=f"{today}-contract-v2-ab")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--cache-dir", type=Path, default=ROOT / ".cache" / "tgi-test")
    parser.add_argument("--start-timeout", type=float, default=600.0)
    parser.add_argument("--no-variants", action="store_true", help="baseline and now only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    _, checkpoint = _model_files(args.cache_dir)
    total = args.input_len + args.output_len + 16
    base_env = dict(os.environ, TGI_CACHE_DIR=str(args.cache_dir), TGI_BACKENDS="cpu")
    tree = _worktree(args.baseline_ref)
    old_path = os.pathsep.join([str(tree), str(tree / "backends" / "cpu")])
    runs: list[tuple[System, dict[str, str]]] = [
        (
            System("baseline", "tgi", _tgi(port := free_port(), args, total), port),
            dict(base_env, PYTHONPATH=old_path),
        ),
        (System("now", "tgi", _tgi(port := free_port(), args, total), port), base_env),
    ]
    if not args.no_variants:
        for name, flags in DEFAULT_VARIANTS.items():
            port = free_port()
            runs.append((System(name, "tgi", _tgi(port, args, total, flags), port), base_env))

    folder = args.out_dir / args.name
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    processes = []
    outputs: list[Path] = []
    try:
        for system, env in runs:
            processes.append(_start(system, env, args.start_timeout))
        systems = [system for system, _ in runs]
        for round_index in range(args.rounds):
            shift = round_index % len(systems)
            for system in [*systems[shift:], *systems[:shift]]:
                label = f"{system.name}-r{round_index + 1}"  # one label per run
                output = folder / f"{label}.json"
                _bench(system, label, checkpoint, args, output)
                outputs.append(output)
    finally:
        for process in processes:
            _stop(process)
    stem = args.out_dir / args.name
    title = (
        f"tgi now vs {args.baseline_ref}: SmolLM2, Poisson {args.request_rate} req/s, "
        f"<= {args.max_concurrency} streams, {args.input_len}+{args.output_len} tokens"
    )
    compare(outputs, "baseline-r1", stem, title)
    logger.info("done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
