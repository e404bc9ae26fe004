"""Stored responses as a hostile tenant would use them, against a real `gateway serve`: another
key's response id cannot be taken over (vLLM, like the simulator, takes a client's `request_id`
as the new response's id), and one key cannot grow the response table without bound."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from bench.launcher import GatewayProcess
from tests.conftest import SimulatorFactory
from tests.e2e.test_hostile_clients import start_gateway_process
from tests.support.gateway import OTHER_KEY, TEST_KEY, settings_dict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

MODEL = "other-model"  # both test keys may use it
MAX_PER_KEY = 3


@pytest.fixture
async def gateway(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """`gateway serve` before one simulated vLLM node, keeping 3 stored responses per key."""
    node = await start_simulator("node-a")
    config = settings_dict(
        {"node-a": node.url},
        extra={
            "database": {"url": database_url},
            "affinity": {"responses_max_per_key": MAX_PER_KEY},
        },
    )
    process = await start_gateway_process(config, tmp_path)
    yield process
    process.stop()


async def call(
    session: aiohttp.ClientSession,
    gateway: GatewayProcess,
    method: str,
    path: str,
    key: str,
    body: dict[str, Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """One request with `key`; its status and JSON body."""
    async with session.request(
        method, gateway.url + path, json=body, headers={"Authorization": f"Bearer {key}"}
    ) as response:
        return response.status, await response.json()


def create(**fields: Any) -> dict[str, Any]:
    """A `POST /v1/responses` body."""
    return {"model": MODEL, "input": "Remember the number 7.", **fields}


async def stored_rows(database_url: str, key_id: str) -> int:
    """How many response bindings the key has in the store."""
    connection = await asyncpg.connect(database_url)
    try:
        count: int = await connection.fetchval(
            "SELECT count(*) FROM response_bindings WHERE api_key_id = $1", key_id
        )
    finally:
        await connection.close()
    return count


@pytest.mark.parametrize("store", [False, True])
async def test_another_key_cannot_take_over_a_response_id(
    gateway: GatewayProcess, store: bool
) -> None:
    """Key B sends key A's response id as its `request_id`: 409 `response_id_in_use`; B's GET,
    DELETE and `previous_response_id` on it are 404; A still reads and continues it."""
    async with aiohttp.ClientSession() as session:
        status, created = await call(session, gateway, "POST", "/v1/responses", TEST_KEY, create())
        assert status == 200
        victim = created["id"]
        path = f"/v1/responses/{victim}"

        status, taken = await call(
            session,
            gateway,
            "POST",
            "/v1/responses",
            OTHER_KEY,
            create(request_id=victim, store=store, input="Now it is mine."),
        )
        assert status == 409
        assert taken["error"]["code"] == "response_id_in_use"
        assert taken["error"]["param"] == "request_id"

        for method, body in (
            ("GET", None),
            ("POST", create(previous_response_id=victim)),
            ("DELETE", None),
        ):
            where = path if method != "POST" else "/v1/responses"
            status, refused = await call(session, gateway, method, where, OTHER_KEY, body)
            assert status == 404, (method, refused)
            assert refused["error"]["code"] == "response_not_found"

        status, read = await call(session, gateway, "GET", path, TEST_KEY)
        assert status == 200
        assert read["output"] == created["output"]
        status, _ = await call(
            session,
            gateway,
            "POST",
            "/v1/responses",
            TEST_KEY,
            create(previous_response_id=victim),
        )
        assert status == 200


async def test_a_key_chosen_id_of_its_own_is_kept(gateway: GatewayProcess) -> None:
    """A key may choose its own response ids: a fresh `request_id` becomes the stored id, and
    the key reads it back."""
    async with aiohttp.ClientSession() as session:
        status, created = await call(
            session, gateway, "POST", "/v1/responses", OTHER_KEY, create(request_id="resp_mine")
        )
        assert status == 200
        assert created["id"] == "resp_mine"
        status, _ = await call(session, gateway, "GET", "/v1/responses/resp_mine", OTHER_KEY)
        assert status == 200


async def test_unstored_responses_write_no_row_and_stored_ones_are_capped(
    gateway: GatewayProcess, database_url: str
) -> None:
    """Twenty `store: false` responses leave no row; past `responses_max_per_key` each stored
    response evicts the key's oldest, so the key's rows stay at the cap."""
    async with aiohttp.ClientSession() as session:
        for _ in range(20):
            status, _ = await call(
                session, gateway, "POST", "/v1/responses", TEST_KEY, create(store=False)
            )
            assert status == 200
        assert await stored_rows(database_url, "team-a") == 0

        ids = []
        for _ in range(MAX_PER_KEY + 2):
            status, created = await call(
                session, gateway, "POST", "/v1/responses", TEST_KEY, create()
            )
            assert status == 200
            ids.append(created["id"])
        assert await stored_rows(database_url, "team-a") == MAX_PER_KEY
        found = [
            (await call(session, gateway, "GET", f"/v1/responses/{each}", TEST_KEY))[0]
            for each in ids
        ]
        assert found == [404, 404, 200, 200, 200]


async def test_a_store_that_is_not_a_boolean_is_a_400(gateway: GatewayProcess) -> None:
    """`store: "no"` is a clear 400 naming the field, never guessed at."""
    async with aiohttp.ClientSession() as session:
        status, body = await call(
            session, gateway, "POST", "/v1/responses", TEST_KEY, create(store="no")
        )
    assert status == 400
    assert body["error"]["param"] == "store"


async def test_an_answer_naming_another_keys_response_is_refused(
    exit_stack: AsyncExitStack, database_url: str, tmp_path: Path
) -> None:
    """An upstream that gives every new response the same id (one that chose the id some other
    way than `request_id`): the second key's answer is a 409, not recorded over the first
    key's, and the first key still finds its response."""

    async def same_id(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"id": "resp_fixed", "object": "response", "output": []})

    app = web.Application()
    app.router.add_post("/v1/responses", same_id)
    upstream = TestServer(app, host="127.0.0.1")
    await upstream.start_server()
    exit_stack.push_async_callback(upstream.close)
    config = settings_dict(
        {"fixed": str(upstream.make_url("")).rstrip("/")},
        extra={"database": {"url": database_url}},
    )
    gateway = await start_gateway_process(config, tmp_path)
    exit_stack.callback(gateway.stop)
    async with aiohttp.ClientSession() as session:
        status, _ = await call(session, gateway, "POST", "/v1/responses", TEST_KEY, create())
        assert status == 200
        status, refused = await call(session, gateway, "POST", "/v1/responses", OTHER_KEY, create())
        assert status == 409
        assert refused["error"]["code"] == "response_id_in_use"
    assert await stored_rows(database_url, "team-a") == 1
    assert await stored_rows(database_url, "team-b") == 0
