"""Grammar compilation, token masks and per-sequence matchers, on the byte tokenizer."""

from __future__ import annotations

import json
import pickle
import re
from typing import Any

import jsonschema
import pytest
import torch

from tgi.sampling import BatchSampler, SamplingParams
from tgi.sampling.grammar import (
    CompiledGrammar,
    GrammarCompiler,
    GrammarError,
    GrammarMask,
    GrammarUnsupported,
    bitmask_to_allowed,
    canonical,
    fill_bitmasks,
    grammar_bitmask,
)
from tgi.sampling.params import GrammarSpec


@pytest.fixture(scope="module")
def compiler(byte_tokenizer: Any) -> GrammarCompiler:
    built = GrammarCompiler.from_hf_tokenizer(byte_tokenizer, [byte_tokenizer.eos_token_id])
    assert built is not None
    return built


def regex(value: str) -> dict[str, Any]:
    return {"type": "regex", "value": value}


def ids_of(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def allowed_ids(compiled: CompiledGrammar, matcher: Any, vocab: int) -> set[int]:
    mask = bitmask_to_allowed(fill_bitmasks([matcher], compiled.mask_words), vocab)  # [1, V]
    return set(mask[0].nonzero().flatten().tolist())


# ---- canonical form and compilation ----------------------------------------------------


def test_equal_schemas_share_one_canonical_form() -> None:
    as_dict = {"type": "json", "value": {"type": "object", "properties": {"a": {"type": "x"}}}}
    as_text = {"type": "json", "value": '{"type": "object", "properties": {"a": {"type": "x"}}}'}
    wrapped = {"type": "json_schema", "value": {"name": "n", "schema": as_dict["value"]}}
    assert canonical(as_dict) == canonical(as_text) == canonical(wrapped)
    assert canonical(as_dict) == (
        "json",
        '{"type":"object","properties":{"a":{"type":"x"}}}',
    )
    assert canonical(regex("a+")) == ("regex", "a+")


def test_property_order_is_the_clients() -> None:
    """The schema's property order is the order the object is generated in."""
    ab = {"type": "json", "value": {"properties": {"a": {}, "b": {}}}}
    ba = {"type": "json", "value": {"properties": {"b": {}, "a": {}}}}
    assert canonical(ab) != canonical(ba)
    assert canonical(ba)[1].index('"b"') < canonical(ba)[1].index('"a"')


@pytest.mark.parametrize(
    ("grammar", "error"),
    [
        ({"type": "yaml", "value": "a"}, GrammarError),
        ({"type": "json"}, GrammarError),
        ({"type": "regex", "value": 3}, GrammarError),
        ({"type": "json", "value": "{not json"}, GrammarError),
        ({"type": "json_schema", "value": {"name": "x"}}, GrammarError),
        ({"type": "json", "value": 3}, GrammarUnsupported),
        ({"type": "json", "value": [1]}, GrammarUnsupported),
    ],
)
def test_malformed_grammar_objects_are_refused(grammar: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        canonical(grammar)


@pytest.mark.parametrize(
    ("grammar", "message"),
    [
        (regex("(("), 'invalid regex "((": unclosed group'),
        ({"type": "json", "value": {"type": "foo"}}, "Invalid type: foo"),
        (
            {"type": "json", "value": {"type": "integer", "minimum": 5, "maximum": 1}},
            "Unsatisfiable schema: minimum (5) is greater than maximum (1)",
        ),
        (
            {"type": "json", "value": {"type": "string", "pattern": "(("}},
            "regex parse error: unclosed group",
        ),
    ],
)
def test_invalid_grammars_fail_with_one_line(
    compiler: GrammarCompiler, grammar: dict[str, Any], message: str
) -> None:
    with pytest.raises(GrammarError) as caught:
        compiler.compile(grammar)
    assert str(caught.value) == message


def test_compiled_grammars_are_cached_least_recently_used_first(byte_tokenizer: Any) -> None:
    small = GrammarCompiler.from_hf_tokenizer(byte_tokenizer, cache_size=2)
    assert small is not None
    first = small.compile(regex("a"))
    assert small.compile(regex("a")) is first  # a hit returns the same object
    second = small.compile({"type": "json", "value": {"type": "boolean"}})
    assert small.compile({"type": "json", "value": '{"type":"boolean"}'}) is second
    small.compile(regex("a"))  # touch: "a" becomes the most recent
    small.compile(regex("c"))  # evicts the boolean schema, not "a"
    assert small.cache_len == 2
    assert small.compile(regex("a")) is first
    assert small.compile({"type": "json", "value": {"type": "boolean"}}) is not second


def test_compiled_grammars_compare_by_kind_and_text(compiler: GrammarCompiler) -> None:
    compiled = compiler.compile(regex("a"))
    twin = CompiledGrammar("regex", "a", compiled.mask_words, None)
    assert twin == compiled and hash(twin) == hash(compiled)
    assert SamplingParams(grammar=twin.spec) == SamplingParams(grammar=compiled.spec)
    assert CompiledGrammar("json", "a", compiled.mask_words, None) != compiled


# ---- specs: the grammar as plain text, compiled again where the sampler runs -----------


def test_a_spec_is_the_canonical_text(compiler: GrammarCompiler) -> None:
    schema = {"type": "json", "value": '{"type": "boolean"}'}
    assert compiler.compile(schema).spec == GrammarSpec("json", '{"type":"boolean"}')
    assert compiler.compile(regex("a+")).spec == GrammarSpec("regex", "a+")


def test_compile_spec_hits_the_entry_validation_made(byte_tokenizer: Any) -> None:
    fresh = GrammarCompiler.from_hf_tokenizer(byte_tokenizer)
    assert fresh is not None
    compiled = fresh.compile({"type": "json", "value": {"type": "integer"}})
    assert fresh.compile_spec(compiled.spec) is compiled
    assert fresh.cache_len == 1


def test_compile_spec_builds_elsewhere(compiler: GrammarCompiler, byte_tokenizer: Any) -> None:
    """A spec that crossed a process boundary compiles again, to the same grammar."""
    spec = pickle.loads(pickle.dumps(compiler.compile(regex("[0-9]{2}")).spec))
    elsewhere = GrammarCompiler.from_hf_tokenizer(byte_tokenizer, [byte_tokenizer.eos_token_id])
    assert elsewhere is not None and elsewhere.cache_len == 0
    rebuilt = elsewhere.compile_spec(spec)
    assert elsewhere.cache_len == 1 and elsewhere.compile_spec(spec) is rebuilt
    assert rebuilt.spec == spec
    vocab = len(byte_tokenizer)
    assert allowed_ids(rebuilt, rebuilt.new_matcher(), vocab) == set(
        ids_of(byte_tokenizer, "0123456789")
    )


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            GrammarSpec("json_schema", "{}"),
            "unknown grammar kind `json_schema`: expected json or regex",
        ),
        (GrammarSpec("regex", "(("), 'invalid regex "((": unclosed group'),
    ],
)
def test_compile_spec_refuses_a_spec_validation_never_made(
    compiler: GrammarCompiler, spec: GrammarSpec, message: str
) -> None:
    with pytest.raises(GrammarError) as caught:
        compiler.compile_spec(spec)
    assert str(caught.value) == message


