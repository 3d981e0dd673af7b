"""Stage 2: the CUDA backend's GPU tests, and the Triton kernels' tests on real Triton.

On the GPU: `pytest backends/cuda/tests -m gpu`, then `backends/cuda/tests/test_kernels.py`
without TRITON_INTERPRET (the suite elsewhere runs the kernels in the interpreter). In the
dry run: the GPU tests are only collected, and two kernel tests run in the interpreter,
which proves the stage's plumbing in seconds. Each suite's JUnit XML is merged into
`stage2-junit.xml` (a device call returns at most 8 files); `stage2-tests.json` counts.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from tgi_backend_cuda.gpu_check._record import Mode, write_json, write_text

__all__ = ["run_tests"]

logger = logging.getLogger(__name__)

TESTS_DIR = Path("backends/cuda/tests")
KERNEL_TESTS = TESTS_DIR / "test_kernels.py"
_DRY_RUN_KERNEL_TESTS = 2
_PYTEST = (sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q")


@dataclass(slots=True)
class SuiteResult:
    """One pytest run of stage 2."""

    name: str  # "gpu" or "kernels"
    args: list[str]  # what pytest was given after its common options
    status: str = "not run"  # passed | failed | no tests | timeout | not run: <why>
    returncode: int | None = None
    seconds: float = 0.0
    tests: int = 0
    failures: int = 0
    errors: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)  # "test id: first line of the message"


def run_tests(mode: Mode, budget_s: float) -> list[SuiteResult]:
    """Run both suites within `budget_s`, writing the summary after each one."""
    deadline = time.monotonic() + budget_s
    results: list[SuiteResult] = []
    with tempfile.TemporaryDirectory() as scratch:
        for name, args, env in _suites(mode):
            result = SuiteResult(name, args)
            results.append(result)
            if name == "kernels" and not KERNEL_TESTS.exists():
                result.status = f"not run: {KERNEL_TESTS} is missing"
            elif not args:
                result.status = "not run: no kernel test collected"
            else:
                junit = Path(scratch) / f"{name}.xml"
                # leave the suite after this one a third of what is left
                share = (deadline - time.monotonic()) * (0.67 if name == "gpu" else 0.95)
                _run_suite(result, [*args, f"--junitxml={junit}"], env, share)
                _count(result, junit)
                if (
                    not mode.dry_run
                    and result.status == "passed"
                    and result.skipped == result.tests
                ):
                    # on the GPU a GPU test that skips did not run: no evidence either way
                    result.status = "failed: every test skipped"
            write_json(mode.out / "stage2-tests.json", {"dry_run": mode.dry_run, "suites": results})
        _merge_junit(sorted(Path(scratch).glob("*.xml")), mode.out / "stage2-junit.xml")
    return results


def _suites(mode: Mode) -> list[tuple[str, list[str], dict[str, str]]]:
    """(name, pytest arguments, environment) of each suite, for the GPU or the dry run."""
    real = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if not mode.dry_run:
        return [
            ("gpu", [str(TESTS_DIR), "-m", "gpu"], real),
            ("kernels", [str(KERNEL_TESTS)], real),
        ]
    interpreted = {**os.environ, "TRITON_INTERPRET": "1"}
    subset = _first_tests(KERNEL_TESTS, interpreted) if KERNEL_TESTS.exists() else []
    return [
        ("gpu", [str(TESTS_DIR), "-m", "gpu", "--collect-only"], real),
        ("kernels", subset, interpreted),
    ]


def _first_tests(path: Path, env: dict[str, str]) -> list[str]:
    """The first test of each of the first few test functions in `path`, those that name
    Triton first (the others may test only the reference implementation)."""
    listed = subprocess.run(
        [*_PYTEST, "--collect-only", str(path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    chosen: dict[str, str] = {}
    for line in listed.stdout.splitlines():
        if "::" in line and not line.startswith(" "):
            function = line.split("[", 1)[0]
            chosen.setdefault(function, line.strip())
    ranked = sorted(chosen.values(), key=lambda test_id: "triton" not in test_id.lower())
    return ranked[:_DRY_RUN_KERNEL_TESTS]


def _run_suite(result: SuiteResult, args: list[str], env: dict[str, str], budget_s: float) -> None:
    started = time.monotonic()
    logger.info("stage 2 [%s]: pytest %s", result.name, " ".join(args))
    try:
        done = subprocess.run([*_PYTEST, *args], env=env, timeout=max(budget_s, 1.0), check=False)
    except subprocess.TimeoutExpired:
        result.status = f"timeout after {budget_s:.0f} s"
    else:
        result.returncode = done.returncode
        # pytest: 0 passed, 1 some failed, 5 nothing collected; others: usage or crash
        statuses = {0: "passed", 1: "failed", 5: "no tests"}
        result.status = statuses.get(done.returncode, f"pytest exited {done.returncode}")
    result.seconds = time.monotonic() - started


def _count(result: SuiteResult, junit: Path) -> None:
    """Fill the counts and failed test ids from pytest's JUnit XML, when it wrote one."""
    if not junit.exists():
        return
    for suite in ET.parse(junit).getroot().iter("testsuite"):
        for key in ("tests", "failures", "errors", "skipped"):
            setattr(result, key, getattr(result, key) + int(suite.get(key, "0")))
        for case in suite.iter("testcase"):
            for problem in (*case.findall("failure"), *case.findall("error")):
                message = (problem.get("message") or "").strip().splitlines()
                test_id = f"{case.get('classname')}::{case.get('name')}"
                result.failed.append(f"{test_id}: {message[0] if message else problem.tag}"[:300])


def _merge_junit(paths: list[Path], target: Path) -> None:
    """One <testsuites> holding every suite's <testsuite>."""
    merged = ET.Element("testsuites")
    for path in paths:
        merged.extend(ET.parse(path).getroot().iter("testsuite"))
    write_text(target, ET.tostring(merged, encoding="unicode"))
