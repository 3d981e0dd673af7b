"""JSON schemas with `properties` and no `additionalProperties` allow only the listed keys
(TGI's outlines and OpenAI's strict mode), so a model cannot add keys until the JSON
never closes; an explicit `additionalProperties: true` still allows others."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tgi.sampling.grammar import CompiledGrammar, GrammarCompiler, closed_objects


@pytest.fixture(scope="module")
def compiler(byte_tokenizer: Any) -> GrammarCompiler:
    built = GrammarCompiler.from_hf_tokenizer(byte_tokenizer, [byte_tokenizer.eos_token_id])
    assert built is not None
    return built


def accepted(compiled: CompiledGrammar, tokenizer: Any, text: str) -> str:
    """The longest prefix of `text` the grammar's matcher accepts, token by token."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    taken = compiled.new_matcher().validate_tokens(ids)
    return str(tokenizer.decode(ids[:taken]))


SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"}},
    "required": ["a"],
}


@pytest.mark.parametrize(
    "kind_value",
    [
        ("json", SCHEMA),
        ("json_schema", {"name": "answer", "schema": SCHEMA}),  # OpenAI's response_format
    ],
    ids=["tgi-json", "json_schema"],
)
def test_an_unlisted_key_is_refused_after_the_listed_ones(
    compiler: GrammarCompiler, byte_tokenizer: Any, kind_value: tuple[str, Any]
) -> None:
    kind, value = kind_value
    compiled = compiler.compile({"type": kind, "value": value})
    assert accepted(compiled, byte_tokenizer, '{"a":1,"b":true}') == '{"a":1,"b":true}'
    assert accepted(compiled, byte_tokenizer, '{"a":1,"b":true,"c":2}') == '{"a":1,"b":true'
    assert accepted(compiled, byte_tokenizer, '{"a":1,"zz":2}') == '{"a":1,"'


def test_explicit_additional_properties_still_allow_other_keys(
    compiler: GrammarCompiler, byte_tokenizer: Any
) -> None:
    schema = {**SCHEMA, "additionalProperties": True}
    compiled = compiler.compile({"type": "json", "value": schema})
    text = '{"a":1,"b":true,"c":2}'
    assert accepted(compiled, byte_tokenizer, text) == text


def test_nested_objects_are_closed_too(compiler: GrammarCompiler, byte_tokenizer: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}}},
        "$defs": {"item": {"type": "object", "properties": {"id": {"type": "integer"}}}},
    }
    compiled = compiler.compile({"type": "json", "value": schema})
    assert accepted(compiled, byte_tokenizer, '{"items":[{"id":1,"x":2}]}') == '{"items":[{"id":1'


def test_closing_copies_the_schema_and_keeps_explicit_choices() -> None:
    schema = {
        "type": "object",
        "properties": {
            "open": {"type": "object", "properties": {"k": {}}, "additionalProperties": True},
            "typed": {"type": "object", "properties": {"k": {}}, "additionalProperties": {}},
            "nested": {"type": "object", "properties": {"k": {}}},
            # a property named like a keyword is a property, not a subschema keyword
            "properties": {"type": "string"},
        },
        "allOf": [{"properties": {"x": {}}}],
    }
    before = copy.deepcopy(schema)
    closed = closed_objects(schema)
    assert schema == before  # the caller's dict is untouched
    assert "additionalProperties" not in closed  # it has an allOf: branches add up
    assert closed["allOf"] == [{"properties": {"x": {}}}]  # a member of an allOf stays open
    props = closed["properties"]
    assert props["open"]["additionalProperties"] is True
    assert props["typed"]["additionalProperties"] == {}
    assert props["nested"]["additionalProperties"] is False
    assert props["properties"] == {"type": "string"}
    assert closed_objects(True) is True
