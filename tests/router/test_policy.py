"""ContinuousPolicy admission: FIFO, token, row and prefill budgets, and TGI's
waiting_served_ratio / max_waiting_tokens rule."""

from __future__ import annotations

from typing import Any

from tgi.router.policies import Budget, Candidate, ContinuousPolicy, PolicyLimits


def policy(join_immediately: bool = True, **values: Any) -> ContinuousPolicy:
    values = {"waiting_served_ratio": 1.2, "max_waiting_tokens": 20} | values
    limits = PolicyLimits(
        max_batch_prefill_tokens=100, max_batch_total_tokens=1000, max_batch_size=None, **values
    )
    return ContinuousPolicy(limits, join_immediately=join_immediately)


def budget(**values: Any) -> Budget:
    defaults = {
        "running": 0,
        "reserved_tokens": 0,
        "max_batch_total_tokens": 1000,
        "max_batch_prefill_tokens": 100,
        "max_batch_size": None,
        "steps_since_prefill": 0,
    }
    return Budget(**(defaults | values))


def candidates(*sizes: tuple[int, int]) -> list[Candidate]:
    """Waiting requests, ids 1.., from (input_tokens, max_new_tokens) pairs."""
    return [
        Candidate(seq_id=i, input_tokens=inputs, max_total_tokens=inputs + new)
        for i, (inputs, new) in enumerate(sizes, start=1)
    ]


def test_nothing_waiting_admits_nothing() -> None:
    assert policy().admit([], budget()).seq_ids == ()


def test_everything_that_fits_joins_in_arrival_order() -> None:
    waiting = candidates((10, 10), (20, 20), (5, 5))
    assert policy().admit(waiting, budget()).seq_ids == (1, 2, 3)


def test_fifo_stops_at_the_first_request_that_does_not_fit() -> None:
    # The third would fit, but it may not overtake the second.
    waiting = candidates((10, 90), (10, 990), (5, 5))
    assert policy().admit(waiting, budget()).seq_ids == (1,)


def test_the_token_budget_counts_reserved_tokens() -> None:
    at_edge = candidates((50, 50))  # 100 tokens into the 100 left
    assert policy().admit(at_edge, budget(reserved_tokens=900, running=1)).seq_ids == (1,)
    past_edge = candidates((50, 51))
    assert policy().admit(past_edge, budget(reserved_tokens=900, running=1)).seq_ids == ()


def test_the_token_budget_counts_earlier_admissions() -> None:
    waiting = candidates((10, 490), (10, 490), (10, 1))  # 500 + 500 fill 1000 exactly
    assert policy().admit(waiting, budget()).seq_ids == (1, 2)


def test_max_batch_size_caps_rows() -> None:
    waiting = candidates((1, 1), (1, 1), (1, 1))
    assert policy().admit(waiting, budget(running=3, max_batch_size=4)).seq_ids == (1,)
    assert policy().admit(waiting, budget(running=4, max_batch_size=4)).seq_ids == ()
    assert policy().admit(waiting, budget(max_batch_size=2)).seq_ids == (1, 2)


def test_the_prefill_budget_bounds_the_prompts_of_one_step() -> None:
    waiting = candidates((50, 1), (50, 1), (1, 1))  # 50 + 50 fill the 100 exactly
    assert policy().admit(waiting, budget()).seq_ids == (1, 2)
    waiting = candidates((60, 1), (60, 1))
    assert policy().admit(waiting, budget()).seq_ids == (1,)


def test_a_first_prompt_above_the_prefill_budget_still_runs_alone() -> None:
    waiting = candidates((150, 1), (1, 1))
    assert policy().admit(waiting, budget()).seq_ids == (1,)


def test_a_paused_batch_waits_for_enough_newcomers() -> None:
    # 10 running x 1.2: a padded batch pauses only for 12 newcomers.
    p = policy(join_immediately=False)
    running = budget(running=10, steps_since_prefill=0)
    assert p.admit(candidates(*[(1, 1)] * 11), running).seq_ids == ()
    assert p.admit(candidates(*[(1, 1)] * 12), running).seq_ids == tuple(range(1, 13))


def test_only_the_requests_that_fit_count_toward_the_ratio() -> None:
    p = policy(join_immediately=False)
    waiting = candidates(*[(1, 1)] * 11, (1, 990))  # the twelfth does not fit the budget
    assert p.admit(waiting, budget(running=10)).seq_ids == ()


def test_max_waiting_tokens_forces_newcomers_in() -> None:
    p = policy(join_immediately=False, max_waiting_tokens=20)
    waiting = candidates((1, 1))
    assert p.admit(waiting, budget(running=10, steps_since_prefill=19)).seq_ids == ()
    assert p.admit(waiting, budget(running=10, steps_since_prefill=20)).seq_ids == (1,)


def test_the_ratio_rounds_down() -> None:
    p = policy(join_immediately=False)
    # 3 x 1.2 = 3.6: three newcomers are enough, two are not.
    assert p.admit(candidates(*[(1, 1)] * 3), budget(running=3)).seq_ids == (1, 2, 3)
    assert p.admit(candidates(*[(1, 1)] * 2), budget(running=3)).seq_ids == ()


def test_an_empty_batch_never_waits() -> None:
    p = policy(join_immediately=False)
    assert p.admit(candidates((1, 1)), budget(running=0)).seq_ids == (1,)


def test_join_immediately_admits_at_once() -> None:
    p = policy(join_immediately=True)
    waiting = candidates((1, 1))
    assert p.admit(waiting, budget(running=10, steps_since_prefill=0)).seq_ids == (1,)
