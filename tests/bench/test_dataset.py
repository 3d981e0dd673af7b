"""Prompts: exact lengths under the tokenizer, seeded, and from files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tgi.bench.dataset import file_requests, random_requests


def test_random_prompts_have_exact_lengths_and_are_seeded(bench_tokenizer: Any) -> None:
    requests = random_requests(bench_tokenizer, 12, input_len=40, output_len=7, seed=3)
    assert len(requests) == 12
    for request in requests:
        assert request.prompt_len == 40
        assert len(bench_tokenizer.encode(request.prompt, add_special_tokens=False)) == 40
        assert request.output_len == 7
        assert "<|im_end|>" not in request.prompt  # no special tokens
    again = random_requests(bench_tokenizer, 12, input_len=40, output_len=7, seed=3)
    assert [r.prompt for r in again] == [r.prompt for r in requests]
    other = random_requests(bench_tokenizer, 12, input_len=40, output_len=7, seed=4)
    assert [r.prompt for r in other] != [r.prompt for r in requests]
    assert len({r.prompt for r in requests}) == 12


def test_random_lengths_vary_within_the_range(bench_tokenizer: Any) -> None:
    requests = random_requests(bench_tokenizer, 50, 20, 10, range_ratio=0.5, seed=0)
    assert {r.prompt_len for r in requests} <= set(range(10, 31))
    assert {r.output_len for r in requests} <= set(range(5, 16))
    assert len({r.prompt_len for r in requests}) > 5


def test_jsonl_prompts(tmp_path: Path, bench_tokenizer: Any) -> None:
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "abc", "output_len": 3}, {"prompt": "hello world"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match="output length"):
        file_requests(path, bench_tokenizer, 2)  # the second row says no output length
    requests = file_requests(path, bench_tokenizer, 4, output_len=9, seed=0)
    assert len(requests) == 4  # repeated to the count asked
    assert {(r.prompt, r.prompt_len, r.output_len) for r in requests} == {
        ("abc", 3, 9),
        ("hello world", 11, 9),
    }


def test_sharegpt_lengths_come_from_the_answer(tmp_path: Path, bench_tokenizer: Any) -> None:
    path = tmp_path / "sharegpt.json"
    data = [
        {
            "conversations": [
                {"from": "human", "value": "tell me"},
                {"from": "gpt", "value": "a" * 12},
            ]
        },
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]},
        {"conversations": [{"from": "human", "value": "alone"}]},
    ]
    path.write_text(json.dumps(data))
    requests = file_requests(path, bench_tokenizer, 1)
    # "hi" is under vLLM's 4-token minimum and the lone turn has no answer: one prompt left
    assert [(r.prompt, r.prompt_len, r.output_len) for r in requests] == [("tell me", 7, 12)]
