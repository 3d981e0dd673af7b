"""The Validator with the byte tokenizer: TGI's edges, messages, order and defaults."""

from __future__ import annotations

from typing import Any

import pytest

from tgi.errors import InvalidRequest
from tgi.router.validation import ClientParameters, ValidationLimits, Validator

LIMITS = ValidationLimits(
    max_input_tokens=10,
    max_total_tokens=16,
    max_stop_sequences=4,
    max_best_of=2,
    max_top_n_tokens=5,
)


@pytest.fixture
def validator(byte_tokenizer: Any) -> Validator:
    return Validator(byte_tokenizer, LIMITS)


REJECTED = [
    ({"temperature": 0.0}, "`temperature` must be strictly positive"),
    ({"top_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_p": 0.0}, "`top_p` must be > 0.0 and < 1.0"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"typical_p": 0.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"repetition_penalty": 0.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": -2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": -3}, "`max_new_tokens` must be strictly positive"),
    (
        {"max_new_tokens": 12},
        "`inputs` tokens + `max_new_tokens` must be <= 16. "
        "Given: 5 `inputs` tokens and 12 `max_new_tokens`",
    ),
    ({"stop": ("a",) * 5}, "`stop` supports up to 4 stop sequences. Given: 5"),
    ({"truncate": 0}, "`truncate` must be strictly positive and less than 10. Given: 0"),
    ({"truncate": 11}, "`truncate` must be strictly positive and less than 10. Given: 11"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "seed": 3}, "`seed` must not be set when `best_of` > 1"),
    ({"best_of": 3, "do_sample": True}, "`best_of` must be > 0 and <= 2. Given: 3"),
    ({"best_of": 0}, "`best_of` must be > 0 and <= 2. Given: 0"),
    ({"top_n_tokens": 6}, "`top_n_tokens` must be >= 0 and <= 5. Given: 6"),
    ({"top_n_tokens": -1}, "`top_n_tokens` must be >= 0 and <= 5. Given: -1"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"repetition_penalty": -1.0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.01}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"grammar": {"type": "regex", "value": "a+"}}, "grammar is not supported"),
    ({"adapter_id": "x"}, "adapter `x` not found: this server serves no LoRA adapters"),
]


