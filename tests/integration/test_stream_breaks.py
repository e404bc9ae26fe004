"""A stream whose upstream broke mid-way: directly and through the gateway, clients see the
failure — an HTTP client an incomplete transfer, the OpenAI SDK an `APIConnectionError` — and
the gateway's error line is the last thing in the bytes."""

from __future__ import annotations

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.conformance import Target, post_until_broken, sse_payloads
from tests.support.gateway import TEST_KEY, TEST_MODEL, UPSTREAM_MODEL, build_settings

MESSAGES: list[ChatCompletionMessageParam] = [{"role": "user", "content": "Tell me a long story."}]


async def read_stream(target: Target) -> tuple[bytes, bool]:
    """A streamed chat's raw body, as far as it came, and whether its transfer broke."""
    body = orjson.dumps(
        {"model": target.model, "messages": MESSAGES, "stream": True, "max_tokens": 10}
    )
    headers = {"Authorization": f"Bearer {target.api_key}"}
    status, _, received, broken = await post_until_broken(
        target.base_url + "/chat/completions", body, headers
    )
    assert status == 200
    return received, broken


@pytest.fixture
async def targets(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> tuple[Target, Target]:
    """A node that drops every stream after three chunks, directly and behind the gateway."""
    node = await start_simulator("node-a")
    await node.set_faults(drop_after_chunks=3)
    server = await start_gateway(build_settings({"node-a": node.url}))
    direct = Target("direct", node.url, UPSTREAM_MODEL, "unused")
    return direct, Target("gateway", str(server.make_url("")).rstrip("/"), TEST_MODEL, TEST_KEY)


async def test_an_http_client_sees_a_broken_transfer_both_ways(
    targets: tuple[Target, Target],
) -> None:
    """The chunks already sent arrive, then the transfer breaks (no chunked end), directly and
    through the gateway; through the gateway the last line is the error, left unterminated so
    no SSE parser takes it for an event of the answer."""
    direct, gateway = targets
    direct_body, direct_broken = await read_stream(direct)
    gateway_body, gateway_broken = await read_stream(gateway)
    assert direct_broken
    assert gateway_broken
    events = sse_payloads(gateway_body)
    assert len(events) == len(sse_payloads(direct_body)) + 1
    assert events[-1]["error"]["code"] == "upstream_dropped"
    assert gateway_body.endswith(b"}\n")
    assert not gateway_body.endswith(b"\n\n")
    assert all(event["object"] == "chat.completion.chunk" for event in events[:-1])


async def test_the_sdk_raises_on_a_broken_stream_both_ways(targets: tuple[Target, Target]) -> None:
    """The OpenAI SDK's stream yields the chunks that arrived and then raises
    `APIConnectionError` (what retry logic keys on), directly and through the gateway."""
    raised = []
    for target in targets:
        async with openai.AsyncOpenAI(
            base_url=target.base_url, api_key=target.api_key, max_retries=0
        ) as client:
            stream = await client.chat.completions.create(
                model=target.model, messages=MESSAGES, stream=True, max_tokens=10
            )
            chunks: list[ChatCompletionChunk] = []
            with pytest.raises(openai.APIError) as error:
                await _collect(stream, chunks)
            raised.append((len(chunks), type(error.value)))
    assert raised[0] == raised[1] == (3, openai.APIConnectionError)


async def _collect(
    stream: openai.AsyncStream[ChatCompletionChunk], into: list[ChatCompletionChunk]
) -> None:
    """Read the stream's chunks into `into` until it ends or raises."""
    async for chunk in stream:
        into.append(chunk)