# ---- masks -----------------------------------------------------------------------------


def test_mask_allows_exactly_the_grammars_next_tokens(
    compiler: GrammarCompiler, byte_tokenizer: Any
) -> None:
    compiled = compiler.compile(regex("[0-9]{2}"))
    vocab = len(byte_tokenizer)
    digits = set(ids_of(byte_tokenizer, "0123456789"))
    matcher = compiled.new_matcher()
    assert allowed_ids(compiled, matcher, vocab) == digits
    assert matcher.consume_token(ids_of(byte_tokenizer, "4")[0])
    assert allowed_ids(compiled, matcher, vocab) == digits
    assert matcher.consume_token(ids_of(byte_tokenizer, "2")[0])
    # complete: only EOS may follow
    assert allowed_ids(compiled, matcher, vocab) == {byte_tokenizer.eos_token_id}


def test_new_matchers_start_fresh(compiler: GrammarCompiler, byte_tokenizer: Any) -> None:
    compiled = compiler.compile(regex("ab"))
    used = compiled.new_matcher()
    assert used.consume_token(ids_of(byte_tokenizer, "a")[0])
    fresh = compiled.new_matcher()
    assert allowed_ids(compiled, fresh, len(byte_tokenizer)) == set(ids_of(byte_tokenizer, "a"))


def test_bitmask_bits_map_to_token_ids() -> None:
    bitmask = torch.tensor([[0b101, -(2**31)], [-1, -1]], dtype=torch.int32)  # [2, 2]
    allowed = bitmask_to_allowed(bitmask, 40)  # [2, 40]
    assert allowed[0].nonzero().flatten().tolist() == [0, 2]  # bit 31 of word 1 is past 40
    assert bool(allowed[1].all())
    assert bitmask_to_allowed(bitmask, 64)[0].nonzero().flatten().tolist() == [0, 2, 63]


