"""Grammar-constrained decoding: TGI's `grammar` parameter, compiled with llguidance.

NOTE: why llguidance 1.9 (over xgrammar 0.2.9 and outlines-core 0.2.14): it is a Rust
library with no Python dependencies, so it cannot disturb the pinned torch (xgrammar's
wheel requires torch, transformers and triton); it builds no per-grammar index up front
(outlines-core walks the whole vocabulary through the regex's automaton for every new
schema before its first token; xgrammar precomputes a per-grammar
mask cache): it computes each step's mask lazily from a token trie shared by all
grammars; it reads JSON Schema, regexes and Lark; vLLM, SGLang and llama.cpp use it.
Measured on SmolLM2's 49152-token vocabulary, on 2 busy CPU cores: the tokenizer is
built once in about 0.5 s; the 12 schemas of tests/e2e/test_grammar_smollm2.py compile
in 0.2-9 ms (median 0.4 ms; a cache hit costs about 20 us); filling the masks of 8 rows
takes 0.1-0.3 ms per step, and feeding each row its token about 2 us.

A grammar reaches the sampler as text (`GrammarSpec`: step plans may cross a process
boundary) and `compile_spec` turns it back, once per sequence. Measured the same way
(the 12 schemas and the date regex of that test, `compile_spec` timed alone): a hit,
where validation compiled it in this process, costs 0.5-1 us (median; it skips the
canonical JSON round trip that makes `compile`'s hit about 5 us); a miss, in a process
whose compiler has not seen it, is a build on the engine thread: 0.2-1 ms for 12 of the
13 (median 0.35 ms, slowest 4.5 ms), plus 8-14 ms once, for whichever grammar a fresh
compiler builds first (reversing the order moves that cost to the other grammar).

Where the work happens:

    validation worker thread        engine thread (BatchSampler), per forward
    ------------------------        ------------------------------------------
    GrammarCompiler.compile    -->  compile_spec(spec).new_matcher()  (once per sequence,
      parse + build a template        at its first sample: an LRU hit, then a deep copy)
      LLMatcher (LRU cached)        fill_bitmasks(...)  one [G, W] int32 mask, filled by
    SamplingParams.grammar =          llguidance's executor for every grammar row at once
      compiled.spec (plain text)    advance(...)  each matcher consumes its sampled token

`W = ceil(V_tok / 32)`: bit `t % 32` of word `t // 32` is set when token `t` may come
next. When a grammar is complete only the EOS tokens stay allowed, so the sequence
ends with `finish_reason: eos_token`.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import llguidance
import torch

from tgi.sampling.params import GrammarSpec

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

__all__ = [
    "CompiledGrammar",
    "GrammarCompiler",
    "GrammarError",
    "GrammarMask",
    "GrammarUnsupported",
    "advance",
    "bitmask_to_allowed",
    "canonical",
    "closed_objects",
    "fill_bitmasks",
    "grammar_bitmask",
]

logger = logging.getLogger(__name__)

# The grammar kinds of TGI's `GrammarType` (router/src/lib.rs).
JSON, REGEX, JSON_SCHEMA = "json", "regex", "json_schema"

# At most one space between JSON tokens: outlines-core's default whitespace (what TGI
# compiles schemas with). Unbounded whitespace lets a small model pad forever. A
# schema's own "x-guidance" options still win.
_JSON_OPTIONS: JsonCompileOptions = {"whitespace_pattern": "[ ]?"}


class GrammarError(ValueError):
    """The grammar is malformed; TGI answers "grammar is not valid: {message}"."""


class GrammarUnsupported(ValueError):
    """The grammar has a shape TGI refuses outright ("grammar is not supported")."""


@dataclass(frozen=True, slots=True, eq=False)
class CompiledGrammar:
    """A validated grammar, ready for any number of sequences.

    Equal (and hashed) by `key`, so `SamplingParams` holding one compare by value.
    """

    kind: str  # "json" or "regex" ("json_schema" compiles as "json")
    key: str  # canonical text of the grammar: the cache key
    mask_words: int  # W: int32 words of one row's token bitmask
    _template: Any = field(repr=False)  # an llguidance.LLMatcher that never consumes

    def new_matcher(self) -> Any:
        """A fresh matcher at the grammar's start (cheap: copies the built parser)."""
        return self._template.deep_copy()

    @property
    def spec(self) -> GrammarSpec:
        """The grammar as plain text, for `SamplingParams.grammar`: what
        `GrammarCompiler.compile_spec` turns back into this grammar."""
        return GrammarSpec(self.kind, self.key)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CompiledGrammar) and (self.kind, self.key) == (
            other.kind,
            other.key,
        )

    def __hash__(self) -> int:
        return hash((self.kind, self.key))


