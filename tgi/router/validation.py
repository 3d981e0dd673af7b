"""Turn client parameters into a `GenerationRequest`, with TGI's rules and messages.

The messages are TGI's own, word for word, because clients and tests match on them.
One refusal is ours: a backend that samples on its device honours only the sampling
parameters it declares (`Capabilities.sampling_parameters`), and a request using any
other is refused rather than answered as if the parameter had not been sent.
"""

from __future__ import annotations

import dataclasses
import math
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from tgi.errors import InvalidRequest
from tgi.router.request import GenerationRequest, StoppingParams
from tgi.sampling.grammar import CompiledGrammar, GrammarCompiler, GrammarError, GrammarUnsupported
from tgi.sampling.params import SamplingParams

if TYPE_CHECKING:
    # typing only: validation reads two fields, and needs no backend package at import
    from tgi.backend.contract import Capabilities

__all__ = ["BackendSampling", "ClientParameters", "Tokenizer", "ValidationLimits", "Validator"]


# Sampling fields validation sets without the client naming them: any warper turns
# sampling on, and every sampled request gets a seed.
_IMPLIED = frozenset({"do_sample", "seed"})

# The sampler's tensors hold what TGI's types hold (top_k an i32, the seed a u64) and
# only finite floats; the other integers are bounded by the checks TGI makes anyway.
_FLOATS = ("temperature", "top_p", "typical_p", "repetition_penalty", "frequency_penalty")
_INTEGER_RANGES = {"top_k": (-(2**31), 2**31 - 1), "seed": (0, 2**64 - 1)}


class Tokenizer(Protocol):
    """The part of a transformers tokenizer validation needs."""

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...


@dataclass(frozen=True, slots=True)
class ValidationLimits:
    max_input_tokens: int
    max_total_tokens: int
    max_stop_sequences: int
    max_best_of: int
    max_top_n_tokens: int
    watermark_gamma: float = 0.5  # TGI's WATERMARK_GAMMA
    watermark_delta: float = 2.0  # TGI's WATERMARK_DELTA


@dataclass(frozen=True, slots=True)
class BackendSampling:
    """What validation must know of the backend to refuse what its sampler ignores."""

    name: str  # the backend's name, as `tgi backends` lists it ("cpu", "neuron", ...)
    capabilities: Capabilities  # read: samples_on_device, sampling_parameters


@dataclass(frozen=True, slots=True)
class ClientParameters:
    """The generation parameters as a client sent them (None: not given)."""

    do_sample: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    typical_p: float | None = None
    repetition_penalty: float | None = None
    frequency_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    truncate: int | None = None
    best_of: int | None = None
    top_n_tokens: int | None = None
    watermark: bool = False
    decoder_input_details: bool = False
    return_full_text: bool | None = None
    grammar: object | None = None
    adapter_id: str | None = None
    ignore_eos: bool = False


