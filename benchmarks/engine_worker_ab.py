"""The engine in a worker process against the engine on a thread, side by side in one run.

    .venv/bin/python benchmarks/engine_worker_ab.py

starts on loopback three `tgi serve --backend cpu` on the embedded SmolLM2 from this
tree: `thread` (`--no-engine-process`: backend and sampler on a thread of the HTTP
process), `worker` (the default: a worker process behind a Unix socket) and
`worker-overlap` (the same with `--overlap-steps`); then runs `tgi bench
serve` closed-loop at 1 and 32 concurrent streams against each, one server under load at
a time, rounds interleaved with the order rotating, and writes `tgi bench compare`'s
table (ratios to thread-r1):

    benchmarks/results/<name>{.json,.md,.png}
    benchmarks/results/<name>/<system>-r<N>.json
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from compare_smollm2 import (
    System,
    _model_files,
    _tgi,
    compare,
    free_port,
    rounds_parser,
    run_rounds,
)

logger = logging.getLogger("engine_worker_ab")

SYSTEMS = {
    "thread": ["--no-engine-process"],
    "worker": ["--engine-process"],
    # with the engine in its own process, planning ahead no longer takes the GIL from it
    "worker-overlap": ["--engine-process", "--overlap-steps"],
}


def main() -> None:
    parser = rounds_parser(
        __doc__.splitlines()[0],
        name="engine-worker-ab",
        rounds=3,
        concurrency=[1, 32],
        num_prompts=[12, 64],
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    _, checkpoint = _model_files(args.cache_dir)
    total = args.input_len + args.output_len + 16
    env = dict(os.environ, TGI_CACHE_DIR=str(args.cache_dir), TGI_BACKENDS="cpu")
    systems = [
        System(name, "tgi", _tgi(port := free_port(), args, total, flags), port)
        for name, flags in SYSTEMS.items()
    ]
    folder = args.out_dir / args.name
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outputs = run_rounds(systems, checkpoint, args, folder, env)
    title = (
        f"engine worker process vs engine thread: SmolLM2, closed loop at "
        f"{','.join(map(str, args.concurrency))} streams, {args.input_len}+{args.output_len} tokens"
    )
    compare(outputs, "thread-r1", args.out_dir / args.name, title)
    logger.info("done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
