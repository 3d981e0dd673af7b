"""N-gram draft proposals, which rows may speculate, and the on/off rule."""

from __future__ import annotations

from tgi.sampling import SamplingParams
from tgi.sampling.params import GrammarSpec
from tgi.sampling.speculation import SpeculationGate, propose, speculable


def test_propose_continues_the_latest_earlier_match_of_the_longest_ngram() -> None:
    history = [1, 2, 3, 9, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    # "2 3" last occurred before at index 6..7, followed by 7 8 5
    assert propose(history, 3) == (7, 8, 5)
    assert propose(history, 1) == (7,)
    # the trigram "5 2 3" never occurred earlier: falls back to the bigram
    assert propose(history, 2, max_ngram=3) == (7, 8)


def test_propose_prefers_longer_ngrams_over_more_recent_short_ones() -> None:
    history = [4, 5, 6, 10, 1, 6, 11, 4, 5, 6]
    assert propose(history, 1, max_ngram=3) == (10,)  # "4 5 6" -> 10
    assert propose(history, 1, max_ngram=1) == (11,)  # "6" most recently -> 11


def test_propose_returns_nothing_without_a_match() -> None:
    assert propose([1, 2, 3, 4], 3) == ()
    assert propose([], 3) == ()
    assert propose([1, 1], 0) == ()
    assert propose([7, 7, 7], 4) == (7,)  # only what is known after the match


def test_propose_stops_at_the_end_of_the_history() -> None:
    assert propose([3, 4, 3], 5) == (4, 3)


def test_only_rows_whose_sampling_reads_nothing_else_may_speculate() -> None:
    assert speculable(SamplingParams())
    assert speculable(SamplingParams(do_sample=True, seed=1, top_k=5, temperature=0.5))
    assert not speculable(SamplingParams(repetition_penalty=1.2))
    assert not speculable(SamplingParams(frequency_penalty=0.5))
    assert not speculable(SamplingParams(watermark=True))
    assert not speculable(SamplingParams(top_n_tokens=2))
    assert not speculable(SamplingParams(grammar=GrammarSpec("regex", "a")))


def test_gate_closes_for_large_batches_and_low_acceptance_then_probes_again() -> None:
    gate = SpeculationGate(max_batch_size=4, min_acceptance=0.5, cooldown_steps=3, smoothing=0.5)
    assert gate.open(4) and not gate.open(5)
    gate.record(10, 9)
    assert gate.open(1)
    gate.record(10, 0)  # 0.95 -> 0.475: below 0.5
    assert [gate.open(1) for _ in range(4)] == [False, False, False, True]
    assert gate.acceptance == 1.0  # the probe starts from a fresh average
    gate.record(0, 0)  # nothing proposed: no information
    assert gate.acceptance == 1.0