class Validator:
    """Checks parameters and tokenizes; raises `InvalidRequest` with TGI's message.

    NOTE: the checks run in the order of TGI's `Validation::validate` (router/src/
    validation.rs), because a request breaking two rules must get the same message,
    after a value TGI's types cannot hold (its parser refuses those first; the HTTP
    schemas do too, this covers every other caller): best_of sampling, temperature,
    repetition penalty, frequency penalty, top_p, typical_p, top_k, max_new_tokens,
    stop, seed with best_of, top_n_tokens, empty inputs, truncate, then the token
    budget and the input length after tokenizing.
    `best_of`'s own range (TGI's `validate_best_of`) is checked before all of them.
    The grammar comes last, as in TGI, and is compiled here, on the validation worker
    thread, so building it never stalls the engine thread (the sampler gets its
    `GrammarSpec` and finds it in the compiler's LRU); without `grammars` it is
    refused as TGI refuses it under `--disable-grammar-support`.

    Between the token budget and the grammar: when `backend` samples on its device,
    every sampling parameter the request uses (`SamplingParams.non_default_fields`, and
    `grammar`) must be one it declares, or the request is refused naming the first
    that is not (the ones the client set before the implied `do_sample` and `seed`).
    Without `backend`, or for a backend that returns logits, nothing more is refused.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        limits: ValidationLimits,
        grammars: GrammarCompiler | None = None,
        backend: BackendSampling | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self.limits = limits
        self.grammars = grammars
        self.backend = backend

    def check_best_of(self, best_of: int) -> None:
        """TGI's `validate_best_of`: run before anything else when best_of != 1."""
        max_best_of = self.limits.max_best_of
        if max_best_of == 1 and best_of != 1:
            raise InvalidRequest("`best_of` != 1 is not allowed for this endpoint")
        if best_of > max_best_of or best_of <= 0:
            raise InvalidRequest(f"`best_of` must be > 0 and <= {max_best_of}. Given: {best_of}")

    @staticmethod
    def check_streamable(params: ClientParameters) -> None:
        """What TGI refuses on /generate_stream before validating anything else."""
        if (params.best_of if params.best_of is not None else 1) != 1:
            raise InvalidRequest("`best_of` != 1 is not supported when streaming tokens")
        if params.decoder_input_details:
            raise InvalidRequest(
                "`decoder_input_details` == true is not supported when streaming tokens"
            )

    def validate(
        self, inputs: str, params: ClientParameters, *, add_special_tokens: bool = True
    ) -> GenerationRequest:
        """`add_special_tokens=False` for a chat-templated prompt, which already holds
        them (TGI's `GenerateRequest.add_special_tokens`, false for chat)."""
        self._check_representable(params)
        if params.best_of is not None and params.best_of != 1:
            self.check_best_of(params.best_of)
        sampling = self._sampling(params)
        limits = self.limits
        if params.max_new_tokens is not None and params.max_new_tokens <= 0:
            raise InvalidRequest("`max_new_tokens` must be strictly positive")
        if len(params.stop) > limits.max_stop_sequences:
            raise InvalidRequest(
                f"`stop` supports up to {limits.max_stop_sequences} stop sequences. "
                f"Given: {len(params.stop)}"
            )
        if (params.best_of or 1) > 1 and params.seed is not None:
            raise InvalidRequest("`seed` must not be set when `best_of` > 1")
        top_n = params.top_n_tokens or 0
        if top_n > limits.max_top_n_tokens or top_n < 0:
            raise InvalidRequest(
                f"`top_n_tokens` must be >= 0 and <= {limits.max_top_n_tokens}. Given: {top_n}"
            )
        if not inputs:
            raise InvalidRequest("`inputs` cannot be empty")
        truncate = params.truncate
        if truncate is not None and (truncate <= 0 or truncate > limits.max_input_tokens):
            raise InvalidRequest(
                "`truncate` must be strictly positive and less than "
                f"{limits.max_input_tokens}. Given: {truncate}"
            )
        input_ids = self._tokenize(inputs, truncate, add_special_tokens)
        # TGI checks the total budget before the input length; keep its order.
        max_new_tokens = self._max_new_tokens(len(input_ids), params.max_new_tokens)
        if len(input_ids) > limits.max_input_tokens:
            raise InvalidRequest(
                f"`inputs` must have less than {limits.max_input_tokens} tokens. "
                f"Given: {len(input_ids)}"
            )
        if max_new_tokens <= 0:  # a prompt of max_total_tokens, under limits that allow one
            raise self._budget_error(len(input_ids), max_new_tokens)
        self._check_device_sampling(
            sampling, params.grammar is not None, client_seed=params.seed is not None
        )
        grammar = self.compile_grammar(params.grammar)
        self._check_unsupported(params)
        if grammar is not None:
            # plain text in the request; the sampler compiles it again (an LRU hit here)
            sampling = dataclasses.replace(sampling, grammar=grammar.spec)
        return GenerationRequest(
            inputs=inputs,
            input_ids=input_ids,
            sampling=sampling,
            stopping=StoppingParams(
                max_new_tokens=max_new_tokens,
                stop_sequences=tuple(params.stop),
                ignore_eos=params.ignore_eos,
            ),
            decoder_input_details=params.decoder_input_details,
            return_full_text=bool(params.return_full_text),
        )

    @staticmethod
    def _check_representable(params: ClientParameters) -> None:
        """Refuse what the sampler cannot hold: one such row fails every row of its step."""
        for name in _FLOATS:
            value = getattr(params, name)
            if value is not None and not math.isfinite(value):
                raise InvalidRequest(f"`{name}` must be a finite number. Given: {value}")
        for name, (low, high) in _INTEGER_RANGES.items():
            value = getattr(params, name)
            if value is not None and not low <= value <= high:
                raise InvalidRequest(f"`{name}` must be >= {low} and <= {high}. Given: {value}")

    def _sampling(self, params: ClientParameters) -> SamplingParams:
        sampling = params.do_sample or any(
            value is not None
            for value in (params.temperature, params.top_k, params.top_p, params.typical_p)
        )
        if (params.best_of or 1) > 1 and not sampling:
            raise InvalidRequest("you must use sampling when `best_of` is > 1")
        temperature = 1.0 if params.temperature is None else params.temperature
        if temperature <= 0.0:
            raise InvalidRequest("`temperature` must be strictly positive")
        repetition = 1.0 if params.repetition_penalty is None else params.repetition_penalty
        if repetition <= 0.0:
            raise InvalidRequest("`repetition_penalty` must be strictly positive")
        frequency = 0.0 if params.frequency_penalty is None else params.frequency_penalty
        if not -2.0 <= frequency <= 2.0:
            raise InvalidRequest("`frequency_penalty` must be >= -2.0 and <= 2.0")
        top_p = 1.0 if params.top_p is None else params.top_p
        if params.top_p is not None and not 0.0 < top_p < 1.0:
            raise InvalidRequest("`top_p` must be > 0.0 and < 1.0")
        typical_p = 1.0 if params.typical_p is None else params.typical_p
        if params.typical_p is not None and not 0.0 < typical_p < 1.0:
            raise InvalidRequest("`typical_p` must be > 0.0 and < 1.0")
        top_k = 0 if params.top_k is None else params.top_k
        if params.top_k is not None and top_k <= 0:
            raise InvalidRequest("`top_k` must be strictly positive")
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        # TGI samples whenever a warper is set, do_sample or not (text_generation_server/
        # utils/tokens.py, HeterogeneousNextTokenChooser).
        do_sample = (
            params.do_sample or temperature != 1.0 or top_k > 0 or top_p < 1.0 or typical_p < 1.0
        )
        return SamplingParams(
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            typical_p=typical_p,
            repetition_penalty=repetition,
            frequency_penalty=frequency,
            watermark=params.watermark,
            watermark_gamma=self.limits.watermark_gamma,
            watermark_delta=self.limits.watermark_delta,
            top_n_tokens=params.top_n_tokens or 0,
        )

    def compile_grammar(self, grammar: object | None) -> CompiledGrammar | None:
        """TGI's `grammar` (`{"type": "json" | "regex" | "json_schema", "value": ...}`)
        compiled for this tokenizer (cached); raises `InvalidRequest` with TGI's
        messages. Blocks for the build: call it from a worker thread."""
        if grammar is None:
            return None
        if self.grammars is None:
            # TGI's own message when it runs with --disable-grammar-support.
            raise InvalidRequest("grammar is not supported")
        try:
            return self.grammars.compile(grammar)
        except GrammarUnsupported:
            raise InvalidRequest("grammar is not supported") from None
        except GrammarError as exc:
            raise InvalidRequest(f"grammar is not valid: {exc}") from None

    def _check_device_sampling(
        self, sampling: SamplingParams, has_grammar: bool, *, client_seed: bool = True
    ) -> None:
        """Refuse a sampling parameter an on-device sampler would silently ignore.

        A seed the server drew (the client gave none) asks for no reproducibility, so
        only a client's seed must be one the device honours. `top_k` must also fit the
        device sampler's bound (`Capabilities.max_top_k`)."""
        backend = self.backend
        if backend is None or not backend.capabilities.samples_on_device:
            return
        used = [*sampling.non_default_fields(), *(("grammar",) if has_grammar else ())]
        honoured = backend.capabilities.sampling_parameters
        refused = [
            name
            for name in used
            if name not in honoured and not (name == "seed" and not client_seed)
        ]
        if refused:
            # Name what the client set before what it implies (temperature -> do_sample, seed).
            name = min(refused, key=lambda field: field in _IMPLIED)
            raise InvalidRequest(
                f"`{name}` is not supported by the {backend.name} backend, which samples on "
                "its device"
            )
        bound = backend.capabilities.max_top_k
        if bound is not None and sampling.top_k > bound:
            raise InvalidRequest(
                f"`top_k` must be <= {bound} on the {backend.name} backend, which samples on "
                f"its device. Given: {sampling.top_k}"
            )

    @staticmethod
    def _check_unsupported(params: ClientParameters) -> None:
        """Refuse, loudly, what this version cannot honour yet (never ignore it)."""
        if params.adapter_id is not None:
            raise InvalidRequest(
                f"adapter `{params.adapter_id}` not found: this server serves no LoRA adapters"
            )

    def _tokenize(
        self, inputs: str, truncate: int | None, add_special_tokens: bool = True
    ) -> tuple[int, ...]:
        try:
            ids = self._tokenizer.encode(inputs, add_special_tokens=add_special_tokens)
        except Exception as exc:  # tokenizers raises plain Exceptions on odd input
            raise InvalidRequest(f"tokenizer error {exc}") from exc
        if truncate is not None:
            ids = ids[-truncate:]
        return tuple(ids)

    def _max_new_tokens(self, input_length: int, asked: int | None) -> int:
        max_total = self.limits.max_total_tokens
        max_new_tokens = asked if asked is not None else max(max_total - input_length, 0)
        if input_length + max_new_tokens > max_total:
            raise self._budget_error(input_length, max_new_tokens)
        return max_new_tokens

    def _budget_error(self, input_length: int, max_new_tokens: int) -> InvalidRequest:
        return InvalidRequest(
            f"`inputs` tokens + `max_new_tokens` must be <= {self.limits.max_total_tokens}. "
            f"Given: {input_length} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
