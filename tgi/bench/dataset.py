"""The prompts a run sends: seeded random token sequences, or prompts from a file.

NOTE: lengths are measured with the model's tokenizer, because that is what the server
counts. A random prompt is decoded from random ids, and decoding then encoding again
can merge or split tokens, so the text is trimmed or topped up until it encodes to
exactly the asked length (or the closest a few rounds reach; its true length is kept).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tgi.bench.records import BenchRequest

__all__ = ["file_requests", "load_tokenizer", "random_requests"]

logger = logging.getLogger(__name__)

_FIT_ROUNDS = 8
# ShareGPT filters, as vLLM applies them when lengths come from the data
_MIN_SHAREGPT_TOKENS = 4
_MAX_SHAREGPT_PROMPT = 1024
_MAX_SHAREGPT_TOTAL = 2048


def load_tokenizer(spec: str | None) -> Any:
    """A transformers tokenizer: a local directory, or any model id `tgi serve` accepts.

    None is the embedded SmolLM2 (converted once into tgi's cache, as `tgi serve` does).
    """
    from transformers import AutoTokenizer

    if spec is not None and Path(spec).is_dir():
        return AutoTokenizer.from_pretrained(spec)
    from tgi.config import resolve_config, snapshot_environ
    from tgi.models.source import inspect_model, materialize

    config = resolve_config({"model_id": spec}, snapshot_environ())
    files = materialize(inspect_model(config), config)
    return AutoTokenizer.from_pretrained(files.path)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def _lengths(rng: np.random.Generator, num: int, mean: int, range_ratio: float) -> np.ndarray:
    low = max(1, int(mean * (1.0 - range_ratio)))
    high = max(low, int(mean * (1.0 + range_ratio)))
    return rng.integers(low, high + 1, size=num)  # [num]


def _stable_tokens(tokenizer: Any) -> np.ndarray:
    """Ids that are not special and survive decode-then-encode alone: `[V']`.

    Byte-level vocabularies hold tokens that are parts of a UTF-8 character; alone they
    decode to U+FFFD and re-encode to something else, so prompts would never fit.
    """
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = [tokenizer.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    stable = [
        i
        for i, text, again in zip(ids, texts, encoded, strict=True)
        if "\ufffd" not in text and list(again) == [i]
    ]
    if not stable:
        raise ValueError("the tokenizer has no token that survives decode and encode")
    return np.array(stable)


def _fit(tokenizer: Any, rng: np.random.Generator, vocab: np.ndarray, length: int) -> str:
    """Text of random tokens that re-encodes to `length` tokens (or as near as it gets)."""
    ids = list(rng.choice(vocab, size=length))
    text = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
    for _ in range(_FIT_ROUNDS):
        encoded = _encode(tokenizer, text)
        if len(encoded) == length:
            break
        if len(encoded) > length:
            text = tokenizer.decode(encoded[:length], clean_up_tokenization_spaces=False)
        else:
            extra = rng.choice(vocab, size=length - len(encoded))
            text = tokenizer.decode(encoded + list(extra), clean_up_tokenization_spaces=False)
    return str(text)


def random_requests(
    tokenizer: Any,
    num_requests: int,
    input_len: int,
    output_len: int,
    *,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompts of random non-special tokens; the same seed gives the same prompts.

    Lengths are drawn uniformly from `[len * (1 - range_ratio), len * (1 + range_ratio)]`.
    """
    if input_len < 1 or output_len < 1:
        raise ValueError("input and output lengths must be at least 1")
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"range ratio must be in [0, 1), got {range_ratio}")
    rng = np.random.default_rng(seed)
    vocab = _stable_tokens(tokenizer)
    inputs = _lengths(rng, num_requests, input_len, range_ratio)
    outputs = _lengths(rng, num_requests, output_len, range_ratio)
    requests = []
    for length, out in zip(inputs, outputs, strict=True):
        text = _fit(tokenizer, rng, vocab, int(length))
        requests.append(BenchRequest(text, len(_encode(tokenizer, text)), int(out)))
    return requests


def _read_records(path: Path) -> list[tuple[str, str | None, int | None]]:
    """(prompt, reference completion, output length) from JSONL or ShareGPT JSON."""
    text = path.read_text(encoding="utf-8")
    stripped = text.lstrip()
    if stripped.startswith("["):
        rows: list[Any] = json.loads(text)
    else:
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    records: list[tuple[str, str | None, int | None]] = []
    for row in rows:
        turns = row.get("conversations") or row.get("conversation")
        if turns:  # ShareGPT: the first turn asks, the second answers
            if len(turns) < 2:
                continue
            records.append((str(turns[0]["value"]), str(turns[1]["value"]), None))
            continue
        prompt = row.get("prompt", row.get("text"))
        if prompt is None:
            raise ValueError(f"{path}: a row has neither 'prompt', 'text' nor 'conversations'")
        out = row.get("output_len", row.get("max_tokens"))
        records.append((str(prompt), row.get("completion"), int(out) if out else None))
    return records


def file_requests(
    path: Path,
    tokenizer: Any,
    num_requests: int,
    *,
    output_len: int | None = None,
    seed: int = 0,
) -> list[BenchRequest]:
    """Prompts from a JSONL file (`{"prompt", "output_len"?}` per line) or ShareGPT JSON.

    The output length is `output_len` when given, else the row's own, else the length of
    its reference completion (ShareGPT, filtered as vLLM does). Rows are shuffled with
    `seed`, and repeated when the file has fewer than `num_requests`.
    """
    requests: list[BenchRequest] = []
    for prompt, completion, own_len in _read_records(path):
        prompt_len = len(_encode(tokenizer, prompt))
        out = output_len or own_len
        if out is None:
            if completion is None:
                raise ValueError(f"{path}: no output length: pass --output-len")
            out = len(_encode(tokenizer, completion))
            if not _sharegpt_ok(prompt_len, out):
                continue
        requests.append(BenchRequest(prompt, prompt_len, int(out)))
    if not requests:
        raise ValueError(f"{path}: no usable prompts")
    order = np.random.default_rng(seed).permutation(len(requests))
    shuffled = [requests[i] for i in order]
    if len(shuffled) < num_requests:
        logger.info("%s has %d prompts; repeating them to %d", path, len(shuffled), num_requests)
    return _cycle(shuffled, num_requests)


def _sharegpt_ok(prompt_len: int, output_len: int) -> bool:
    return (
        prompt_len >= _MIN_SHAREGPT_TOKENS
        and output_len >= _MIN_SHAREGPT_TOKENS
        and prompt_len <= _MAX_SHAREGPT_PROMPT
        and prompt_len + output_len <= _MAX_SHAREGPT_TOTAL
    )


def _cycle(items: Sequence[BenchRequest], count: int) -> list[BenchRequest]:
    return [items[i % len(items)] for i in range(count)]
