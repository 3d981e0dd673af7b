"""A backend that samples on its device: validation refuses what its sampler ignores."""

from __future__ import annotations

from typing import Any

import pytest

from tgi.backend.contract import Batching, Capabilities, KvLayout
from tgi.errors import InvalidRequest
from tgi.router.validation import BackendSampling, ClientParameters, ValidationLimits, Validator
from tgi.sampling.grammar import GrammarCompiler

LIMITS = ValidationLimits(
    max_input_tokens=10,
    max_total_tokens=16,
    max_stop_sequences=4,
    max_best_of=2,
    max_top_n_tokens=5,
)

# What a Neuron-like on-device sampler honours: greedy, or seeded top-k / top-p sampling.
HONOURED = frozenset({"do_sample", "seed", "temperature", "top_k", "top_p"})


def on_device(
    honoured: frozenset[str] = HONOURED, name: str = "neuron", max_top_k: int | None = None
) -> BackendSampling:
    capabilities = Capabilities(
        max_top_k=max_top_k,
        batching=Batching.STATIC,
        kv_layout=KvLayout.SLOTS,
        static_batch_size=4,
        static_max_length=16,
        samples_on_device=True,
        sampling_parameters=honoured,
    )
    return BackendSampling(name, capabilities)


@pytest.fixture
def grammars(byte_tokenizer: Any) -> GrammarCompiler:
    built = GrammarCompiler.from_hf_tokenizer(byte_tokenizer, [byte_tokenizer.eos_token_id])
    assert built is not None
    return built


def validate(validator: Validator, **params: Any) -> Any:
    params.setdefault("max_new_tokens", 4)
    return validator.validate("hello", ClientParameters(**params))


def refusal(field: str, backend: str = "neuron") -> str:
    return f"`{field}` is not supported by the {backend} backend, which samples on its device"


REFUSED = [
    ({"top_n_tokens": 2}, "top_n_tokens"),
    ({"typical_p": 0.5}, "typical_p"),
    ({"repetition_penalty": 1.2}, "repetition_penalty"),
    ({"frequency_penalty": 0.5}, "frequency_penalty"),
    ({"watermark": True}, "watermark"),
    ({"grammar": {"type": "regex", "value": "[0-9]+"}}, "grammar"),
    ({"grammar": {"type": "json", "value": {"type": "object"}}}, "grammar"),
    (
        {"grammar": {"type": "json_schema", "value": {"name": "n", "schema": {"type": "integer"}}}},
        "grammar",
    ),
    ({"grammar": {"type": "regex", "value": "(("}}, "grammar"),  # never worth compiling
]


@pytest.mark.parametrize(("params", "field"), REFUSED)
def test_a_field_the_device_ignores_is_refused_by_name(
    byte_tokenizer: Any, grammars: GrammarCompiler, params: dict[str, Any], field: str
) -> None:
    validator = Validator(byte_tokenizer, LIMITS, grammars, backend=on_device())
    with pytest.raises(InvalidRequest) as caught:
        validate(validator, **params)
    assert str(caught.value) == refusal(field)


@pytest.mark.parametrize(
    "params",
    [
        {},
        {"do_sample": True},
        {"do_sample": True, "seed": 3, "temperature": 0.7, "top_k": 20, "top_p": 0.9},
        {"temperature": 0.5},  # sampling, implied by the warper
        {"stop": ("\n",), "truncate": 5, "decoder_input_details": True},  # not sampling fields
    ],
)
def test_honoured_fields_pass(
    byte_tokenizer: Any, grammars: GrammarCompiler, params: dict[str, Any]
) -> None:
    validator = Validator(byte_tokenizer, LIMITS, grammars, backend=on_device())
    request = validate(validator, **params)
    assert set(request.sampling.non_default_fields()) <= HONOURED


