"""Clients that stop reading, as an attack on a real worker: past
`routing.downstream_write_timeout_seconds` they are dropped, their upstreams cancelled and their
provider permits released."""

from __future__ import annotations

import asyncio
import re
import socket
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import orjson
import pytest

from bench.launcher import GatewayProcess
from tests.e2e.test_hostile_clients import start_gateway_process
from tests.support.gateway import TEST_KEY, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

STALLED_CLIENTS = 20
WRITE_DEADLINE = 1.5
# Enough output to fill every buffer between the node and a client that reads nothing.
LONG_ANSWER_TOKENS = 100_000
LONG_WHOLE_ANSWER_TOKENS = 1_500_000
# A node in its own process that writes as fast as it is read.
UNPACED = ["--base-ttft-ms", "0", "--per-token-ms", "0", "--tokens-per-second", "0"]
TINY_RECEIVE_BUFFER = 1024
IN_FLIGHT = re.compile(r'^gateway_provider_in_flight\{provider="node-a"\} (\S+)$', re.MULTILINE)


async def provider_in_flight(gateway: GatewayProcess) -> float:
    """The gateway's own count of requests holding node-a's permits."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + "/metrics") as response,
    ):
        match = IN_FLIGHT.search(await response.text())
        return float(match.group(1)) if match else 0.0


def stalled_client(port: int, body: bytes) -> socket.socket:
    """A connection with a tiny receive buffer that sends one request and never reads."""
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, TINY_RECEIVE_BUFFER)
    client.connect(("127.0.0.1", port))
    client.sendall(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        + f"Authorization: Bearer {TEST_KEY}\r\nContent-Type: application/json\r\n".encode()
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    client.setblocking(False)
    return client


async def read_until_closed(client: socket.socket) -> None:
    """Read (without blocking the loop the simulator runs in) until the connection ends."""
    loop = asyncio.get_running_loop()
    while await asyncio.wait_for(loop.sock_recv(client, 65536), 10):
        pass


@pytest.mark.parametrize(
    ("stream", "clients", "tokens"),
    # A non-streamed answer must outgrow the kernel's buffers (about 1.7 MB per client here) to
    # stall its writer.
    [(True, STALLED_CLIENTS, LONG_ANSWER_TOKENS), (False, 4, LONG_WHOLE_ANSWER_TOKENS)],
)
async def test_clients_that_stop_reading_release_their_permits_after_the_deadline(
    exit_stack: AsyncExitStack,
    database_url: str,
    tmp_path: Path,
    stream: bool,
    clients: int,
    tokens: int,
) -> None:
    """20 stream clients that never read hold every permit of a 20-permit provider; after the
    write deadline they are dropped (reset), the node sees its requests cancelled, the permits
    are free and others are served; a non-streamed answer nobody reads is dropped the same way."""
    node = await exit_stack.enter_async_context(SimulatorProcess("node-a", UNPACED))
    config = settings_dict(
        {"node-a": node.url},
        extra={
            "database": {"url": database_url},
            "routing": {
                "downstream_write_timeout_seconds": WRITE_DEADLINE,
                "wait_timeout_seconds": 0,
                "response_timeout_seconds": 60,
                "first_byte_timeout_seconds": 60,
            },
        },
    )
    config["providers"][0]["max_concurrency"] = STALLED_CLIENTS
    gateway = await start_gateway_process(config, tmp_path)
    body = orjson.dumps(chat_body("tell me everything", max_tokens=tokens, stream=stream))
    sockets: list[socket.socket] = []
    try:
        sockets = [stalled_client(gateway.port, body) for _ in range(clients)]

        async def all_permits_held() -> bool:
            return await provider_in_flight(gateway) == STALLED_CLIENTS

        async def all_permits_released() -> bool:
            return await provider_in_flight(gateway) == 0

        async def node_idle() -> bool:
            return (await node.stats()).in_flight == 0

        async def every_client_dropped() -> bool:
            return gateway.log().count('"client_disconnected":true') == clients

        if stream:
            await wait_until(all_permits_held, timeout=20, interval=0.1, message="20 held permits")
        # Nothing is read before the gateway has given up on every client: a read would let the
        # answer through.
        await wait_until(
            every_client_dropped,
            timeout=WRITE_DEADLINE + 30,
            interval=0.1,
            message="every stalled client dropped",
        )
        await wait_until(
            all_permits_released, timeout=WRITE_DEADLINE + 20, interval=0.1, message="release"
        )
        await wait_until(node_idle, timeout=10, interval=0.1, message="the node to be idle")
        for client in sockets:
            # Dropped: the gateway reset the connection; nothing buffered for it is delivered.
            with pytest.raises(ConnectionResetError):
                await read_until_closed(client)
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gateway.url + "/v1/chat/completions",
                json=chat_body(max_tokens=2),
                headers={"Authorization": f"Bearer {TEST_KEY}"},
            ) as response,
        ):
            assert response.status == 200
        assert "Traceback" not in gateway.log()
    finally:
        for client in sockets:
            client.close()
        gateway.stop()