@pytest.mark.parametrize(("params", "message"), REJECTED)
def test_rejected(validator: Validator, params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validator.validate("hello", ClientParameters(**params))
    assert str(caught.value) == message


@pytest.mark.parametrize(
    "params",
    [
        {"temperature": 0.01},
        {"top_p": 0.99},
        {"top_k": 1},
        {"max_new_tokens": 1},
        {"max_new_tokens": 11},
        {"stop": ("a",) * 4},
        {"truncate": 1},
        {"truncate": 10},
        {"repetition_penalty": 1.0},
        {"repetition_penalty": 0.01},
        {"frequency_penalty": -2.0},
        {"frequency_penalty": 2.0},
        {"typical_p": 0.01},
        {"typical_p": 0.99},
        {"top_n_tokens": 5},
        {"top_n_tokens": 0},
        {"best_of": 2, "do_sample": True},
        {"best_of": 2, "typical_p": 0.5},  # any warper counts as sampling
        {"best_of": 1, "seed": 3},
        {"watermark": True},
    ],
)
def test_accepted_edges(validator: Validator, params: dict[str, Any]) -> None:
    request = validator.validate("hello", ClientParameters(**params))
    assert request.inputs == "hello"


def test_empty_inputs(validator: Validator) -> None:
    with pytest.raises(InvalidRequest, match=r"^`inputs` cannot be empty$"):
        validator.validate("", ClientParameters())


def test_parameters_are_checked_before_inputs(validator: Validator) -> None:
    with pytest.raises(InvalidRequest, match=r"^`temperature` must be strictly positive$"):
        validator.validate("", ClientParameters(temperature=0.0))


def test_input_length_edge(validator: Validator) -> None:
    assert len(validator.validate("x" * 10, ClientParameters(max_new_tokens=1)).input_ids) == 10
    with pytest.raises(InvalidRequest) as caught:
        validator.validate("x" * 11, ClientParameters(max_new_tokens=1))
    assert str(caught.value) == "`inputs` must have less than 10 tokens. Given: 11"


def test_total_budget_is_checked_before_input_length(validator: Validator) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validator.validate("x" * 12, ClientParameters(max_new_tokens=5))
    assert str(caught.value) == (
        "`inputs` tokens + `max_new_tokens` must be <= 16. "
        "Given: 12 `inputs` tokens and 5 `max_new_tokens`"
    )


def test_default_max_new_tokens_fills_the_total_budget(validator: Validator) -> None:
    assert validator.validate("hello", ClientParameters()).stopping.max_new_tokens == 11
    assert validator.validate("x" * 10, ClientParameters()).stopping.max_new_tokens == 6
    asked = validator.validate("hello", ClientParameters(max_new_tokens=3))
    assert asked.stopping.max_new_tokens == 3


def test_a_prompt_filling_the_total_budget_fails_on_input_length(validator: Validator) -> None:
    # The default max_new_tokens is 0; like TGI, the budget passes and the length fails.
    with pytest.raises(InvalidRequest) as caught:
        validator.validate("x" * 16, ClientParameters())
    assert str(caught.value) == "`inputs` must have less than 10 tokens. Given: 16"


def test_no_request_ever_has_zero_new_tokens(byte_tokenizer: Any) -> None:
    # Limits that let a prompt use the whole budget (config never builds these).
    validator = Validator(
        byte_tokenizer,
        ValidationLimits(
            max_input_tokens=16,
            max_total_tokens=16,
            max_stop_sequences=4,
            max_best_of=2,
            max_top_n_tokens=5,
        ),
    )
    with pytest.raises(InvalidRequest) as caught:
        validator.validate("x" * 16, ClientParameters())
    assert str(caught.value) == (
        "`inputs` tokens + `max_new_tokens` must be <= 16. "
        "Given: 16 `inputs` tokens and 0 `max_new_tokens`"
    )


def test_truncate_keeps_the_last_tokens(validator: Validator, byte_tokenizer: Any) -> None:
    text = "abcdefghijklmnopqrst"  # 20 tokens: over max_input_tokens until truncated
    request = validator.validate(text, ClientParameters(truncate=4, max_new_tokens=2))
    assert request.input_ids == tuple(byte_tokenizer.encode("qrst"))
    assert request.inputs == text  # the prompt text itself is kept whole


def test_greedy_by_default(validator: Validator) -> None:
    sampling = validator.validate("hello", ClientParameters()).sampling
    assert (sampling.do_sample, sampling.temperature, sampling.top_k, sampling.top_p) == (
        False,
        1.0,
        0,
        1.0,
    )


def test_a_random_seed_is_assigned_when_sampling_without_one(validator: Validator) -> None:
    seeds = {
        validator.validate("hello", ClientParameters(do_sample=True)).sampling.seed
        for _ in range(4)
    }
    assert len(seeds) == 4  # 63 random bits each: a repeat means no randomness
    assert all(0 <= seed < 2**63 for seed in seeds)
    given = validator.validate("hello", ClientParameters(do_sample=True, seed=42)).sampling
    assert given.seed == 42


@pytest.mark.parametrize(
    ("params", "do_sample"),
    [
        ({"temperature": 0.7}, True),
        ({"top_k": 5}, True),
        ({"top_p": 0.9}, True),
        ({"temperature": 1.0}, False),  # a neutral value is no warper
        ({"do_sample": True}, True),
    ],
)
def test_a_warper_turns_sampling_on_as_in_tgi(
    validator: Validator, params: dict[str, Any], do_sample: bool
) -> None:
    assert validator.validate("hello", ClientParameters(**params)).sampling.do_sample is do_sample


def test_request_fields_pass_through(validator: Validator, byte_tokenizer: Any) -> None:
    request = validator.validate(
        "hello",
        ClientParameters(
            max_new_tokens=4,
            stop=("\n", "end"),
            decoder_input_details=True,
            return_full_text=True,
            ignore_eos=True,
            temperature=0.5,
            top_k=7,
            top_p=0.8,
            seed=9,
        ),
    )
    assert request.input_ids == tuple(byte_tokenizer.encode("hello"))
    assert request.stopping.stop_sequences == ("\n", "end")
    assert request.stopping.ignore_eos is True
    assert request.decoder_input_details is True
    assert request.return_full_text is True
    assert (request.sampling.temperature, request.sampling.top_k) == (0.5, 7)
    assert (request.sampling.top_p, request.sampling.seed) == (0.8, 9)


def test_a_tokenizer_failure_is_a_validation_error() -> None:
    class Broken:
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            raise ValueError("cannot split")

    with pytest.raises(InvalidRequest, match=r"^tokenizer error cannot split$"):
        Validator(Broken(), LIMITS).validate("hello", ClientParameters())


@pytest.mark.parametrize(
    ("params", "message"),
    [
        # Every pair breaks two rules; the first one in TGI's order is reported.
        ({"best_of": 3, "temperature": 0.0}, "`best_of` must be > 0 and <= 2. Given: 3"),
        ({"best_of": 2, "repetition_penalty": 0.0}, "you must use sampling when `best_of` is > 1"),
        (
            {"temperature": 0.0, "repetition_penalty": 0.0},
            "`temperature` must be strictly positive",
        ),
        (
            {"repetition_penalty": 0.0, "frequency_penalty": 3.0},
            "`repetition_penalty` must be strictly positive",
        ),
        (
            {"frequency_penalty": 3.0, "top_p": 1.0},
            "`frequency_penalty` must be >= -2.0 and <= 2.0",
        ),
        ({"top_p": 1.0, "typical_p": 1.0}, "`top_p` must be > 0.0 and < 1.0"),
        ({"typical_p": 1.0, "top_k": 0}, "`typical_p` must be > 0.0 and < 1.0"),
        ({"top_k": 0, "max_new_tokens": 0}, "`top_k` must be strictly positive"),
        (
            {"max_new_tokens": 0, "stop": ("a",) * 5},
            "`max_new_tokens` must be strictly positive",
        ),
        (
            {"stop": ("a",) * 5, "top_n_tokens": 9},
            "`stop` supports up to 4 stop sequences. Given: 5",
        ),
        (
            {"best_of": 2, "do_sample": True, "seed": 1, "top_n_tokens": 9},
            "`seed` must not be set when `best_of` > 1",
        ),
        (
            {"top_n_tokens": 9, "truncate": 0},
            "`top_n_tokens` must be >= 0 and <= 5. Given: 9",
        ),
        ({"grammar": {"type": "regex", "value": "a"}, "max_new_tokens": 99}, None),
    ],
)
def test_checks_run_in_tgis_order(
    validator: Validator, params: dict[str, Any], message: str | None
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validator.validate("hello", ClientParameters(**params))
    if message is None:  # grammar is checked after the input, as in TGI
        assert str(caught.value).startswith("`inputs` tokens + `max_new_tokens` must be <= 16")
    else:
        assert str(caught.value) == message


def test_top_n_tokens_over_the_limit_comes_before_empty_inputs(validator: Validator) -> None:
    with pytest.raises(InvalidRequest, match=r"^`top_n_tokens` must be >= 0 and <= 5. Given: 6$"):
        validator.validate("", ClientParameters(top_n_tokens=6))


def test_best_of_disabled_when_the_limit_is_one(byte_tokenizer: Any) -> None:
    limits = ValidationLimits(10, 16, 4, max_best_of=1, max_top_n_tokens=5)
    with pytest.raises(InvalidRequest, match=r"^`best_of` != 1 is not allowed for this endpoint$"):
        Validator(byte_tokenizer, limits).validate(
            "hello", ClientParameters(best_of=2, do_sample=True)
        )


@pytest.mark.parametrize(
    ("params", "message"),
    [
        (
            {"best_of": 2, "do_sample": True},
            "`best_of` != 1 is not supported when streaming tokens",
        ),
        ({"best_of": 0}, "`best_of` != 1 is not supported when streaming tokens"),
        (
            {"decoder_input_details": True},
            "`decoder_input_details` == true is not supported when streaming tokens",
        ),
    ],
)
def test_what_a_stream_refuses(params: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        Validator.check_streamable(ClientParameters(**params))
    assert str(caught.value) == message
    Validator.check_streamable(ClientParameters(best_of=1, top_n_tokens=3))  # fine


def test_new_parameters_reach_the_sampler(byte_tokenizer: Any) -> None:
    limits = ValidationLimits(10, 16, 4, 2, 5, watermark_gamma=0.25, watermark_delta=3.0)
    sampling = (
        Validator(byte_tokenizer, limits)
        .validate(
            "hello",
            ClientParameters(
                typical_p=0.4,
                repetition_penalty=1.3,
                frequency_penalty=-0.5,
                watermark=True,
                top_n_tokens=3,
            ),
        )
        .sampling
    )
    assert sampling.do_sample is True  # typical_p is a warper: TGI samples
    assert (sampling.typical_p, sampling.repetition_penalty) == (0.4, 1.3)
    assert (sampling.frequency_penalty, sampling.top_n_tokens) == (-0.5, 3)
    assert (sampling.watermark, sampling.watermark_gamma, sampling.watermark_delta) == (
        True,
        0.25,
        3.0,
    )
    assert sampling.needs_history


# ---- what the sampler's tensors can hold ------------------------------------------------

I32_MAX = 2**31 - 1
U64_MAX = 2**64 - 1

# HTTP schemas refuse these at parsing (TGI's types); the validator is the guarantee for
# every caller, because one row the sampler cannot build fails every row of its step.
UNREPRESENTABLE = [
    ({"top_k": 2**63}, f"`top_k` must be >= -2147483648 and <= {I32_MAX}. Given: {2**63}"),
    ({"top_k": I32_MAX + 1}, f"`top_k` must be >= -2147483648 and <= {I32_MAX}. Given: 2147483648"),
    ({"seed": U64_MAX + 1}, f"`seed` must be >= 0 and <= {U64_MAX}. Given: {U64_MAX + 1}"),
    ({"seed": -1}, f"`seed` must be >= 0 and <= {U64_MAX}. Given: -1"),
    *[
        ({name: value}, f"`{name}` must be a finite number. Given: {value}")
        for name in ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty")
        for value in (float("nan"), float("inf"), float("-inf"))
    ],
]


@pytest.mark.parametrize(("params", "message"), UNREPRESENTABLE)
def test_values_the_sampler_cannot_hold_are_refused(
    validator: Validator, params: dict[str, Any], message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validator.validate("hello", ClientParameters(**params))
    assert str(caught.value) == message


def test_types_are_checked_before_tgi_s_rules(validator: Validator) -> None:
    # TGI's serde refuses a value its type cannot hold before validation runs
    with pytest.raises(InvalidRequest, match=r"^`top_k` must be >= "):
        validator.validate("hello", ClientParameters(temperature=0.0, top_k=2**63))


@pytest.mark.parametrize(
    "params",
    [{"top_k": I32_MAX}, {"seed": U64_MAX, "do_sample": True}, {"seed": 0, "do_sample": True}],
)
def test_every_accepted_edge_builds_a_sampling_batch(
    validator: Validator, params: dict[str, Any]
) -> None:
    import torch

    from tgi.sampling.sampler import SamplingBatch

    sampling = validator.validate("hello", ClientParameters(**params)).sampling
    batch = SamplingBatch.build([sampling], 259, torch.device("cpu"))
    assert batch.top_k.tolist() == [sampling.top_k if sampling.top_k else 259]
