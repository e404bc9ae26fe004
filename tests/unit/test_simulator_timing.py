"""The simulator's latency model, prefix-cache savings and sequence bound, seen from a client."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from gateway.simulator import Faults, Timing
from gateway.simulator.prompts import MESSAGE_FRAMING_TOKENS, text_tokens
from tests.support.polling import wait_until
from tests.support.simulators import InProcessSimulator

SYSTEM = {"role": "system", "content": "You are a careful assistant. " * 20}


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """A plain HTTP client."""
    async with aiohttp.ClientSession() as client:
        yield client


async def chat(
    session: aiohttp.ClientSession,
    node: InProcessSimulator,
    messages: list[dict[str, str]],
    **extra: Any,
) -> dict[str, Any]:
    """Send a chat completion and return its JSON body."""
    payload = {"model": "m", "messages": messages, "max_tokens": 2, **extra}
    async with session.post(f"{node.url}/v1/chat/completions", json=payload) as response:
        assert response.status == 200
        body: dict[str, Any] = await response.json()
        return body


async def timed_chat(
    session: aiohttp.ClientSession, node: InProcessSimulator, messages: list[dict[str, str]]
) -> tuple[float, int]:
    """Seconds until the answer of a one-token chat, and its cached prompt tokens."""
    started = time.monotonic()
    body = await chat(session, node, messages, max_tokens=1)
    return time.monotonic() - started, body["usage"]["prompt_tokens_details"]["cached_tokens"]


async def test_a_cached_prefix_cuts_time_to_first_token(session: aiohttp.ClientSession) -> None:
    """A repeated long prefix is served from cache, so its TTFT drops by the per-token cost."""
    timing = Timing(base_ttft_ms=0.0, per_token_ms=2.0, tokens_per_second=0.0)
    async with InProcessSimulator("n", timing=timing) as node:
        cold, cold_cached = await timed_chat(
            session, node, [SYSTEM, {"role": "user", "content": "a"}]
        )
        warm, warm_cached = await timed_chat(
            session, node, [SYSTEM, {"role": "user", "content": "b"}]
        )
    assert cold_cached == 0
    assert warm_cached > 100
    assert cold >= 0.002 * 150
    assert warm < cold / 2


async def test_conversation_turns_find_earlier_turns_and_replies_cached(
    session: aiohttp.ClientSession,
) -> None:
    """Each turn repeats the last one plus the reply, so only the new message is uncached."""
    async with InProcessSimulator("n") as node:
        messages = [SYSTEM, {"role": "user", "content": "first question"}]
        first = await chat(session, node, messages)
        reply = first["choices"][0]["message"]["content"]
        messages += [{"role": "assistant", "content": reply}, {"role": "user", "content": "next"}]
        second = await chat(session, node, messages)
        stats = await node.stats()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    reply_tokens = MESSAGE_FRAMING_TOKENS + text_tokens(reply)
    assert cached == first["usage"]["prompt_tokens"] + reply_tokens
    assert stats.prefix_cache_hits == cached
    assert (
        stats.prefix_cache_queries
        == first["usage"]["prompt_tokens"] + second["usage"]["prompt_tokens"]
    )


async def test_slow_multiplies_time_to_first_token(session: aiohttp.ClientSession) -> None:
    """With slow=5 a 40 ms base TTFT takes at least 200 ms."""
    timing = Timing(base_ttft_ms=40.0, per_token_ms=0.0, tokens_per_second=0.0)
    async with InProcessSimulator("n", timing=timing, faults=Faults(slow=5.0)) as node:
        started = time.monotonic()
        await chat(session, node, [{"role": "user", "content": "x"}])
        assert time.monotonic() - started >= 0.2


async def test_the_first_chunk_leaves_before_generation_finishes(
    session: aiohttp.ClientSession,
) -> None:
    """Streamed tokens are sent as they are produced, not after the last one."""
    timing = Timing(base_ttft_ms=0.0, per_token_ms=0.0, tokens_per_second=20.0)
    async with InProcessSimulator("n", timing=timing) as node:
        payload = {"model": "m", "messages": [SYSTEM], "max_tokens": 6, "stream": True}
        async with session.post(f"{node.url}/v1/chat/completions", json=payload) as response:
            await response.content.readuntil(b"\n\n")
            first_chunk_at = time.monotonic()
            await response.read()
        record = (await node.stats()).last_request()
    assert record.generation_finished_at is not None
    assert first_chunk_at < record.generation_finished_at
    assert record.generation_finished_at - record.received_at >= 5 / 20.0


async def test_sequences_beyond_max_num_seqs_wait_in_a_queue(
    session: aiohttp.ClientSession,
) -> None:
    """With two slots and five requests held, two run and three wait until released."""
    timing = Timing(base_ttft_ms=0.0, per_token_ms=0.0, tokens_per_second=0.0, max_num_seqs=2)
    async with InProcessSimulator("n", timing=timing, faults=Faults(hold=True)) as node:
        requests = [
            asyncio.create_task(chat(session, node, [{"role": "user", "content": str(number)}]))
            for number in range(5)
        ]

        async def queued() -> bool:
            stats = await node.stats()
            return (stats.running, stats.waiting, stats.in_flight) == (2, 3, 5)

        await wait_until(queued, message="two running and three waiting")
        async with session.get(f"{node.url}/metrics") as response:
            metrics = await response.text()
        await node.set_faults(hold=False)
        await asyncio.gather(*requests)
        stats = await node.stats()
    assert 'vllm:num_requests_running{engine="0",model_name="any"} 2.0' in metrics
    assert 'vllm:num_requests_waiting{engine="0",model_name="any"} 3.0' in metrics
    assert (stats.completed, stats.peak_running, stats.peak_in_flight) == (5, 2, 5)
    assert (stats.running, stats.waiting, stats.in_flight) == (0, 0, 0)
