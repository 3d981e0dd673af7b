"""What counts as a token event in each protocol."""

from __future__ import annotations

from tgi.bench.client import Api, EventInfo, parse_event


def test_tgi_token_final_and_error_events() -> None:
    token = parse_event(Api.TGI, {"token": {"id": 5, "text": " a"}, "generated_text": None})
    assert token == EventInfo(token=True, text=" a", finished=False, output_tokens=None)
    final = parse_event(
        Api.TGI,
        {
            "token": {"id": 6, "text": "b"},
            "generated_text": " ab",
            "details": {"generated_tokens": 2},
        },
    )
    assert (final.token, final.finished, final.output_tokens) == (True, True, 2)
    error = parse_event(Api.TGI, {"error": "Request failed", "error_type": "generation"})
    assert error.error == "generation: Request failed" and not error.token


def test_openai_completion_chunks() -> None:
    def chunk(text: str | None, finish: str | None) -> dict[str, object]:
        return {"choices": [{"index": 0, "text": text, "finish_reason": finish}]}

    assert parse_event(Api.OPENAI, chunk(" x", None)).token
    assert parse_event(Api.OPENAI, chunk("", None)).token  # a token that renders as nothing
    closing = parse_event(Api.OPENAI, chunk("", "length"))  # llama.cpp's closing chunk
    assert not closing.token and closing.finished
    last = parse_event(Api.OPENAI, chunk(" y", "length"))  # vLLM's last token chunk
    assert last.token and last.finished
    usage = parse_event(Api.OPENAI, {"choices": [], "usage": {"completion_tokens": 128}})
    assert not usage.token and usage.output_tokens == 128
    error = parse_event(Api.OPENAI, {"error": {"message": "too long", "code": 400}})
    assert error.error == "too long"


def test_openai_chat_role_delta_is_not_the_first_token() -> None:
    def chunk(delta: dict[str, object], finish: str | None = None) -> dict[str, object]:
        return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}

    assert not parse_event(Api.OPENAI_CHAT, chunk({"role": "assistant", "content": ""})).token
    assert not parse_event(Api.OPENAI_CHAT, chunk({"role": "assistant", "content": None})).token
    assert parse_event(Api.OPENAI_CHAT, chunk({"content": "Hi"})).token
    assert parse_event(Api.OPENAI_CHAT, chunk({"reasoning_content": "hmm"})).token
    end = parse_event(Api.OPENAI_CHAT, chunk({}, "stop"))
    assert not end.token and end.finished
