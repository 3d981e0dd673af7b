"""The paged test kit: `FakePagedBackend` passes the conformance suite (driven through
the router's allocator) and catches what a paged backend or router gets wrong."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

from tgi.backend.contract import Backend, NewSequence, RunningSequence, StepPlan
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


def test_a_wrong_appended_block_is_caught() -> None:
    """Seq 2 crosses into a new block but the plan names one of seq 1's: seq 2 writes
    over seq 1's tokens, and seq 1's next read-back disagrees."""
    backend, driver = _warm()
    driver.prefill({1: list(range(1, 9)), 2: [1, 2, 3, 4]})
    row = driver.decode_row(2)
    assert row.new_block_ids, "position 4 of seq 2 needs a second block"
    stolen = driver.block_ids(1)[1]
    wrong = RunningSequence(2, 4, decode=True, last_token=row.last_token, new_block_ids=(stolen,))
    backend.step(StepPlan(running=(wrong,)))
    with pytest.raises(BackendError, match="differs"):
        backend.step(StepPlan(running=(driver.decode_row(1),)))


def test_a_decode_row_that_drops_its_new_block_is_caught() -> None:
    """A row crossing into a block must name it: the table the backend keeps is short."""
    backend, driver = _warm()
    driver.prefill({1: [1, 2, 3]})  # one block; the decode writes position 3, then 4
    driver.decode([1])
    row = driver.decode_row(1)
    assert row.new_block_ids, "position 4 needs a second block"
    without = RunningSequence(1, row.start_position, decode=True, last_token=row.last_token)
    with pytest.raises(BackendError, match="past the block table"):
        backend.step(StepPlan(running=(without,)))


def test_an_overwritten_shared_block_is_caught() -> None:
    backend, driver = _warm()
    driver.prefill({1: list(range(1, 10))})
    victim = driver.block_ids(1)[0]
    # another sequence writes into block `victim`: seq 1's next read-back disagrees
    backend.step(StepPlan(new=(NewSequence(2, (9, 9, 9, 9), block_ids=(victim,)),)))
    with pytest.raises(BackendError, match="differs"):
        driver.decode([1])


def test_reading_an_unwritten_position_is_caught() -> None:
    backend, _ = _warm()
    with pytest.raises(BackendError, match="unwritten"):  # a prefix hit on empty blocks
        backend.step(StepPlan(new=(NewSequence(1, (1,), 4, block_ids=(3, 4)),)))


def test_block_table_too_short_is_caught() -> None:
    backend, _ = _warm()
    with pytest.raises(BackendError, match="past the block table"):
        backend.step(StepPlan(new=(NewSequence(1, (1, 2, 3, 4, 5), block_ids=(0,)),)))


def test_a_block_appended_twice_is_caught() -> None:
    backend, driver = _warm()
    driver.prefill({1: [1, 2, 3, 4]})
    block = driver.block_ids(1)[0]
    row = RunningSequence(1, 4, decode=True, last_token=5, new_block_ids=(block,))
    with pytest.raises(BackendError, match="twice"):
        backend.step(StepPlan(running=(row,)))


def test_a_running_row_of_an_unknown_or_ended_sequence_is_caught() -> None:
    backend, driver = _warm()
    driver.prefill({1: [1, 2, 3]})
    row = driver.decode_row(1)
    with pytest.raises(BackendError, match="in the step that ends them"):
        backend.step(StepPlan(running=(row,), finished=(1,)))
    with pytest.raises(BackendError, match="does not hold"):
        backend.step(StepPlan(running=(RunningSequence(7, 0, decode=True, last_token=1),)))
    assert backend.kv_usage().seq_ids == frozenset({1})  # nothing changed


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
    assert backend.decode_widths[:2] == [4, 1]


def test_the_backend_keeps_the_table_that_plans_grow() -> None:
    backend, driver = _warm()
    driver.prefill({1: [1, 2, 3, 4, 5]})
    driver.generate({1: 9})
    assert backend.tables[1] == list(driver.block_ids(1))
    assert len(backend.tables[1]) == 4  # 5 + 8 tokens in KV, 4 per block
    driver.finish([1])
    driver.flush()
    assert backend.tables == {} and backend.released == [1]


def test_records_prefill_rows_and_tokens_per_step() -> None:
    backend, driver = _warm()
    driver.prefill_chunk(1, [1, 2, 3, 4, 5, 6], last=False)
    driver.step(chunks={1: ([7, 8], True)}, prompts={2: [9, 9, 9]})
    driver.decode([1, 2])
    assert backend.prefill_rows == [[(1, 0, 6, False)], [(2, 0, 3, True), (1, 6, 2, True)]]
    assert backend.prefill_tokens == 11
    assert backend.calls == [
        ("prefill", (1,)),
        ("prefill", (2, 1)),
        ("decode", (1, 2)),
    ]
