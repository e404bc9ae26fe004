"""Usage read from answers: whole bodies by one reverse search, streams as they pass."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.dispatch.usage import StreamUsage, Usage, usage_from_body

USAGE = {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}


def chunk(content: str) -> bytes:
    """One content event of a chat stream."""
    payload = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}],
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def usage_event(cached: int = 4) -> bytes:
    """The usage-only event vLLM sends last when asked for `include_usage`."""
    usage = {**USAGE, "prompt_tokens_details": {"cached_tokens": cached}}
    payload = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "m",
        "choices": [],
        "usage": usage,
    }
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE = b"data: [DONE]\n\n"


def test_a_whole_answer_usage_is_read_with_cached_tokens() -> None:
    """prompt, completion and cached tokens come from the answer's `usage`."""
    body = orjson.dumps(
        {
            "choices": [{"message": {"content": "hi"}}],
            "usage": {**USAGE, "prompt_tokens_details": {"cached_tokens": 8}},
        }
    )
    assert usage_from_body(body) == Usage(12, 3, 8)


@pytest.mark.parametrize(
    "body",
    [
        b'{"choices": []}',
        b'{"usage": null}',
        b'{"usage": {"prompt_tokens": "many"}}',
        b'{"choices": [{"message": {"content": "say \\"usage\\": {\\"prompt_tokens\\": 9}"}}]}',
        b"not json at all",
    ],
)
def test_an_answer_without_a_usable_usage_has_none(body: bytes) -> None:
    """No usage, a null one, a malformed one, or one quoted inside content: None."""
    assert usage_from_body(body) is None


def test_a_usage_quoted_in_content_does_not_hide_the_real_one() -> None:
    """The real `usage` after content that quotes the word is still found."""
    body = orjson.dumps({"choices": [{"message": {"content": 'a "usage": {}'}}], "usage": USAGE})
    assert usage_from_body(body) == Usage(12, 3, 0)


def test_a_client_that_asked_for_usage_gets_every_byte() -> None:
    """Not stripping: the stream passes unchanged and its usage is noted."""
    stream = [chunk("Hel"), chunk("lo"), usage_event(), DONE]
    reader = StreamUsage(strip=False)
    assert b"".join(reader.feed(part) for part in stream) + reader.flush() == b"".join(stream)
    assert reader.usage == Usage(12, 3, 4)


@given(st.lists(st.integers(1, 200), min_size=1, max_size=20))
def test_a_client_that_did_not_ask_gets_the_stream_without_the_usage_event(
    cuts: list[int],
) -> None:
    """Stripping, however the stream is cut into reads: the bytes without the usage event."""
    stream = b"".join([chunk("Hel"), chunk("lo"), usage_event(), DONE])
    reads, start = [], 0
    for cut in cuts:
        reads.append(stream[start : start + cut])
        start += cut
    reads.append(stream[start:])
    reader = StreamUsage(strip=True)
    passed = b"".join(reader.feed(part) for part in reads if part) + reader.flush()
    assert passed == chunk("Hel") + chunk("lo") + DONE
    assert reader.usage == Usage(12, 3, 4)


def test_content_events_that_mention_usage_are_kept() -> None:
    """Only the event with empty choices and a usage object is taken out."""
    mention = chunk('the "usage" of words')
    reader = StreamUsage(strip=True)
    assert reader.feed(mention + DONE) == mention + DONE
    assert reader.usage is None


def test_a_responses_api_answer_s_input_and_output_tokens_are_read() -> None:
    """The Responses API names its counts `input_tokens` and `output_tokens`: they count too."""
    body = orjson.dumps(
        {
            "id": "resp_1",
            "output": [],
            "usage": {
                "input_tokens": 30,
                "input_tokens_details": {"cached_tokens": 16},
                "output_tokens": 7,
                "total_tokens": 37,
            },
        }
    )
    assert usage_from_body(body) == Usage(30, 7, 16)


def test_a_stripped_stream_keeps_every_other_byte_when_the_usage_event_comes_alone() -> None:
    """The usage event arriving alone at the end, after a partial event: the client's bytes are
    the stream without it, separators included."""
    reader = StreamUsage(strip=True)
    first, second = chunk("a"), chunk("b")
    passed = reader.feed(first + second[:10]) + reader.feed(second[10:])
    passed += reader.feed(usage_event()) + reader.feed(b"data: [DONE]\n\n") + reader.flush()
    assert passed == first + second + b"data: [DONE]\n\n"
    assert reader.usage == Usage(12, 3, 4)
