"""The one-token fast path of `build_step` against the general path it short-cuts."""

from __future__ import annotations

import random

import pytest
import torch
from tgi_backend_cpu._paged_attention import (
    StepMetadata,
    StepRow,
    _any_rows,
    _one_token_rows,
    build_step,
)

BLOCK = 4


def _random_rows(rng: random.Random, num_rows: int, equal: bool) -> list[StepRow]:
    start = rng.randrange(0, 40)
    rows = []
    for _ in range(num_rows):
        position = start if equal else rng.randrange(0, 40)
        blocks = rng.sample(range(200), position // BLOCK + 1)
        rows.append(StepRow([rng.randrange(1000)], position, blocks))
    return rows


def _same(a: StepMetadata, b: StepMetadata) -> None:
    assert (a.num_rows, a.max_queries, a.max_keys) == (b.num_rows, b.max_queries, b.max_keys)
    assert torch.equal(a.slots, b.slots)
    assert a.query_index is None and b.query_index is None
    assert a.dense_rows is None and b.dense_rows is None
    assert a.dense_slots is not None and b.dense_slots is not None
    assert torch.equal(a.dense_slots, b.dense_slots)
    assert a.masks.keys() == b.masks.keys()
    for window, mask in a.masks.items():
        other = b.masks[window]
        assert (mask is None) == (other is None), window
        if mask is not None and other is not None:
            assert torch.equal(mask, other), window


@pytest.mark.parametrize("seed", range(40))
def test_one_token_rows_match_the_general_layout(seed: int) -> None:
    rng = random.Random(seed)
    rows = _random_rows(rng, rng.randrange(1, 6), equal=seed % 3 == 0)
    windows = rng.choice([(None,), (None, 8), (3, None, 50)])
    dense = (list(range(len(rows))), 64)
    fast = _one_token_rows(rows, BLOCK, windows, dense[1])
    general = _any_rows(rows, BLOCK, windows, dense)
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
    _same(fast[2], general[2])


def test_build_step_takes_the_fast_path_only_where_it_applies(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import tgi_backend_cpu._paged_attention as layout

    taken: list[int] = []
    fast = layout._one_token_rows
    monkeypatch.setattr(
        layout, "_one_token_rows", lambda rows, *args: taken.append(len(rows)) or fast(rows, *args)
    )
    rows = [StepRow([1], 5, [0, 1]), StepRow([2], 7, [2, 3])]
    assert build_step(rows, BLOCK, (None,), ([0, 1], 16))[2].key_slots is None
    # rows out of dense order, or no dense rows at all: the general path decides
    assert build_step(rows, BLOCK, (None,), ([1, 0], 16))[2].query_index is not None
    assert build_step(rows, BLOCK, (None,), None)[2].key_slots is not None
    assert taken == [2]  # only the in-order dense step; a two-token row never takes it
    build_step([StepRow([1, 2], 5, [0, 1])], BLOCK, (None,), ([0], 16))
    assert taken == [2]
