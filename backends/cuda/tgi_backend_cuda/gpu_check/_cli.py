"""The command line of the GPU check's Python stages; exit status 1 when a stage failed."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from tgi_backend_cuda.gpu_check._record import Mode

__all__ = ["main"]

logger = logging.getLogger(__name__)

_FAILED_SUITE = ("failed", "timeout", "pytest exited")


def _stage2(mode: Mode, args: argparse.Namespace) -> bool:
    from tgi_backend_cuda.gpu_check._tests import run_tests

    suites = run_tests(mode, args.budget_s)
    return not any(suite.status.startswith(_FAILED_SUITE) for suite in suites)


def _stage3(mode: Mode, args: argparse.Namespace) -> bool:
    from tgi_backend_cuda.gpu_check._parity import run_parity

    report = run_parity(mode)
    failed = any(run.status == "failed" for run in report.runs)
    return report.fp32_exact is True and not failed


def _stage4(mode: Mode, args: argparse.Namespace) -> bool:
    from tgi_backend_cuda.gpu_check._bench import BenchSettings, run_bench

    base = BenchSettings.dry_run() if mode.dry_run else BenchSettings()
    settings = dataclasses.replace(
        base,
        shapes=tuple(args.shapes.split(",")) if args.shapes else base.shapes,
        streams=tuple(int(n) for n in args.streams.split(",")) if args.streams else base.streams,
        decode_steps=args.steps or base.decode_steps,
    )
    report = run_bench(mode, settings)
    errors = [r for r in report.rows if r.tgi_error or r.transformers_error]
    return not errors and report.bandwidth_gb_s is not None


STAGES: dict[int, Callable[[Mode, argparse.Namespace], bool]] = {
    2: _stage2,
    3: _stage3,
    4: _stage4,
}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the chosen stages (all by default) in order; 0 when every one passed."""
    parser = argparse.ArgumentParser(
        prog="python -m tgi_backend_cuda.gpu_check",
        description="The staged GPU check's stages 2-4 (backends/cuda/gpu_check/README.md).",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the results")
    parser.add_argument("--stage", type=int, choices=sorted(STAGES), action="append")
    parser.add_argument("--dry-run", action="store_true", help="CPU test mode, tiny shapes")
    parser.add_argument("--budget-s", type=float, default=60.0, help="stage 2's pytest time")
    parser.add_argument("--shapes", help="stage 4: comma-separated, of 1b, 8b, tiny")
    parser.add_argument("--streams", help="stage 4: comma-separated stream counts")
    parser.add_argument("--steps", type=int, help="stage 4: timed decode steps")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    mode = Mode(args.out, args.dry_run)
    passed = True
    for stage in args.stage or sorted(STAGES):
        started = time.monotonic()
        ok = STAGES[stage](mode, args)
        logger.info(
            "stage %d %s in %.1f s", stage, "passed" if ok else "FAILED", time.monotonic() - started
        )
        passed = passed and ok
    return 0 if passed else 1
