"""A JSON body whose parse may be costly is read in the helper process with the same outcome as
inline, while the event loop keeps turning."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import orjson
import pytest

from gateway.edge.body_parse import (
    INLINE_BUDGET_NS,
    close_pool,
    parse_cost_bound_ns,
    read_request,
)
from gateway.edge.endpoints import ENDPOINTS, ClientRequest, EndpointSpec, parse_request
from gateway.routing.conversations import stable_head
from gateway.shared.errors import GatewayError

CHAT = next(spec for spec in ENDPOINTS if spec.path == "/v1/chat/completions")
COMPLETIONS = next(spec for spec in ENDPOINTS if spec.path == "/v1/completions")
RESPONSES = next(spec for spec in ENDPOINTS if spec.path == "/v1/responses")
HEAD_BYTES = 4096
# Enough structure that the bound sends it to the helper.
FILLER = b",".join(b'"k%d":[1]' % index for index in range(30_000))


@pytest.fixture(autouse=True)
def _helper_stopped() -> Iterator[None]:
    """Each test leaves no helper process behind."""
    yield
    close_pool()


def costly(opening: bytes) -> bytes:
    """`opening` (a JSON object's text without its closing brace) with filler keys after."""
    return opening + b"," + FILLER + b"}"


def test_the_bound_sends_honest_long_text_inline_and_much_structure_away() -> None:
    """A 9 MB conversation of long messages is parsed inline; 30,000 keys of arrays are not."""
    long_messages = [{"role": "user", "content": "Lorem ipsum dolor. " * 470}] * 1000
    conversation = orjson.dumps({"model": "m", "messages": long_messages})
    assert len(conversation) > 8_000_000
    assert parse_cost_bound_ns(conversation) <= INLINE_BUDGET_NS
    assert parse_cost_bound_ns(costly(b'{"model":"m"')) > INLINE_BUDGET_NS


@pytest.mark.parametrize(
    ("spec", "opening"),
    [
        (
            CHAT,
            b'{"stream":true,"model":"m","user":"u","metadata":{"session_id":"s","x":{"y":1}},'
            b'"stream_options":{"include_usage":true},"messages":[{"role":"system","content":'
            b'"be brief"},{"role":"user","content":"hi"},{"role":"assistant","content":"yo"}]',
        ),
        (CHAT, b'{"model":"m","prompt_cache_key":"c","user":{"a":1},"messages":[]'),
        (COMPLETIONS, b'{"model":"m","prompt":[[1,2,3],[4]],"stream":null'),
        (COMPLETIONS, b'{"model":"m","prompt":"once upon a time"'),
        (
            RESPONSES,
            b'{"model":"m","store":false,"request_id":"r","previous_response_id":"p",'
            b'"input":[{"role":"user","content":"hi"}],"model":"n"',
        ),
    ],
)
async def test_a_body_read_in_the_helper_gives_routing_what_inline_gives(
    spec: EndpointSpec, opening: bytes
) -> None:
    """Model, stream, previous id, every field routing reads, the conversation head and the
    spliced body are the same whether the body was parsed inline or in the helper."""
    raw = costly(opening)
    inline = parse_request(spec, raw)
    away = await read_request(spec, raw, HEAD_BYTES)
    assert away.data is not inline.data  # it did go to the helper
    assert (away.model, away.stream, away.previous_response_id) == (
        inline.model,
        inline.stream,
        inline.previous_response_id,
    )
    assert away.known_head == (HEAD_BYTES, stable_head(inline.data, HEAD_BYTES))
    assert away.body_for("upstream") == inline.body_for("upstream")
    assert away.body_for(inline.model or "") == raw
    _reads_alike(away, inline)


def _reads_alike(away: ClientRequest, inline: ClientRequest) -> None:
    """What the proxy reads from `data` (responses, sessions, usage) is the same."""
    from gateway.dispatch.usage import asks_for_usage
    from gateway.edge.responses import stored
    from gateway.routing.sessions import session_id_from

    assert session_id_from({}, away.data) == session_id_from({}, inline.data)
    assert asks_for_usage(away.data) == asks_for_usage(inline.data)
    assert ("stream_options" in away.data) == ("stream_options" in inline.data)
    assert away.data.get("request_id") == inline.data.get("request_id")
    assert away.data.get("prompt_cache_key") == inline.data.get("prompt_cache_key")
    assert stored(away.data) == stored(inline.data)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (costly(b'{"model":"m","messages":[1]') + b"x", "invalid_json"),
        (costly(b'{"model":"m","messages":[1]'), "invalid_type"),
        (costly(b'{"model":"m"'), "missing_field"),
        (costly(b'{"model":7,"messages":[]'), "invalid_type"),
    ],
)
async def test_a_bad_body_read_in_the_helper_gets_the_inline_400(raw: bytes, code: str) -> None:
    """A body the helper refuses gets the same 400, code and param as inline."""
    with pytest.raises(GatewayError) as inline:
        parse_request(CHAT, raw)
    with pytest.raises(GatewayError) as away:
        await read_request(CHAT, raw, HEAD_BYTES)
    assert inline.value.code == code
    assert (away.value.status, away.value.code, away.value.param, away.value.message) == (
        inline.value.status,
        inline.value.code,
        inline.value.param,
        inline.value.message,
    )


async def test_the_loop_keeps_turning_while_a_million_key_body_is_parsed() -> None:
    """While the 1.4 M-key body is parsed, other tasks on the loop run (inline, none could)."""
    raw = costly(b'{"model":"m","messages":[]')[:-1] + b","
    raw += b",".join(b'"%x":1' % index for index in range(1_400_000)) + b"}"
    ticks = 0
    parsing = asyncio.Event()

    async def other_work() -> None:
        nonlocal ticks
        await parsing.wait()
        while True:
            ticks += 1
            await asyncio.sleep(0)

    worker = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    parsing.set()
    read = await read_request(CHAT, raw, HEAD_BYTES)
    counted = ticks
    worker.cancel()
    assert read.model == "m"
    assert counted > 0
