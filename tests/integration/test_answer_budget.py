"""The worker's memory budget for non-streamed answers, attacked with answers that pile up."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

import aiohttp
import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.config import Settings
from gateway.operations.app_keys import RUNTIME
from tests.conftest import GatewayFactory
from tests.support.gateway import TEST_KEY, UPSTREAM_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until

BUDGET = 256 * 1024
# Each answer is three quarters of the budget: two cannot be held at once.
PADDING = b"x" * (BUDGET * 3 // 4)


async def upstream_holding_its_first_answer(
    exit_stack: AsyncExitStack, release: asyncio.Event
) -> str:
    """A real upstream whose answers are each 3/4 of the budget; the first one stops just
    before its end until `release`."""
    answered = 0

    async def answer(request: web.Request) -> web.StreamResponse:
        nonlocal answered
        answered += 1
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(request)
        head = orjson.dumps({"id": "c", "object": "chat.completion", "model": UPSTREAM_MODEL})
        await response.write(head[:-1] + b', "padding": "' + PADDING)
        if answered == 1:
            await release.wait()
        await response.write(b'"}')
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", answer)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    exit_stack.push_async_callback(server.close)
    return str(server.make_url("")).rstrip("/")


async def chat(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, object]]:
    """One non-streamed chat request; status and JSON answer."""
    async with session.post(
        url + "/v1/chat/completions",
        json=chat_body(),
        headers={"Authorization": f"Bearer {TEST_KEY}"},
    ) as response:
        return response.status, orjson.loads(await response.read())


async def test_answers_over_the_workers_budget_wait_then_get_503(
    exit_stack: AsyncExitStack, start_gateway: GatewayFactory
) -> None:
    """While one answer holds 3/4 of the budget, another 3/4 waits, then gets 503
    `answer_memory_busy`; once the first is sent, the budget is free and answers flow again."""
    release = asyncio.Event()
    url = await upstream_holding_its_first_answer(exit_stack, release)
    config = settings_dict(
        {"node-a": url},
        extra={
            "server": {"memory_budget_bytes": BUDGET, "memory_share_per_key": 1.0},
            "routing": {"wait_timeout_seconds": 0.3},
        },
    )
    server = await start_gateway(Settings.model_validate(config))
    gateway = str(server.make_url("")).rstrip("/")
    assert server.app is not None
    budget = server.app[RUNTIME].proxy.memory_budget
    assert budget is not None

    async def first_answer_held() -> bool:
        return budget.held_for("answer") >= len(PADDING)

    async with aiohttp.ClientSession() as session:
        first = asyncio.create_task(chat(session, gateway))
        await wait_until(first_answer_held, timeout=5, message="the first answer to be held")
        status, answer = await chat(session, gateway)
        assert status == 503
        assert answer["error"]["code"] == "answer_memory_busy"  # type: ignore[index]
        release.set()
        status, _ = await first
        assert status == 200
        assert budget.held == 0
        status, _ = await chat(session, gateway)
        assert status == 200
        assert budget.held == 0