class GrammarCompiler:
    """Turns TGI `grammar` objects into `CompiledGrammar`s for one tokenizer.

    Thread-safe: validation calls `compile` from worker threads, so the cost of
    building a grammar never lands on the engine thread, which calls `compile_spec`
    (a cache hit in the same process). Compiled grammars are kept in an LRU of
    `cache_size` entries keyed by (kind, canonical value).
    """

    def __init__(self, tokenizer: Any, *, cache_size: int = 64) -> None:
        """`tokenizer` is an `llguidance.LLTokenizer`; see `from_hf_tokenizer`."""
        self._tokenizer = tokenizer
        self.vocab_size: int = tokenizer.vocab_size
        self.mask_words = (self.vocab_size + 31) // 32
        self._cache: OrderedDict[tuple[str, str], CompiledGrammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    @classmethod
    def from_hf_tokenizer(
        cls, hf_tokenizer: Any, eos_token_ids: Iterable[int] = (), *, cache_size: int = 64
    ) -> GrammarCompiler | None:
        """A compiler for a transformers tokenizer, or None when llguidance cannot read it
        (slow tokenizers). `eos_token_ids` are the tokens a complete grammar allows."""
        import llguidance.hf

        eos = sorted(set(eos_token_ids)) or None
        try:
            tokenizer = llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos)
        except (ValueError, TypeError) as exc:
            logger.warning("grammar support is off: llguidance cannot read the tokenizer (%s)", exc)
            return None
        return cls(tokenizer, cache_size=cache_size)

    def compile(self, grammar: object) -> CompiledGrammar:
        """Compile TGI's `{"type": "json" | "regex" | "json_schema", "value": ...}`.

        Raises `GrammarError` (invalid schema or regex) or `GrammarUnsupported`.
        """
        return self._cached(*canonical(grammar))

    def compile_spec(self, spec: GrammarSpec) -> CompiledGrammar:
        """The grammar a `GrammarSpec` (from `CompiledGrammar.spec`) stands for, through
        the same LRU: a hit where validation compiled it in this process, a build
        elsewhere (another process, or evicted since).

        Raises `GrammarError` for a kind other than json or regex, or a source that does
        not compile (validation compiled it, so only a spec made by hand gets here).
        """
        if spec.kind not in (JSON, REGEX):
            raise GrammarError(f"unknown grammar kind `{spec.kind}`: expected json or regex")
        return self._cached(spec.kind, spec.source)

    def _cached(self, kind: str, text: str) -> CompiledGrammar:
        """The LRU's entry for (kind, canonical text), built and stored on a miss."""
        key = (kind, text)
        with self._lock:
            cached = self._cache.get(key)
            if cached is not None:
                self._cache.move_to_end(key)
                return cached
        compiled = self._build(kind, text)  # outside the lock: builds run in parallel
        with self._lock:
            self._cache[key] = compiled
            self._cache.move_to_end(key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    @property
    def cache_len(self) -> int:
        return len(self._cache)

    def _build(self, kind: str, text: str) -> CompiledGrammar:
        matcher_cls = llguidance.LLMatcher
        if kind == JSON:
            try:
                closed = json.dumps(closed_objects(json.loads(text)))
            except RecursionError:
                raise GrammarError("the schema nests too deeply") from None
            try:
                source = matcher_cls.grammar_from_json_schema(closed, defaults=_JSON_OPTIONS)
            except ValueError as exc:
                raise GrammarError(str(exc)) from None
        else:
            source = matcher_cls.grammar_from_regex(text)
        # Builds the lexer and parser (drops the GIL); errors leave the matcher in an
        # error state rather than raising.
        template = matcher_cls(self._tokenizer, source, log_level=0)
        if template.is_error():
            raise GrammarError(_describe(template.get_error()))
        return CompiledGrammar(kind, text, self.mask_words, template)


def canonical(grammar: object) -> tuple[str, str]:
    """(kind, canonical text) of a TGI grammar object, as TGI's validation reads it.

    A JSON value may be an object or a string holding one (parsed, as TGI does);
    `json_schema` carries `{"name": ..., "schema": ...}`. Keys keep the client's order:
    it is the order the generated object's properties come out in, as OpenAI does it.
    """
    if not isinstance(grammar, dict) or "type" not in grammar or "value" not in grammar:
        raise GrammarError("grammar must be an object with `type` and `value`")
    kind, value = grammar["type"], grammar["value"]
    if kind == REGEX:
        if not isinstance(value, str):
            raise GrammarError("a regex grammar's `value` must be a string")
        return REGEX, value
    if kind == JSON_SCHEMA:
        if not isinstance(value, dict) or "schema" not in value:
            raise GrammarError("a json_schema grammar's `value` must have a `schema`")
        kind, value = JSON, value["schema"]
    if kind != JSON:
        raise GrammarError(f"unknown grammar type `{kind}`: expected json, regex or json_schema")
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise GrammarError(str(exc)) from None
    if not isinstance(value, dict | bool):
        raise GrammarUnsupported("a JSON schema must be an object")
    return JSON, json.dumps(value, separators=(",", ":"), ensure_ascii=False)


# Keywords whose value is one subschema, a list of them, or a name -> subschema map.
_ONE_SCHEMA = (
    "additionalProperties", "items", "additionalItems", "contains", "not", "if", "then",
    "else", "propertyNames", "unevaluatedItems", "unevaluatedProperties",
)  # fmt: skip
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems", "items")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def closed_objects(schema: Any, *, composed: bool = False) -> Any:
    """`schema` with `"additionalProperties": false` on every object schema that lists
    `properties` and says nothing about other keys; a new value, the caller's untouched.

    Why: JSON Schema allows unlisted keys by default, and llguidance (1.9) has no option
    to refuse them, so a small model may add keys until `max_new_tokens` and the JSON
    never closes. TGI (outlines) and OpenAI's strict mode allow only the listed
    properties. An explicit `additionalProperties` (or `unevaluatedProperties`) is kept.
    Members of an `allOf` (`composed`) and a schema with an `allOf` of its own are left
    open: their properties add up across the branches, which closing one would forbid.
    """
    if isinstance(schema, list):
        return [closed_objects(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    closed: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            closed[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key == "allOf" and isinstance(value, list):
            closed[key] = [closed_objects(sub, composed=True) for sub in value]
        elif key in _ONE_SCHEMA or key in _SCHEMA_LISTS:
            closed[key] = closed_objects(value)
        else:
            closed[key] = value  # a keyword's data (enum, const, default, ...), not a schema
    open_keys = ("additionalProperties", "unevaluatedProperties", "allOf")
    if (
        isinstance(schema.get("properties"), dict)
        and not composed
        and not any(key in schema for key in open_keys)
    ):
        closed["additionalProperties"] = False
    return closed


def _describe(error: str) -> str:
    """llguidance's error on one line: `invalid regex "((": unclosed group`."""
    lines = [line.strip() for line in error.strip().splitlines() if line.strip()]
    if not lines:
        return "invalid grammar"
    head = re.sub(r"^at \d+\(\d+\): ", "", lines[0])  # the position in its own Lark text
    detail = next((line[len("error: ") :] for line in lines if line.startswith("error: ")), None)
    if detail is None:
        return head
    return f"{head.split(' (in regex)')[0].removesuffix(':')}: {detail}"


# ---- the engine thread's half ----------------------------------------------------------

_EXECUTOR: Any = None  # llguidance.LLExecutor, created on first use (it owns a thread pool)


def _executor() -> Any:
    global _EXECUTOR
    if _EXECUTOR is None:
        _EXECUTOR = llguidance.LLExecutor()
    return _EXECUTOR


def fill_bitmasks(matchers: Sequence[Any], mask_words: int) -> torch.Tensor:
    """Each matcher's allowed next tokens, as a CPU `[G, mask_words]` int32 bitmask.

    One call into llguidance for the whole batch (it fills rows in parallel, without
    the GIL). A stopped matcher (its grammar is complete, or it was fed a token the
    grammar refused, which masking prevents) allows only the EOS tokens.
    """
    bitmask = torch.empty((len(matchers), mask_words), dtype=torch.int32)  # [G, W]
    if matchers:
        _executor().unsafe_compute_mask_ptr(
            [(matcher, row) for row, matcher in enumerate(matchers)],
            bitmask.data_ptr(),
            mask_words * 4,
            len(matchers),
        )
    return bitmask


def grammar_bitmask(matchers: Sequence[Any], mask_words: int, vocab_size: int) -> torch.Tensor:
    """The `[G, ceil(vocab_size / 32)]` CPU bitmask of the grammar rows of a batch.

    A model vocabulary padded past the tokenizer's gets its extra tokens refused; one
    smaller than the tokenizer's cuts the mask.
    """
    grammar = fill_bitmasks(matchers, mask_words)  # [G, W]
    words = (vocab_size + 31) // 32
    if words == mask_words:
        return grammar
    padded = torch.zeros((len(matchers), words), dtype=torch.int32)  # [G, ceil(V/32)]
    width = min(mask_words, words)
    padded[:, :width] = grammar[:, :width]
    return padded


@dataclass(frozen=True, slots=True)
class GrammarMask:
    """Which tokens the grammar rows of a batch may take next, on the logits' device."""

    rows: torch.Tensor | None  # [G] int64 row indices; None when every row has a grammar
    refused: torch.Tensor  # [G, V] bool, True where the grammar refuses the token

    @classmethod
    def from_bitmask(
        cls, bitmask: torch.Tensor, vocab_size: int, rows: torch.Tensor | None
    ) -> GrammarMask:
        """`bitmask` ([G, W] int32, 32 * W >= vocab_size) on the device it will be used."""
        return cls(rows, _bits(bitmask, vocab_size) == 0)

    def apply(self, scores: torch.Tensor) -> torch.Tensor:
        """`scores` ([R, V]) with refused tokens at -inf; other rows untouched."""
        if self.rows is None:
            return scores.masked_fill(self.refused, float("-inf"))
        masked = scores.index_select(0, self.rows).masked_fill(self.refused, float("-inf"))
        return scores.index_put((self.rows,), masked)  # [R, V], out of place


def advance(matchers: Sequence[Any], token_ids: Sequence[int]) -> None:
    """Feed each matcher the token its row just sampled (host ints, no device sync).

    One call per row: a token costs a matcher about 2 us, less than handing the batch
    to llguidance's thread pool (measured: 17 us serial against 157 us for 8 rows).
    A refused token (masking prevents it) leaves the matcher stopped: EOS only.
    """
    for matcher, token_id in zip(matchers, token_ids, strict=True):
        matcher.consume_token(token_id)


def bitmask_to_allowed(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """`[R, W]` int32 bitmask (32 * W >= vocab_size) -> `[R, vocab_size]` bool, True
    where the token is allowed; batched ops on the bitmask's device."""
    return _bits(bitmask, vocab_size) != 0


def _bits(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[R, W] int32 -> [R, vocab_size] int32, nonzero where the token's bit is set."""
    rows, words = bitmask.shape
    bits = bitmask[:, :, None] & _bit_values(bitmask.device)  # [R, W, 32]
    return bits.view(rows, words * 32)[:, :vocab_size]


@functools.lru_cache(maxsize=8)
def _bit_values(device: torch.device) -> torch.Tensor:
    """[32] int32: 1 << i for each bit (bit 31 is the sign bit, -2**31); made once per
    device, so a step copies nothing but the bitmask to the device."""
    return torch.tensor([1 << i for i in range(31)] + [-(1 << 31)], dtype=torch.int32).to(device)
