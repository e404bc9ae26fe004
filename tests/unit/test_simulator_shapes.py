"""OpenAI wire shapes built by the simulator, byte-level details included."""

from __future__ import annotations

from typing import Any

import orjson

from gateway.simulator.openai_shapes import ChatShape, CompletionShape, usage


def decode(event: bytes) -> dict[str, Any]:
    """The JSON object of one `data:` event."""
    assert event.startswith(b"data: ")
    assert event.endswith(b"\n\n")
    payload: dict[str, Any] = orjson.loads(event.removeprefix(b"data: "))
    return payload


def test_chat_token_chunks_have_the_openai_chunk_fields() -> None:
    """A token chunk carries id, object, created, model and one delta, and no `usage` key even
    when usage was asked for (vLLM sends it only in the final usage-only chunk)."""
    shape = ChatShape("chatcmpl-1", 1700000000, 'odd "model"\n')
    chunk = decode(shape.token_event(0, ' caf\u00e9 "quoted"'))
    expected: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": 'odd "model"\n',
        "choices": [
            {
                "index": 0,
                "delta": {"content": ' caf\u00e9 "quoted"'},
                "logprobs": None,
                "finish_reason": None,
            }
        ],
    }
    assert chunk == expected


def test_legacy_token_chunks_carry_text_per_choice() -> None:
    """A legacy chunk names its choice index and carries a text piece."""
    chunk = decode(CompletionShape("cmpl-1", 1, "m").token_event(2, " word"))
    assert chunk["object"] == "text_completion"
    assert chunk["choices"] == [
        {"index": 2, "text": " word", "logprobs": None, "finish_reason": None}
    ]


def test_usage_chunk_has_no_choices_and_reports_cached_tokens() -> None:
    """The final usage chunk has empty choices and the prompt's cached tokens."""
    chunk = decode(ChatShape("c", 1, "m").usage_event(usage(10, 4, 6)))
    assert chunk["choices"] == []
    assert chunk["usage"] == {
        "prompt_tokens": 10,
        "completion_tokens": 4,
        "total_tokens": 14,
        "prompt_tokens_details": {"cached_tokens": 6},
    }


def test_closing_chunk_has_an_empty_delta_and_the_finish_reason() -> None:
    """A chat stream's last choice chunk has `{}` as delta and the finish reason."""
    chunk = decode(ChatShape("c", 1, "m").closing_event(0, "stop"))
    assert chunk["choices"][0]["delta"] == {}
    assert chunk["choices"][0]["finish_reason"] == "stop"
