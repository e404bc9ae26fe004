"""Fault flags of the simulator, set at start or at run time through `/sim/faults`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway.simulator import Faults, Mode
from tests.support.polling import wait_until
from tests.support.simulators import InProcessSimulator

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
STREAM = CHAT | {"stream": True}


@pytest.fixture
async def node() -> AsyncIterator[InProcessSimulator]:
    """One instant, healthy node."""
    async with InProcessSimulator("node-f") as simulator:
        yield simulator


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client."""
    async with aiohttp.ClientSession() as client:
        yield client


async def post_faults(
    session: aiohttp.ClientSession, node: InProcessSimulator, changes: dict[str, Any]
) -> tuple[int, dict[str, Any]]:
    """`POST /sim/faults` and return the status and JSON body."""
    async with session.post(f"{node.url}/sim/faults", json=changes) as response:
        body: dict[str, Any] = await response.json()
        return response.status, body


async def test_faults_are_updated_partially_and_shown(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """A POST changes only the named faults; GET shows the faults in force."""
    await post_faults(session, node, {"slow": 2.5})
    status, body = await post_faults(session, node, {"extra_waiting": 3, "mode": "invalid_json"})
    async with session.get(f"{node.url}/sim/faults") as response:
        shown = await response.json()
    assert status == 200
    assert shown == body
    assert (shown["slow"], shown["extra_waiting"], shown["mode"]) == (2.5, 3, "invalid_json")


@pytest.mark.parametrize(
    "changes",
    [{"slow": -1}, {"error_rate": 2}, {"mode": "chaos"}, {"nonsense": 1}, {"hold": "yes"}],
)
async def test_invalid_fault_updates_are_rejected_and_change_nothing(
    node: InProcessSimulator, session: aiohttp.ClientSession, changes: dict[str, Any]
) -> None:
    """Out-of-range values and unknown faults are answered 400 and leave the faults alone."""
    status, body = await post_faults(session, node, {"extra_waiting": 1, **changes})
    async with session.get(f"{node.url}/sim/faults") as response:
        shown = await response.json()
    assert status == 400
    assert "error" in body
    assert shown == Faults().to_json()


async def test_error_rate_one_answers_every_request_with_an_openai_500(
    node: InProcessSimulator,
) -> None:
    """At error_rate 1 the SDK sees an InternalServerError with an OpenAI error body."""
    await node.set_faults(error_rate=1.0)
    client = openai.AsyncOpenAI(base_url=f"{node.url}/v1", api_key="x", max_retries=0)
    async with client:
        with pytest.raises(openai.InternalServerError) as caught:
            await client.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}]
            )
    assert caught.value.status_code == 500
    assert (await node.stats()).outcomes == {"error": 1}


