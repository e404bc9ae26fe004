"""The real `openai` SDK, sync and async, completes chats, streams and legacy completions."""

from __future__ import annotations

import asyncio
import time

import openai
from aiohttp.test_utils import TestServer

from gateway.simulator import Timing
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, build_settings
from tests.support.simulators import InProcessSimulator

MESSAGES: list[openai.types.chat.ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me about prefix caches."}
]


def base_url(server: TestServer) -> str:
    """The gateway's OpenAI base URL."""
    return str(server.make_url("/v1"))


async def test_async_client_completes_a_chat(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """An async chat completion comes back whole, naming the provider that served it."""
    node, server = one_node
    async with openai.AsyncOpenAI(base_url=base_url(server), api_key=TEST_KEY) as client:
        raw = await client.chat.completions.with_raw_response.create(
            model=TEST_MODEL, messages=MESSAGES
        )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None
    assert completion.usage.completion_tokens > 0
    assert raw.headers["x-gateway-provider"] == "node-a"
    assert raw.headers["x-request-id"]
    assert (await node.stats()).completed == 1


async def test_sync_client_completes_a_chat_and_a_legacy_completion(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """The blocking client works too (run in a thread so the in-process servers keep running)."""
    _, server = one_node

    def call() -> tuple[str | None, str]:
        with openai.OpenAI(base_url=base_url(server), api_key=TEST_KEY) as client:
            chat = client.chat.completions.create(model=TEST_MODEL, messages=MESSAGES)
            legacy = client.completions.create(model=TEST_MODEL, prompt="Once upon a time")
        return chat.choices[0].message.content, legacy.choices[0].text

    chat_text, legacy_text = await asyncio.to_thread(call)
    assert chat_text
    assert legacy_text


async def test_async_client_completes_a_legacy_completion(
    one_node: tuple[InProcessSimulator, TestServer],
) -> None:
    """A legacy `/v1/completions` request is proxied to the same endpoint upstream."""
    node, server = one_node
    async with openai.AsyncOpenAI(base_url=base_url(server), api_key=TEST_KEY) as client:
        completion = await client.completions.create(model=TEST_MODEL, prompt="Once upon a time")
    assert completion.choices[0].text
    assert (await node.stats()).last_request().path == "/v1/completions"


async def test_streamed_chat_reaches_the_client_before_generation_ends(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """The first streamed chunk arrives while the node is still generating: nothing is buffered."""
    slow = Timing(base_ttft_ms=0, per_token_ms=0, tokens_per_second=40, max_num_seqs=8)
    node = await start_simulator("node-a", timing=slow)
    server = await start_gateway(build_settings({"node-a": node.url}))
    received_at: list[float] = []
    pieces: list[str] = []
    async with openai.AsyncOpenAI(base_url=base_url(server), api_key=TEST_KEY) as client:
        stream = await client.chat.completions.create(
            model=TEST_MODEL, messages=MESSAGES, stream=True, max_tokens=20
        )
        async for chunk in stream:
            received_at.append(time.monotonic())
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
    recorded = (await node.stats()).last_request()
    assert recorded.generation_finished_at is not None
    assert received_at[0] < recorded.generation_finished_at
    assert len(pieces) >= 10
    assert recorded.outcome == "completed"
