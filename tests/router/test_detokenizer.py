"""Incremental detokenization: deltas join to the full text and never split a character."""

from __future__ import annotations

from typing import Any

import pytest

from tgi.router.detokenizer import IncrementalDetokenizer

TEXTS = {
    "ascii": "Hello, world! 123",
    "cjk": "你好\uff0c世界",  # with a fullwidth comma
    "emoji": "😀👍🏽🎉",
    "mixed": "naïve café: 東京 🚀 done.",
    "long": "ab 世界 🙂 " * 12,  # longer than the detokenizer's context window
}


def stream(tokenizer: Any, prompt: str, text: str) -> list[str]:
    detokenizer = IncrementalDetokenizer(tokenizer, tuple(tokenizer.encode(prompt)))
    return [detokenizer.push(token_id) for token_id in tokenizer.encode(text)]


def per_byte_deltas(text: str) -> list[str]:
    """What a byte tokenizer must stream: "" for each byte before a character's last."""
    deltas: list[str] = []
    for char in text:
        deltas += [""] * (len(char.encode()) - 1) + [char]
    return deltas


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("prompt", ["prompt: ", "你好"])
def test_deltas_join_to_the_full_decode(byte_tokenizer: Any, name: str, prompt: str) -> None:
    text = TEXTS[name]
    deltas = stream(byte_tokenizer, prompt, text)
    assert "".join(deltas) == text == byte_tokenizer.decode(byte_tokenizer.encode(text))
    assert not any("\ufffd" in delta for delta in deltas)
    assert deltas == per_byte_deltas(text)


def test_a_prompt_whose_context_starts_mid_character(byte_tokenizer: Any) -> None:
    # The last 5 prompt tokens (the context kept) begin inside the 3-byte "世".
    prompt = "x世界"
    assert len(byte_tokenizer.encode(prompt)) == 7
    assert stream(byte_tokenizer, prompt, "é!") == ["", "é", "!"]


def test_leading_spaces_are_preserved(byte_tokenizer: Any) -> None:
    deltas = stream(byte_tokenizer, "prompt", "  two spaces")
    assert deltas[:3] == [" ", " ", "t"]
    assert "".join(deltas) == "  two spaces"


def test_an_invalid_byte_is_not_held_forever(byte_tokenizer: Any) -> None:
    # A lone continuation byte never completes; the next character releases it.
    continuation_byte = byte_tokenizer.encode("é")[1]
    detokenizer = IncrementalDetokenizer(byte_tokenizer, tuple(byte_tokenizer.encode("p")))
    assert detokenizer.push(continuation_byte) == ""
    assert detokenizer.push(byte_tokenizer.encode("a")[0]) == "\ufffda"


@pytest.fixture(scope="module")
def sentencepiece_like() -> tuple[Any, dict[str, int]]:
    """A Llama-style tokenizer: "▁" for spaces, byte fallback, the first space stripped."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    vocab.update({f"<0x{byte:02X}>": 3 + byte for byte in range(256)})
    for piece in ("▁Hello", "▁world", "!", "▁", "▁caf", "é"):
        vocab[piece] = len(vocab)
    model = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    model.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=model, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    return tokenizer, vocab


def test_sentencepiece_spaces_and_byte_fallback(sentencepiece_like: Any) -> None:
    tokenizer, vocab = sentencepiece_like
    prompt = [vocab["<s>"], vocab["▁Hello"]]
    pieces = ["▁world", "!", "▁", "<0xE4>", "<0xB8>", "<0x96>", "▁caf", "é"]  # E4 B8 96: 世
    generated = [vocab[piece] for piece in pieces]
    assert tokenizer.decode([vocab["▁world"]]) == "world"  # alone, the space is lost

    detokenizer = IncrementalDetokenizer(tokenizer, tuple(prompt))
    deltas = [detokenizer.push(token_id) for token_id in generated]

    assert deltas == [" world", "!", " ", "", "", "世", " caf", "é"]
    whole, before = tokenizer.decode(prompt + generated), tokenizer.decode(prompt)
    assert whole.startswith(before)
    assert "".join(deltas) == whole[len(before) :] == " world! 世 café"
