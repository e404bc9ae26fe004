"""Refusals before parsing: while shedding, one whole plain request to a proxied route that
queued past even a light key's level is answered 503 from its raw bytes, on a kept-alive
connection; everything else is left to the parsed path."""

from __future__ import annotations

import orjson
import pytest

from gateway.edge.overload import LIGHT_LEVELS, plain_sheddable_request
from tests.unit.test_overload import LEVEL, FakeClock, gate, shedder

BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})


def request(
    line: str = "POST /v1/chat/completions HTTP/1.1", *headers: str, body: bytes = BODY
) -> bytes:
    """A request with `Content-Length` for `body`, `headers` added."""
    head = [line, "Host: g", "Authorization: Bearer sk-x", f"Content-Length: {len(BODY)}"]
    return ("\r\n".join([*head, *headers]) + "\r\n\r\n").encode() + body


@pytest.mark.parametrize(
    ("data", "plain"),
    [
        (request(), True),
        (request("POST /v1/embeddings HTTP/1.1"), True),
        (request("POST /v1/chat/%63ompletions HTTP/1.1"), False),  # the router decodes it
        (request("POST /v1/chat/completions?x=1 HTTP/1.1"), False),
        (request("POST /v1/chat/completions HTTP/1.0"), False),
        (request("GET /healthz HTTP/1.1"), False),
        (request("GET /v1/responses/resp_1 HTTP/1.1"), False),  # a pattern, not a fixed path
        (request(body=BODY[:-1]), False),  # the body has not all arrived
        (request() + request(), False),  # pipelined
        (request("POST /v1/chat/completions HTTP/1.1", "Connection: close"), False),
        (request("POST /v1/chat/completions HTTP/1.1", "Expect: 100-continue"), False),
        (request("POST /v1/chat/completions HTTP/1.1", "Transfer-Encoding: chunked"), False),
        (request("POST /v1/chat/completions HTTP/1.1", f"Content-Length: {len(BODY)}"), False),
        (request("POST /v1/chat/completions HTTP/1.1", "Bad : header"), False),
        (request().replace(b"\r\n", b"\n"), False),
    ],
)
def test_only_one_whole_plain_request_to_a_fixed_proxied_route_is_refused_unparsed(
    data: bytes, plain: bool
) -> None:
    """A request is judged from its raw bytes only when they are exactly one request to a
    proxied route with a fixed path, in the router's own spelling, framed by one
    `Content-Length`; anything else goes through aiohttp's parser and the router."""
    assert plain_sheddable_request(data) is plain


def test_a_late_plain_request_gets_a_kept_alive_openai_503_and_is_counted() -> None:
    """While overloaded, a plain request that queued past the light keys' level gets a
    complete 503 `overloaded` with Retry-After and no `Connection: close`, counted as shed."""
    overloaded = gate()
    shed = overloaded.shedder.shed
    answer = overloaded.refusal_at_once(request(), lambda: LEVEL * LIGHT_LEVELS * 1.1)
    assert answer is not None
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {name.lower(): value for name, value in (line.split(": ", 1) for line in lines[1:])}
    assert lines[0] == "HTTP/1.1 503 Service Unavailable"
    assert headers["retry-after"] == "1"
    assert headers["x-request-id"] == "r"
    assert int(headers["content-length"]) == len(body)
    assert "connection" not in headers
    assert orjson.loads(body)["error"]["code"] == "overloaded"
    assert overloaded.shedder.shed == shed + 1


def test_a_request_a_light_key_might_send_is_left_to_the_parsed_path() -> None:
    """Under the light keys' level the key decides, so the raw path refuses nothing."""
    overloaded = gate()
    shed = overloaded.shedder.shed
    assert overloaded.refusal_at_once(request(), lambda: LEVEL * LIGHT_LEVELS) is None
    assert overloaded.shedder.shed == shed


def test_a_worker_not_shedding_refuses_nothing_and_reads_no_delay() -> None:
    """Not overloaded: None, without even measuring the request's delay."""
    overloaded = gate()
    overloaded.shedder = shedder(FakeClock())

    def delay() -> float:
        raise AssertionError("the delay was read")

    assert overloaded.refusal_at_once(request(), delay) is None


def test_a_draining_worker_leaves_every_refusal_to_the_parsed_path() -> None:
    """While the worker drains (its answers close their connections), nothing is refused
    before parsing."""
    overloaded = gate()
    overloaded._draining = lambda: True
    assert overloaded.refusal_at_once(request(), lambda: LEVEL * LIGHT_LEVELS * 1.1) is None