def test_grammar_bitmask_refuses_a_model_vocab_past_the_tokenizers(
    compiler: GrammarCompiler, byte_tokenizer: Any
) -> None:
    compiled = compiler.compile(regex("x"))
    vocab = len(byte_tokenizer) + 70  # a padded embedding matrix
    bitmask = grammar_bitmask([compiled.new_matcher()], compiled.mask_words, vocab)
    assert bitmask.shape == (1, (vocab + 31) // 32)
    assert bitmask_to_allowed(bitmask, vocab)[0].nonzero().flatten().tolist() == ids_of(
        byte_tokenizer, "x"
    )
    smaller = grammar_bitmask([compiled.new_matcher()], compiled.mask_words, 100)
    assert smaller.shape == (1, 4)


@pytest.mark.parametrize("rows", [None, [1, 3]])
def test_grammar_mask_touches_only_its_rows(rows: list[int] | None) -> None:
    scores = torch.randn(4, 40)  # [R, V]
    num = 4 if rows is None else len(rows)
    bitmask = torch.zeros(num, 2, dtype=torch.int32)
    bitmask[:, 0] = 0b110  # tokens 1 and 2
    index = None if rows is None else torch.tensor(rows)
    masked = GrammarMask.from_bitmask(bitmask, 40, index).apply(scores)
    for row in range(4):
        if rows is None or row in rows:
            assert torch.isfinite(masked[row]).nonzero().flatten().tolist() == [1, 2]
            assert torch.equal(masked[row, 1:3], scores[row, 1:3])
        else:
            assert torch.equal(masked[row], scores[row])


# ---- the batch sampler -----------------------------------------------------------------


def decode_loop(
    sampler: BatchSampler,
    seq_ids: list[int],
    params: list[SamplingParams],
    vocab: int,
    steps: int,
    eos: int,
    seed: int = 0,
) -> tuple[list[list[int]], list[list[int]]]:
    """Sample `steps` forwards of random logits; a row stops at EOS. Returns each row's
    tokens and, for checking unconstrained rows, each step's argmax."""
    generator = torch.Generator().manual_seed(seed)
    out: list[list[int]] = [[] for _ in seq_ids]
    argmax: list[list[int]] = [[] for _ in seq_ids]
    live = list(range(len(seq_ids)))
    for step in range(steps):
        if not live:
            break
        logits = torch.randn(len(live), vocab, generator=generator) * 3  # [R, V]
        stream = "prefill" if step == 0 else "decode"
        sampled = sampler.sample(
            stream,
            [seq_ids[i] for i in live],
            [params[i] for i in live],
            [step] * len(live),
            logits,
        )
        for j, i in enumerate(live):
            out[i].append(sampled.token_ids[j])
            argmax[i].append(int(logits[j].argmax()))
        ended = [i for j, i in enumerate(live) if sampled.token_ids[j] == eos]
        sampler.release(seq_ids[i] for i in ended)
        live = [i for i in live if i not in ended]
    return out, argmax


def test_grammar_rows_follow_their_grammar_and_others_are_untouched(
    compiler: GrammarCompiler, byte_tokenizer: Any
) -> None:
    eos, vocab = byte_tokenizer.eos_token_id, len(byte_tokenizer) + 3
    digits = compiler.compile(regex("[0-9]{3}")).spec
    word = compiler.compile(regex("(yes|no)!")).spec
    params = [
        SamplingParams(grammar=digits),
        SamplingParams(),
        SamplingParams(grammar=word, do_sample=True, seed=7, temperature=0.7),
        SamplingParams(do_sample=False, grammar=digits),
    ]
    sampler = BatchSampler(compiler)
    out, argmax = decode_loop(sampler, [10, 11, 12, 13], params, vocab, 8, eos)
    for row, pattern in ((0, "[0-9]{3}"), (2, "(yes|no)!"), (3, "[0-9]{3}")):
        assert out[row][-1] == eos, out[row]
        text = byte_tokenizer.decode(out[row][:-1])
        assert re.fullmatch(pattern, text), text
    assert out[1] == argmax[1]  # the unconstrained row is plain greedy
    assert len(out[1]) == 8
    assert sampler.num_matchers == 0  # every grammar row ended and was released


def test_grammar_state_survives_gaps_until_release(
    compiler: GrammarCompiler, byte_tokenizer: Any
) -> None:
    """A sequence left out of some forwards (paused, then resumed) keeps its place."""
    compiled = compiler.compile(regex("abc"))
    params = SamplingParams(grammar=compiled.spec)
    sampler = BatchSampler(compiler)
    vocab = len(byte_tokenizer)
    logits = torch.zeros(1, vocab)
    first = sampler.sample("prefill", [5], [params], [0], logits).token_ids
    sampler.sample("decode", [6], [SamplingParams()], [0], logits)  # 5 paused
    second = sampler.sample("decode", [5], [params], [1], logits).token_ids
    third = sampler.sample("prefill", [5], [params], [2], logits, prompts=[[1, 2]]).token_ids
    assert byte_tokenizer.decode(first + second + third) == "abc"
    assert sampler.num_matchers == 1
    sampler.release([5, 6])
    assert sampler.num_matchers == 0
    again = sampler.sample("decode", [5], [params], [0], logits).token_ids  # a new sequence
    assert byte_tokenizer.decode(again) == "a"


def test_grammar_with_penalties_and_top_tokens(
    compiler: GrammarCompiler, byte_tokenizer: Any
) -> None:
    compiled = compiler.compile(regex("[ab]{4}"))
    params = SamplingParams(grammar=compiled.spec, repetition_penalty=1.5, top_n_tokens=3)
    sampler = BatchSampler(compiler)
    vocab = len(byte_tokenizer)
    tokens: list[int] = []
    logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(1))
    for step in range(4):
        prompts = [[1]] if step == 0 else None
        stream = "prefill" if step == 0 else "decode"
        sampled = sampler.sample(stream, [1], [params], [step], logits, prompts)
        tokens += sampled.token_ids
        allowed = set(ids_of(byte_tokenizer, "ab"))
        finite = [token for token, logprob in sampled.top_tokens[0] if logprob > float("-inf")]
        assert set(finite) <= allowed and sampled.token_ids[0] in allowed
        assert sampled.logprobs[0] <= 0.0
    assert re.fullmatch("[ab]{4}", byte_tokenizer.decode(tokens))


