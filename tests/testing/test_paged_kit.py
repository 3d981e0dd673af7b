"""The paged test kit: `FakePagedBackend` passes the conformance suite (driven through
the router's allocator) and catches what a paged backend or router gets wrong."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from tgi.backend.contract import Backend, DecodeBatch, DecodeRow, PrefillBatch, PrefillRow
from tgi.errors import BackendError
from tgi.testing.conformance import SUITE_LIMITS, BackendConformance, Driver
from tgi.testing.fake_backend import FakePagedBackend, mixing_next_token, paged_expected_tokens

VOCAB = 64


class FakeReference:
    """The oracle for `FakePagedBackend`, in `ReferenceModel`'s shape."""

    vocab_size = VOCAB

    def greedy(self, prompt: Sequence[int], max_new_tokens: int) -> list[int]:
        return paged_expected_tokens(prompt, max_new_tokens, VOCAB)

    def prompt_logits(self, prompt: Sequence[int]) -> torch.Tensor:
        out = torch.zeros(len(prompt), VOCAB)
        for i in range(len(prompt)):
            out[i, mixing_next_token(prompt[: i + 1], VOCAB)] = 10.0
        return out


class TestFakePagedBackendConformance(BackendConformance):
    @pytest.fixture(scope="class", params=["fake"])
    @classmethod
    def architecture(cls, request: pytest.FixtureRequest) -> str:
        return str(request.param)

    @pytest.fixture(scope="class")
    @classmethod
    def model_dir(cls, tmp_path_factory: pytest.TempPathFactory) -> Path:
        return tmp_path_factory.mktemp("no-model")

    @pytest.fixture(scope="class")
    @classmethod
    def reference(cls) -> FakeReference:  # type: ignore[override]
        return FakeReference()

    @pytest.fixture
    def backend_factory(self) -> Callable[[Path], Backend]:
        blocks = (SUITE_LIMITS.max_batch_total_tokens or 0) // 4
        return lambda _: FakePagedBackend(VOCAB, num_blocks=blocks, block_size=4)


def _warm(num_blocks: int = 32) -> tuple[FakePagedBackend, Driver]:
    backend = FakePagedBackend(VOCAB, num_blocks=num_blocks, block_size=4)
    return backend, Driver(backend, backend.warmup(SUITE_LIMITS))


def test_a_wrong_block_table_is_caught() -> None:
    backend, driver = _warm()
    prompt = list(range(1, 11))
    driver.prefill({1: prompt})
    table = driver.seqs[1].block_ids
    swapped = (table[1], table[0], table[2])
    with pytest.raises(BackendError, match="differs"):
        backend.decode(DecodeBatch((DecodeRow(1, (5,), 10, block_ids=swapped),)))


def test_an_overwritten_shared_block_is_caught() -> None:
    backend, driver = _warm()
    driver.prefill({1: list(range(1, 10))})
    victim = driver.seqs[1].block_ids[0]
    # another sequence writes into block `victim`: seq 1's next read-back disagrees
    backend.prefill(PrefillBatch((PrefillRow(2, (9, 9, 9, 9), block_ids=(victim,)),)))
    with pytest.raises(BackendError, match="differs"):
        driver.decode([1])


def test_reading_an_unwritten_position_is_caught() -> None:
    backend, _ = _warm()
    with pytest.raises(BackendError, match="unwritten"):  # a prefix hit on empty blocks
        backend.prefill(PrefillBatch((PrefillRow(1, (1,), 4, block_ids=(3, 4)),)))


def test_block_table_too_short_is_caught() -> None:
    backend, _ = _warm()
    with pytest.raises(BackendError, match="past the block table"):
        backend.prefill(PrefillBatch((PrefillRow(1, (1, 2, 3, 4, 5), block_ids=(0,)),)))


def test_driver_drafts_rewind_to_the_first_rejected_position() -> None:
    backend, driver = _warm()
    prompt = [3, 1, 4, 1, 5]
    want = paged_expected_tokens(prompt, 10, VOCAB)
    driver.prefill({1: prompt})
    driver.decode([1], drafts={1: [want[1], 0 if want[2] else 1, 7]})
    assert driver.tokens(1) == want[:3]
    assert backend.kv_usage().used_tokens == len(prompt) + 4  # junk until overwritten
    driver.generate({1: 10})
    assert driver.tokens(1) == want
