"""Slow request bodies from one key as an attack: the key's limits are taken once its head is
in, so it is refused before its body is read and cannot hold every connection of a worker,
directly or through the shipped nginx."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench.launcher import GatewayProcess
from bench.nginx import NginxProcess
from gateway.config_fleet import hash_key
from gateway.dispatch.permits import ConnectionShare
from tests.conftest import SimulatorFactory
from tests.e2e.test_hostile_clients import (
    assert_openai_error,
    parse_answer,
    read_until_closed,
    start_gateway_process,
)
from tests.support.gateway import OTHER_KEY, TEST_KEY, answers, chat_body, settings_dict
from tests.support.polling import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

GatewayFactory = Callable[..., Awaitable[GatewayProcess]]

MAX_BODY_BYTES = 64 * 1024
# A declared body the attacker never finishes: large, but within `max_body_bytes`.
DECLARED_BYTES = 60_000
# The slow bodies' deadline stays far off, so no answer a test sees comes from it.
BODY_TIMEOUT = 120.0
# A refusal before the body, and the close after it, come well within this: it is neither the
# body deadline (above) nor aiohttp's 10 s of lingering over an unread body before closing.
ANSWER_WITHIN = 5.0


def slow_head(key: str, *extra: str, length: int = DECLARED_BYTES) -> bytes:
    """The head of a chat request declaring a body of `length` bytes (sent later, or never)."""
    lines = [
        "POST /v1/chat/completions HTTP/1.1",
        "Host: gateway",
        f"Authorization: Bearer {key}",
        "Content-Type: application/json",
        f"Content-Length: {length}",
        *extra,
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def config_for(
    node_url: str, database_url: str, *, max_concurrency: int | None = None, **server: Any
) -> dict[str, Any]:
    """Two keys that may use every model (team-a with `max_concurrency` when given), `server`
    settings on top."""
    keys: list[dict[str, Any]] = [
        {"id": "team-a", "key_sha256": hash_key(TEST_KEY), "models": ["*"]},
        {"id": "team-b", "key_sha256": hash_key(OTHER_KEY), "models": ["*"]},
    ]
    if max_concurrency is not None:
        keys[0]["max_concurrency"] = max_concurrency
    return settings_dict(
        {"node-a": node_url},
        extra={
            "database": {"url": database_url},
            "server": {
                "max_body_bytes": MAX_BODY_BYTES,
                "body_read_timeout_seconds": BODY_TIMEOUT,
                **server,
            },
            "keys": keys,
        },
    )


async def chat(url: str, key: str) -> int:
    """One ordinary chat completion for `key` on a fresh connection; its status."""
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            url + "/v1/chat/completions",
            data=orjson.dumps(chat_body(max_tokens=2)),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ) as response,
    ):
        await response.read()
        return response.status


async def read_answer(reader: asyncio.StreamReader) -> bytes:
    """One whole answer (head and `Content-Length` body), or what came before the connection
    closed; a proxy may keep the connection open after it, dropping the rest of the body."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as closed:
        return closed.partial
    except ConnectionError:
        return b""
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            try:
                return head + await reader.readexactly(int(value))
            except asyncio.IncompleteReadError as closed:
                return head + closed.partial
    return head + await read_until_closed(reader)


def error_code(answer: bytes) -> str:
    """The OpenAI error code of a raw answer, or what it was instead."""
    if not answer:
        return "closed without an answer"
    status, body = parse_answer(answer)
    return str(body.get("error", {}).get("code", status))


