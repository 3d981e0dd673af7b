"""The Validator's `grammar`: TGI's shapes and messages, compiled once and cached."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tgi.errors import InvalidRequest
from tgi.router.validation import ClientParameters, ValidationLimits, Validator
from tgi.sampling.grammar import GrammarCompiler
from tgi.sampling.params import GrammarSpec

LIMITS = ValidationLimits(
    max_input_tokens=10,
    max_total_tokens=64,
    max_stop_sequences=4,
    max_best_of=2,
    max_top_n_tokens=5,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


@pytest.fixture
def validator(byte_tokenizer: Any) -> Validator:
    grammars = GrammarCompiler.from_hf_tokenizer(byte_tokenizer, [byte_tokenizer.eos_token_id])
    return Validator(byte_tokenizer, LIMITS, grammars)


def validate(validator: Validator, grammar: object, **params: Any) -> Any:
    params.setdefault("max_new_tokens", 8)
    return validator.validate("hello", ClientParameters(grammar=grammar, **params))


@pytest.mark.parametrize(
    "grammar",
    [
        {"type": "json", "value": SCHEMA},
        {"type": "json", "value": '{"type": "object", "properties": {"a": {"type": "integer"}}}'},
        {"type": "json_schema", "value": {"name": "thing", "schema": SCHEMA}},
        {"type": "json", "value": {}},  # any JSON value (TGI insists on `properties`)
        {"type": "regex", "value": "[0-9]+"},
    ],
)
def test_valid_grammars_reach_the_sampling_parameters(validator: Validator, grammar: Any) -> None:
    request = validate(validator, grammar)
    spec = request.sampling.grammar
    assert isinstance(spec, GrammarSpec)  # plain text: a step plan may leave the process
    assert spec.kind == ("regex" if grammar["type"] == "regex" else "json")
    assert validator.grammars is not None
    assert validator.grammars.cache_len == 1  # validation compiled it ...
    assert validator.grammars.compile_spec(spec).spec == spec  # ... so the sampler hits it
    assert validator.grammars.cache_len == 1


def test_no_grammar_leaves_sampling_unconstrained(validator: Validator) -> None:
    assert validate(validator, None).sampling.grammar is None


def test_the_same_grammar_compiles_once(validator: Validator) -> None:
    first = validate(validator, {"type": "json", "value": SCHEMA}).sampling.grammar
    as_text = json.dumps(SCHEMA, indent=2)  # same schema, sent as text
    again = validate(validator, {"type": "json", "value": as_text}).sampling.grammar
    assert (
        again
        == first
        == GrammarSpec(
            "json", '{"type":"object","properties":{"a":{"type":"integer"}},"required":["a"]}'
        )
    )
    assert validator.grammars is not None and validator.grammars.cache_len == 1


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (
            {"type": "regex", "value": "(("},
            'grammar is not valid: invalid regex "((": unclosed group',
        ),
        ({"type": "json", "value": {"type": "nope"}}, "grammar is not valid: Invalid type: nope"),
        (
            {"type": "json", "value": "{oops"},
            "grammar is not valid: Expecting property name enclosed in double quotes: "
            "line 1 column 2 (char 1)",
        ),
        (
            {"type": "json", "value": {"properties": {"a": {"$ref": "#/missing"}}}},
            "grammar is not valid: Pointer '/missing' does not exist",
        ),
        (
            {"type": "xml", "value": "<a/>"},
            "grammar is not valid: unknown grammar type `xml`: expected json, regex or json_schema",
        ),
        ({"type": "json", "value": 12}, "grammar is not supported"),  # TGI's Grammar error
    ],
)
def test_invalid_grammars_get_tgis_messages(
    validator: Validator, grammar: Any, message: str
) -> None:
    with pytest.raises(InvalidRequest) as caught:
        validate(validator, grammar)
    assert str(caught.value) == message


def test_without_a_compiler_grammar_is_not_supported(byte_tokenizer: Any) -> None:
    validator = Validator(byte_tokenizer, LIMITS)
    with pytest.raises(InvalidRequest, match=r"^grammar is not supported$"):
        validate(validator, {"type": "regex", "value": "a"})


def test_input_errors_come_before_grammar_errors(validator: Validator) -> None:
    with pytest.raises(InvalidRequest, match=r"^`inputs` tokens \+ `max_new_tokens` must be"):
        validate(validator, {"type": "regex", "value": "(("}, max_new_tokens=99)


def test_a_slow_tokenizer_turns_grammar_off() -> None:
    assert GrammarCompiler.from_hf_tokenizer(object()) is None