def test_json_schema_output_validates(compiler: GrammarCompiler, byte_tokenizer: Any) -> None:
    schema = {
        "type": "object",
        "properties": {
            "ok": {"type": "boolean"},
            "n": {"type": "integer", "minimum": 1, "maximum": 9},
            "tag": {"enum": ["red", "blue"]},
        },
        "required": ["ok", "n", "tag"],
        "additionalProperties": False,
    }
    compiled = compiler.compile({"type": "json", "value": schema})
    eos = byte_tokenizer.eos_token_id
    sampler = BatchSampler(compiler)
    params = [SamplingParams(grammar=compiled.spec, do_sample=True, seed=s) for s in range(3)]
    out, _ = decode_loop(sampler, [1, 2, 3], params, len(byte_tokenizer), 400, eos, seed=3)
    for row in out:
        assert row[-1] == eos, byte_tokenizer.decode(row)
        jsonschema.validate(json.loads(byte_tokenizer.decode(row[:-1])), schema)


class CountingCompiler(GrammarCompiler):
    """Counts `compile_spec` calls: the sampler compiles once per sequence."""

    def __init__(self, tokenizer: Any, *, cache_size: int = 64) -> None:
        super().__init__(tokenizer, cache_size=cache_size)
        self.spec_calls = 0

    def compile_spec(self, spec: GrammarSpec) -> CompiledGrammar:
        self.spec_calls += 1
        return super().compile_spec(spec)


def test_the_sampler_compiles_each_sequences_spec_once(
    compiler: GrammarCompiler, byte_tokenizer: Any
) -> None:
    # its own empty LRU, as in a worker process
    counting = CountingCompiler.from_hf_tokenizer(byte_tokenizer, [byte_tokenizer.eos_token_id])
    assert isinstance(counting, CountingCompiler)
    spec = compiler.compile(regex("[ab]{3}")).spec
    sampler = BatchSampler(counting)
    eos = byte_tokenizer.eos_token_id
    params = [SamplingParams(grammar=spec), SamplingParams(grammar=spec), SamplingParams()]
    out, _ = decode_loop(sampler, [1, 2, 3], params, len(byte_tokenizer), 6, eos)
    assert counting.spec_calls == 2  # one per grammar sequence, not per step
    assert counting.cache_len == 1  # built once, then hit
    for row in out[:2]:
        assert re.fullmatch("[ab]{3}", byte_tokenizer.decode(row[:-1])), row


def test_a_grammar_row_needs_a_compiler(compiler: GrammarCompiler, byte_tokenizer: Any) -> None:
    spec = compiler.compile(regex("a")).spec
    logits = torch.zeros(2, len(byte_tokenizer))  # [R, V]
    sampler = BatchSampler()
    params = [SamplingParams(), SamplingParams(grammar=spec)]
    with pytest.raises(ValueError, match=r"^seq 8 has a grammar, but this BatchSampler has no"):
        sampler.sample("prefill", [7, 8], params, [0, 0], logits)
    # rows without a grammar still sample
    assert len(sampler.sample("prefill", [7], params[:1], [0], logits[:1]).token_ids) == 1