@dataclass
class SlowBody:
    """One request whose head is sent and whose body trickles (or never comes)."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answer: asyncio.Task[bytes] = field(init=False)

    def __post_init__(self) -> None:
        self.answer = asyncio.create_task(read_answer(self.reader))

    @classmethod
    async def open(cls, port: int, head: bytes, opening: bytes = b"{") -> SlowBody:
        """Connect, send the head and the first bytes of the body."""
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(head + opening)
        await writer.drain()
        return cls(reader, writer)

    def close(self) -> None:
        """Give up: close the connection."""
        self.answer.cancel()
        self.writer.close()


async def close_all(slow: list[SlowBody]) -> None:
    """Close every slow request and let their readers finish."""
    for request in slow:
        request.close()
    await asyncio.gather(*(request.answer for request in slow), return_exceptions=True)


@pytest.fixture
async def gateway_factory(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayFactory]:
    """Start `gateway serve` (one worker) before a simulator, with `config_for`'s options;
    stopped after the test."""
    started: list[GatewayProcess] = []

    async def start(**options: Any) -> GatewayProcess:
        node = await start_simulator("node-a")
        gateway = await start_gateway_process(
            config_for(node.url, database_url, **options), tmp_path
        )
        started.append(gateway)
        return gateway

    yield start
    for gateway in started:
        gateway.stop()


async def test_a_key_at_its_concurrency_limit_gets_429_without_sending_its_body(
    gateway_factory: GatewayFactory,
) -> None:
    """With `max_concurrency: 1` held by a slow body, a request declaring 60 kB and sending none
    of it is answered 429 at once and its connection closes (the body is never waited for)."""
    gateway = await gateway_factory(max_concurrency=1)
    holder = await SlowBody.open(gateway.port, slow_head(TEST_KEY))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(slow_head(TEST_KEY))
            await writer.drain()
            answer = await asyncio.wait_for(read_until_closed(reader), ANSWER_WITHIN)
        finally:
            writer.close()
        status, body = parse_answer(answer)
        assert status == 429
        assert_openai_error(body, "key_concurrency_limit")
        assert not holder.answer.done(), "the slow body holding the slot was answered"
        # Another key is not held up by this one's limit.
        assert await chat(gateway.url, OTHER_KEY) == 200
    finally:
        await close_all([holder])

    async def admitted_again() -> bool:
        return await chat(gateway.url, TEST_KEY) == 200

    await wait_until(admitted_again, timeout=10, interval=0.05, message="the slot to come back")


async def test_a_request_without_a_valid_key_gets_401_without_sending_its_body(
    gateway_factory: GatewayFactory,
) -> None:
    """A wrong key declaring 60 kB and sending none of it: 401 at once, the connection closes
    (no lingering over a body that will never be read)."""
    gateway = await gateway_factory()
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(slow_head("sk-not-a-key-0000000000"))
        await writer.drain()
        answer = await asyncio.wait_for(read_until_closed(reader), ANSWER_WITHIN)
    finally:
        writer.close()
    status, body = parse_answer(answer)
    assert status == 401
    assert_openai_error(body, "invalid_api_key")


async def test_100_continue_is_not_sent_to_a_key_at_its_concurrency_limit(
    gateway_factory: GatewayFactory,
) -> None:
    """`Expect: 100-continue` from a key at its limit: 429 and no `100 Continue`; with the slot
    free again, `100 Continue` comes and the request is served."""
    gateway = await gateway_factory(max_concurrency=1)
    holder = await SlowBody.open(gateway.port, slow_head(TEST_KEY))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            writer.write(slow_head(TEST_KEY, "Expect: 100-continue"))
            await writer.drain()
            answer = await asyncio.wait_for(read_until_closed(reader), ANSWER_WITHIN)
        finally:
            writer.close()
        assert b"100 Continue" not in answer
        status, body = parse_answer(answer)
        assert status == 429
        assert_openai_error(body, "key_concurrency_limit")
    finally:
        await close_all([holder])

    request_body = orjson.dumps(chat_body(max_tokens=2))

    async def continued_and_served() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        try:
            head = slow_head(
                TEST_KEY, "Expect: 100-continue", "Connection: close", length=len(request_body)
            )
            writer.write(head)
            await writer.drain()
            interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_WITHIN)
            if not interim.startswith(b"HTTP/1.1 100 Continue"):
                # The holder's slot is not given back yet.
                assert interim.startswith(b"HTTP/1.1 429 "), interim
                return False
            writer.write(request_body)
            await writer.drain()
            answer = await asyncio.wait_for(read_until_closed(reader), ANSWER_WITHIN)
        finally:
            writer.close()
        assert parse_answer(answer)[0] == 200, answer
        return True

    await wait_until(
        continued_and_served, timeout=10, interval=0.05, message="100 Continue and a 200"
    )


# A cap of 8: crowded at 6 requests in progress, past the key's share of 4.
HELD = 6


async def test_one_key_holds_at_most_three_quarters_of_a_workers_connections(
    gateway_factory: GatewayFactory,
) -> None:
    """`max_connections_per_worker: 8` with a share of 0.5: a key may use the uncrowded worker up
    to three quarters of the cap, so its seventh slow body gets 429 `key_connection_share` at
    once, while another key is served; the key is served again once its slow bodies are gone."""
    gateway = await gateway_factory(max_connections_per_worker=8, max_connection_share_per_key=0.5)
    held: list[SlowBody] = []
    try:
        for _ in range(HELD):
            held.append(await SlowBody.open(gateway.port, slow_head(TEST_KEY)))

        # Heads on different connections are not read in a fixed order: a probe may be read
        # before the last of the six and admitted in its place (that one then gets the 429).
        # So the probe is kept as one of the key's slow bodies when it is admitted, an answered
        # one is dropped, and the probe is repeated until six are held and a seventh is refused.
        async def seventh_refused() -> bool:
            held[:] = [request for request in held if not request.answer.done()]
            while len(held) < HELD:
                held.append(await SlowBody.open(gateway.port, slow_head(TEST_KEY)))
            probe = await SlowBody.open(gateway.port, slow_head(TEST_KEY))
            try:
                answer = await asyncio.wait_for(asyncio.shield(probe.answer), 1.0)
            except TimeoutError:
                held.append(probe)  # admitted: one of the four was not counted yet
                return False
            probe.close()
            status, body = parse_answer(answer)
            assert status == 429
            assert_openai_error(body, "key_connection_share")
            return True

        await wait_until(seventh_refused, timeout=15, interval=0.05, message="a seventh refused")
        assert not any(request.answer.done() for request in held)
        assert await chat(gateway.url, OTHER_KEY) == 200
    finally:
        await close_all(held)

    async def served_again() -> bool:
        return await chat(gateway.url, TEST_KEY) == 200

    await wait_until(served_again, timeout=10, interval=0.05, message="the key served again")


# The acceptance test: 2,000 slow bodies from one key through the shipped nginx.
ATTACKERS = 2000
# Two replicas of one worker each, as the shipped config's two `server` lines (max_fails=1).
ATTACK_REPLICAS = 2
# Small enough that the attack would take every connection of both workers without the share.
ATTACK_CONNECTIONS_PER_WORKER = 400
ATTACK_SHARE = 0.5
# Connections opened at once: within nginx's accept backlog (511 by default on Linux).
OPENING_BATCH = 100
OTHER_KEY_REQUESTS = 20


async def test_two_thousand_slow_bodies_from_one_key_leave_another_key_served_through_nginx(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path
) -> None:
    """2,000 trickling request bodies from one key, through the shipped nginx, before two
    replicas capped at 400 connections each: the key holds at most three quarters of each (past
    that the worker is crowded and the key past its share of half), the rest of its requests get
    429 before their body, and another key's requests all get 200."""
    node = await start_simulator("node-a")
    config = config_for(
        node.url,
        database_url,
        max_connections_per_worker=ATTACK_CONNECTIONS_PER_WORKER,
        max_connection_share_per_key=ATTACK_SHARE,
    )
    replicas = []
    for number in range(ATTACK_REPLICAS):
        directory = tmp_path / f"gateway-{number}"
        directory.mkdir()
        replicas.append(GatewayProcess(config, directory))
    nginx = NginxProcess([replica.port for replica in replicas], tmp_path / "nginx")
    attackers: list[SlowBody] = []
    trickling: asyncio.Task[None] | None = None
    try:
        for replica in replicas:
            replica.start()
        async with aiohttp.ClientSession() as session:
            for replica in replicas:
                await wait_until(
                    lambda: answers(session, replica.url),  # noqa: B023 - awaited right here
                    timeout=30,
                    interval=0.1,
                    message="a replica to answer",
                )
        nginx.start()

        for _ in range(ATTACKERS // OPENING_BATCH):
            attackers += await asyncio.gather(
                *(SlowBody.open(nginx.port, slow_head(TEST_KEY)) for _ in range(OPENING_BATCH))
            )

        async def trickle() -> None:
            while True:
                for attacker in attackers:
                    if not attacker.answer.done():
                        attacker.writer.write(b" ")
                await asyncio.sleep(1.0)  # the attackers' pace, not a wait

        trickling = asyncio.create_task(trickle())
        # The key may fill each replica up to the crowding point (above its share); everything
        # past it is refused.
        share = ConnectionShare.of(ATTACK_CONNECTIONS_PER_WORKER, ATTACK_SHARE)
        held = ATTACK_REPLICAS * max(share.per_key, share.crowded)

        def answered() -> int:
            return sum(attacker.answer.done() for attacker in attackers)

        await wait_until(
            lambda: answered() >= ATTACKERS - held,
            timeout=60,
            interval=0.1,
            message="the attack to take its hold: every request past the key's share refused",
        )
        statuses = [await chat(nginx.url, OTHER_KEY) for _ in range(OTHER_KEY_REQUESTS)]
        assert statuses == [200] * OTHER_KEY_REQUESTS

        # Each refusal was the key's share, answered before its body; the rest are still held.
        refusals = Counter(
            error_code(attacker.answer.result()) for attacker in attackers if attacker.answer.done()
        )
        assert refusals == {"key_connection_share": ATTACKERS - held}, refusals
    finally:
        if trickling is not None:
            trickling.cancel()
            await asyncio.gather(trickling, return_exceptions=True)
        await close_all(attackers)
        nginx.stop()
        for replica in replicas:
            replica.stop()
