"""One shard against several, side by side in one run: `tgi serve --num-shard N`.

    .venv/bin/python benchmarks/shards_ab.py                 # SmolLM2: 1 and 3 shards
    .venv/bin/python benchmarks/shards_ab.py --shards 1,2 --model-id DIR

starts on loopback one `tgi serve --backend cpu` per shard count (SmolLM2's 9 heads
split over 3, not 2; give another model for other counts), each rank with its share of
the `--threads` cores, then runs `tgi bench serve` closed-loop at each concurrency
against each server, one server under load at a time, rounds interleaved with the order
rotating, and writes `tgi bench compare`'s table (ratios to the first count's round 1):

    benchmarks/results/<name>{.json,.md,.png}
    benchmarks/results/<name>/<system>-r<N>-c<C>.json

On a 2-core host this measures the cost of splitting (an all-reduce twice a layer over
gloo), not a speed-up: the ranks share the same two cores. On a host with one device per
rank (GPUs) the same script measures what tensor parallelism buys.
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
    _ints,
    _model_files,
    _tgi,
    compare,
    free_port,
    rounds_parser,
    run_rounds,
)

logger = logging.getLogger("shards_ab")


def main() -> None:
    parser = rounds_parser(
        __doc__.splitlines()[0],
        name="shards-ab",
        rounds=2,
        concurrency=[1, 16],
        num_prompts=[6, 32],
        output_len=64,
        warmup=1,
        kv_cache_memory="512MiB",
    )
    parser.add_argument("--shards", type=_ints, default=[1, 3])
    parser.add_argument("--model-id", default=None, help="default: the embedded SmolLM2")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    _, checkpoint = _model_files(args.cache_dir)
    model = [] if args.model_id is None else ["--model-id", args.model_id]
    if args.model_id is not None:
        checkpoint = Path(args.model_id)
    total = args.input_len + args.output_len + 16
    env = dict(os.environ, TGI_CACHE_DIR=str(args.cache_dir), TGI_BACKENDS="cpu")
    systems = []
    for shards in args.shards:
        threads = max(1, args.threads // shards)  # the ranks share the host's cores
        flags = [*model, "--num-shard", str(shards), "--cpu-threads", str(threads)]
        name = f"{shards}-shard" + ("s" if shards > 1 else "")
        systems.append(System(name, "tgi", _tgi(port := free_port(), args, total, flags), port))
    folder = args.out_dir / args.name
    folder.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    outputs = run_rounds(systems, checkpoint, args, folder, env)
    title = (
        f"--num-shard {' vs '.join(map(str, args.shards))}: "
        f"{args.model_id or 'SmolLM2-135M'}, {args.threads} cores shared, closed loop at "
        f"{','.join(map(str, args.concurrency))} streams, {args.input_len}+{args.output_len} tokens"
    )
    compare(outputs, f"{systems[0].name}-r1", folder, title)
    logger.info("done in %.0f s", time.monotonic() - started)


if __name__ == "__main__":
    main()
