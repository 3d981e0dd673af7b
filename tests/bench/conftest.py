"""Fixtures for the bench tests: a byte tokenizer on disk and outcome factories."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tgi.bench.records import FailureKind, RequestOutcome
from tgi.testing.tiny_models import build_byte_tokenizer


@pytest.fixture(scope="session")
def byte_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level tokenizer saved to disk, for the CLI's --tokenizer."""
    path = tmp_path_factory.mktemp("bench-tokenizer")
    build_byte_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def bench_tokenizer(byte_tokenizer_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(byte_tokenizer_dir)


def ok_outcome(
    index: int,
    ttft_s: float,
    itl_s: list[float],
    *,
    prompt_len: int = 10,
    output_len: int | None = None,
) -> RequestOutcome:
    """A successful request whose events came at ttft, then after each gap in itl_s."""
    tokens = len(itl_s) + 1
    return RequestOutcome(
        index=index,
        prompt_len=prompt_len,
        output_len=tokens if output_len is None else output_len,
        success=True,
        output_tokens=tokens,
        ttft_s=ttft_s,
        latency_s=ttft_s + sum(itl_s),
        itl_s=list(itl_s),
    )


def failed_outcome(
    index: int, kind: FailureKind, status: int | None = None, error: str = "boom"
) -> RequestOutcome:
    return RequestOutcome(
        index=index,
        prompt_len=10,
        output_len=5,
        failure=kind,
        status_code=status,
        error=error,
    )