async def test_a_partial_error_rate_fails_some_requests_and_serves_others(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """At error_rate 0.5, forty requests see both 200 and 500 answers."""
    await node.set_faults(error_rate=0.5)
    statuses = set()
    for _ in range(40):
        async with session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response:
            statuses.add(response.status)
    assert statuses == {200, 500}


async def test_error_on_text_fails_only_the_requests_that_carry_it(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """With error_on_text set, a request holding the text gets 500; the others are served."""
    await post_faults(session, node, {"error_on_text": "POISON"})
    poisoned = CHAT | {"messages": [{"role": "user", "content": "hi POISON"}]}
    async with session.post(f"{node.url}/v1/chat/completions", json=poisoned) as response:
        assert response.status == 500
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
    status, _ = await post_faults(session, node, {"error_on_text": 5})
    assert status == 400


async def test_rate_limit_answers_429_with_retry_after(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """With rate_limit_retry_after set, every request gets 429, Retry-After and an error body."""
    await post_faults(session, node, {"rate_limit_retry_after": 7})
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response:
        status, retry_after = response.status, response.headers["Retry-After"]
        error = (await response.json())["error"]
    assert (status, retry_after) == (429, "7")
    assert error["type"] == "rate_limit_error"
    await post_faults(session, node, {"rate_limit_retry_after": None})
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200


async def test_drop_after_chunks_aborts_the_stream_after_that_many_events(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """The client gets exactly N events, then the connection ends without the stream's end."""
    await node.set_faults(drop_after_chunks=2)
    pieces: list[bytes] = []

    async def read_all(response: aiohttp.ClientResponse) -> None:
        async for piece in response.content.iter_any():
            pieces.append(piece)

    async with session.post(f"{node.url}/v1/chat/completions", json=STREAM) as response:
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all(response)
    received = b"".join(pieces)
    assert received.count(b"data: ") == 2
    assert b"[DONE]" not in received
    assert (await node.stats()).outcomes == {"dropped": 1}


async def test_drop_after_chunks_leaves_non_streaming_answers_alone(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """Only streams are dropped; a whole answer still arrives."""
    await node.set_faults(drop_after_chunks=0)
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response:
        assert response.status == 200
        assert (await response.json())["object"] == "chat.completion"


async def test_extra_waiting_is_added_to_the_reported_queue(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """`extra_waiting` fakes load in `vllm:num_requests_waiting` only."""
    await node.set_faults(extra_waiting=5)
    async with session.get(f"{node.url}/metrics") as response:
        text = await response.text()
    assert 'vllm:num_requests_waiting{engine="0",model_name="any"} 5.0' in text
    assert (await node.stats()).waiting == 0


async def test_refuse_seconds_refuses_connections_then_listens_again_on_the_same_port(
    node: InProcessSimulator,
) -> None:
    """The control call answers 200, then new and pooled connections fail until the pause ends."""
    async with aiohttp.ClientSession() as pooled, aiohttp.ClientSession() as control:
        async with pooled.get(f"{node.url}/v1/models") as response:
            assert response.status == 200
        status, _ = await post_faults(control, node, {"refuse_seconds": 0.5})
        assert status == 200
        with pytest.raises(aiohttp.ClientConnectionError):
            async with pooled.get(f"{node.url}/v1/models"):
                pass

        async def answers() -> bool:
            try:
                async with pooled.get(f"{node.url}/v1/models") as response:
                    return response.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(answers, timeout=5.0, interval=0.05, message="the node listening again")


async def test_hold_keeps_requests_in_flight_until_released(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """Held requests stay in flight with no answer; releasing the hold completes them."""
    await node.set_faults(hold=True)

    async def request() -> int:
        async with session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response:
            return response.status

    pending = [asyncio.create_task(request()) for _ in range(3)]

    async def all_in_flight() -> bool:
        return (await node.stats()).in_flight == 3

    await wait_until(all_in_flight, message="three held requests")
    assert not any(task.done() for task in pending)
    await node.set_faults(hold=False)
    assert await asyncio.gather(*pending) == [200, 200, 200]


@pytest.mark.parametrize("stream", [False, True])
async def test_invalid_json_mode_sends_bodies_that_do_not_parse(
    node: InProcessSimulator, session: aiohttp.ClientSession, stream: bool
) -> None:
    """In invalid_json mode the status and content type look right but the JSON is broken."""
    await node.set_faults(mode="invalid_json")
    async with session.post(
        f"{node.url}/v1/chat/completions", json=STREAM if stream else CHAT
    ) as response:
        status, content_type, body = response.status, response.content_type, await response.read()
    assert status == 200
    assert content_type == ("text/event-stream" if stream else "application/json")
    payload = body.split(b"\n\n")[0].removeprefix(b"data: ")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(payload)


async def test_wrong_content_type_mode_answers_html(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """In wrong_content_type mode a completion is answered with an HTML page."""
    await node.set_faults(mode=Mode.WRONG_CONTENT_TYPE.value)
    async with session.post(f"{node.url}/v1/chat/completions", json=STREAM) as response:
        assert (response.status, response.content_type) == (200, "text/html")
        assert (await response.read()).startswith(b"<html>")


async def test_malformed_sse_mode_breaks_event_framing(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """In malformed_sse mode the event stream has field-less lines and never ends properly."""
    await node.set_faults(mode="malformed_sse")
    async with session.post(f"{node.url}/v1/chat/completions", json=STREAM) as response:
        assert response.content_type == "text/event-stream"
        body = await response.read()
    lines = body.split(b"\n")
    assert any(line and b":" not in line for line in lines)
    assert b"[DONE]" not in body


async def test_endless_body_mode_never_ends_and_counts_the_disconnect(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """In endless_body mode the body keeps coming; when the client leaves, it is cancelled."""
    await node.set_faults(mode="endless_body")
    received = 0
    async with session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response:
        async for piece in response.content.iter_any():
            received += len(piece)
            if received > 2**21:
                break
        response.close()

    async def cancelled() -> bool:
        return (await node.stats()).cancelled == 1

    await wait_until(cancelled, message="the endless answer cancelled")


async def test_hang_after_headers_mode_sends_headers_and_then_nothing(
    node: InProcessSimulator, session: aiohttp.ClientSession
) -> None:
    """In hang_after_headers mode the status line arrives but no body byte follows."""
    await node.set_faults(mode="hang_after_headers")
    async with session.post(f"{node.url}/v1/chat/completions", json=STREAM) as response:
        assert response.status == 200
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await response.content.read(1)
        response.close()

    async def cancelled() -> bool:
        return (await node.stats()).cancelled == 1

    await wait_until(cancelled, message="the hanging answer cancelled")


async def test_faults_given_at_start_are_in_force(session: aiohttp.ClientSession) -> None:
    """Faults passed when the node starts apply to its first request."""
    faults = Faults(rate_limit_retry_after=1)
    async with (
        InProcessSimulator("n", faults=faults) as node,
        session.post(f"{node.url}/v1/chat/completions", json=CHAT) as response,
    ):
        assert response.status == 429
