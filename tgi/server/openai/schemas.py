"""OpenAI-compatible request and response bodies, as TGI's OpenAPI document shapes them.

Requests accept what the official `openai` SDK sends (a `stop` string, `json_schema`
response formats, `max_completion_tokens`) on top of TGI's own fields. Responses carry
every field TGI's schema requires plus OpenAI's `object`, so both clients parse them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tgi.server.schemas import F32, U32, U64

__all__ = [
    "ChatMessage",
    "ChatRequest",
    "CompletionRequest",
    "FunctionDefinition",
    "ResponseFormat",
    "StreamOptions",
    "Tool",
    "ToolCallIn",
    "ToolChoice",
    "Usage",
]


class _Lenient(BaseModel):
    """OpenAI clients send fields we do not know (`user`, `metadata`, ...): ignore them.
    The fields we know have TGI's types, coerced from nothing (`tgi.server.schemas`)."""

    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImageUrl(_Lenient):
    url: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageUrl


class FunctionCallIn(_Lenient):
    name: str
    # OpenAI sends a JSON string; TGI's own schema an object. Templates get a dict.
    arguments: str | dict[str, Any] | None = None
    description: str | None = None


class ToolCallIn(_Lenient):
    id: str | None = None
    type: str = "function"
    function: FunctionCallIn


class ChatMessage(_Lenient):
    role: str
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None

    def text(self) -> str:
        """The content as one string, as TGI flattens it for a text-only model: text
        parts joined with no separator, an image as a markdown link."""
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(
            part.text if isinstance(part, TextPart) else f"![]({part.image_url.url})"
            for part in self.content
        )


class FunctionDefinition(_Lenient):
    name: str
    description: str | None = None
    # OpenAI calls the JSON schema `parameters`, TGI `arguments`; either is accepted.
    parameters: dict[str, Any] = Field(default_factory=lambda: {"type": "object", "properties": {}})

    @model_validator(mode="before")
    @classmethod
    def _tgi_arguments(cls, data: Any) -> Any:
        if isinstance(data, dict) and "parameters" not in data and "arguments" in data:
            return {**data, "parameters": data["arguments"]}
        return data


class Tool(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDefinition


class FunctionName(_Lenient):
    name: str


class ToolChoiceFunction(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionName


ToolChoice = Literal["auto", "none", "required"] | ToolChoiceFunction


class JsonSchemaConfig(_Lenient):
    name: str | None = None
    schema_: dict[str, Any] | bool = Field(alias="schema")
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(_Lenient):
    """TGI's `GrammarType` (`json`, `regex`, `json_schema` with `value`) and OpenAI's
    `json_object` / `json_schema` (with `json_schema`), in one model."""

    type: Literal["json", "regex", "json_schema", "json_object", "text"]
    value: Any = None
    json_schema: JsonSchemaConfig | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


def _stop_list(value: object) -> object:
    """OpenAI allows one stop string; TGI's schema an array."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return value


class _SamplingFields(_Lenient):
    model: str | None = None
    max_tokens: U32 | None = None
    temperature: F32 | None = None
    top_p: F32 | None = None
    seed: U64 | None = None
    stop: list[str] = Field(default_factory=list)
    stream: bool = False
    stream_options: StreamOptions | None = None
    frequency_penalty: F32 | None = None
    presence_penalty: F32 | None = None
    n: U32 | None = None
    logit_bias: Any = None
    # vLLM's extension, as on the TGI routes: keep generating past EOS
    ignore_eos: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @field_validator("stop", mode="before")
    @classmethod
    def _stop(cls, value: object) -> object:
        return _stop_list(value)

    @field_validator("stream", "ignore_eos", mode="before")
    @classmethod
    def _null_is_false(cls, value: object) -> object:
        return False if value is None else value


class ChatRequest(_SamplingFields):
    messages: list[ChatMessage]
    max_completion_tokens: U32 | None = None
    logprobs: bool | None = None
    top_logprobs: U32 | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    tool_prompt: str | None = None
    response_format: ResponseFormat | None = None
    # TGI's extension: a guideline handed to the chat template (e.g. ShieldGemma's)
    guideline: str | None = None

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _tool_choice(cls, value: object) -> object:
        # TGI also takes a bare function name as a string (its ToolTypeDeserializer).
        if isinstance(value, str) and value not in ("auto", "none", "required"):
            return {"type": "function", "function": {"name": value}}
        return value


class CompletionRequest(_SamplingFields):
    prompt: str | list[str]
    suffix: str | None = None
    echo: bool = False
    logprobs: U32 | None = None
    best_of: U64 | None = None
    repetition_penalty: F32 | None = None

    @field_validator("echo", mode="before")
    @classmethod
    def _echo(cls, value: object) -> object:
        return False if value is None else value

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