def test_the_field_the_client_set_is_named_before_what_it_implies(byte_tokenizer: Any) -> None:
    """temperature turns sampling on (and brings a seed): name temperature, not do_sample."""
    validator = Validator(byte_tokenizer, LIMITS, backend=on_device(frozenset(), name="gaudi"))
    with pytest.raises(InvalidRequest) as caught:
        validate(validator, temperature=0.5)
    assert str(caught.value) == refusal("temperature", "gaudi")
    with pytest.raises(InvalidRequest) as caught:
        validate(validator, do_sample=True)
    assert str(caught.value) == refusal("do_sample", "gaudi")
    # a device sampler that cannot seed refuses the seed a client gives...
    unseeded = Validator(byte_tokenizer, LIMITS, backend=on_device(frozenset({"do_sample"})))
    with pytest.raises(InvalidRequest) as caught:
        validate(unseeded, do_sample=True, seed=7)
    assert str(caught.value) == refusal("seed")
    # ...but not the one the server draws when the client gives none
    request = validate(unseeded, do_sample=True)
    assert request.sampling.do_sample


def test_top_k_past_the_device_samplers_bound_is_refused(byte_tokenizer: Any) -> None:
    validator = Validator(byte_tokenizer, LIMITS, backend=on_device(max_top_k=256))
    assert validate(validator, top_k=256).sampling.top_k == 256
    with pytest.raises(InvalidRequest) as caught:
        validate(validator, top_k=257)
    assert str(caught.value) == (
        "`top_k` must be <= 256 on the neuron backend, which samples on its device. Given: 257"
    )


def test_tgis_own_checks_come_first(byte_tokenizer: Any) -> None:
    validator = Validator(byte_tokenizer, LIMITS, backend=on_device())
    with pytest.raises(InvalidRequest) as caught:
        validate(validator, top_n_tokens=9)
    assert str(caught.value) == "`top_n_tokens` must be >= 0 and <= 5. Given: 9"


def test_a_device_sampler_without_a_compiler_names_itself_for_grammar(
    byte_tokenizer: Any,
) -> None:
    validator = Validator(byte_tokenizer, LIMITS, backend=on_device())
    with pytest.raises(InvalidRequest) as caught:
        validate(validator, grammar={"type": "regex", "value": "a"})
    assert str(caught.value) == refusal("grammar")


def test_a_device_sampler_that_declares_grammar_gets_the_spec(
    byte_tokenizer: Any, grammars: GrammarCompiler
) -> None:
    backend = on_device(HONOURED | {"grammar", "top_n_tokens"})
    validator = Validator(byte_tokenizer, LIMITS, grammars, backend=backend)
    request = validate(validator, grammar={"type": "regex", "value": "a"}, top_n_tokens=2)
    assert request.sampling.grammar is not None and request.sampling.grammar.source == "a"
    assert request.sampling.top_n_tokens == 2


EVERYTHING: dict[str, Any] = {
    "do_sample": True,
    "temperature": 0.7,
    "top_k": 5,
    "top_p": 0.9,
    "typical_p": 0.9,
    "repetition_penalty": 1.2,
    "frequency_penalty": 0.5,
    "watermark": True,
    "top_n_tokens": 2,
    "grammar": {"type": "regex", "value": "[a-z]+"},
}


@pytest.mark.parametrize(
    "backend",
    [
        None,
        BackendSampling(
            "cpu", Capabilities(batching=Batching.CONTINUOUS, kv_layout=KvLayout.PAGED)
        ),
    ],
    ids=["no-backend", "returns-logits"],
)
def test_a_backend_that_returns_logits_refuses_nothing_new(
    byte_tokenizer: Any, grammars: GrammarCompiler, backend: BackendSampling | None
) -> None:
    validator = Validator(byte_tokenizer, LIMITS, grammars, backend=backend)
    request = validate(validator, **EVERYTHING)
    assert request.sampling.non_default_fields() == (
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "typical_p",
        "repetition_penalty",
        "frequency_penalty",
        "watermark",
        "top_n_tokens",
        "grammar",
        "seed",
    )
