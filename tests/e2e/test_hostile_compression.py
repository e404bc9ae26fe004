"""Compressed request bodies as an attack: a gzip bomb costs a real worker nothing, directly and
through the shipped nginx; refused by default, decoded within limits when enabled."""

from __future__ import annotations

import asyncio
import gzip
import os
import zlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from bench.launcher import GatewayProcess
from bench.nginx import NginxProcess
from tests.conftest import SimulatorFactory
from tests.e2e.test_hostile_clients import assert_openai_error, start_gateway_process
from tests.support.gateway import TEST_KEY, chat_body, settings_dict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

# Decoded size of the bomb: aiohttp used to inflate all of it before the handler ran.
BOMB_DECODED_BYTES = 256 * 1024 * 1024
# What a refused bomb may cost the worker, per the acceptance test.
MAX_WORKER_CPU_SECONDS = 0.05
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@pytest.fixture(scope="module")
def bomb() -> bytes:
    """A gzip body of zeros: about 256 KiB sent, 256 MiB decoded."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1024 * 1024)
    parts = [compressor.compress(chunk) for _ in range(BOMB_DECODED_BYTES // len(chunk))]
    parts.append(compressor.flush())
    return b"".join(parts)


def worker_cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


async def gateway_with(
    start_simulator: SimulatorFactory, database_url: str, directory: Path, **server: Any
) -> GatewayProcess:
    """`gateway serve` with one worker before a simulator, `server` settings on top."""
    node = await start_simulator("node-a")
    config = settings_dict(
        {"node-a": node.url}, extra={"database": {"url": database_url}, "server": server}
    )
    return await start_gateway_process(config, directory)


@pytest.fixture
async def gateway(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """A worker with request compression off (the default)."""
    process = await gateway_with(start_simulator, database_url, tmp_path)
    yield process
    process.stop()


async def post(url: str, body: bytes, headers: Mapping[str, str]) -> tuple[int, dict[str, Any]]:
    """POST `body` as sent (no client-side coding) to chat completions; status and JSON answer."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(
            url + "/v1/chat/completions",
            data=body,
            headers={"Content-Type": "application/json", **headers},
            skip_auto_headers=("Content-Type",),
        ) as response,
    ):
        return response.status, orjson.loads(await response.read())


async def worker_pid(url: str) -> int:
    """The pid that answers /healthz (the worker itself when there is one)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/healthz") as response:
        pid: int = (await response.json())["pid"]
        return pid


async def test_a_gzip_bomb_without_a_key_costs_the_worker_nothing(
    gateway: GatewayProcess, bomb: bytes
) -> None:
    """256 MiB of gzip without a key: 401 or 415, under 50 ms of the worker's CPU."""
    pid = await worker_pid(gateway.url)
    before = worker_cpu_seconds(pid)
    status, answer = await post(gateway.url, bomb, {"Content-Encoding": "gzip"})
    spent = worker_cpu_seconds(pid) - before
    assert status == 401
    assert_openai_error(answer, "missing_api_key")
    assert spent < MAX_WORKER_CPU_SECONDS, f"the bomb cost the worker {spent:.3f} s of CPU"


async def test_a_gzip_bomb_with_a_key_is_refused_unread(
    gateway: GatewayProcess, bomb: bytes
) -> None:
    """With compression off a keyed gzip bomb gets 415 before any decoding: no CPU spent."""
    pid = await worker_pid(gateway.url)
    before = worker_cpu_seconds(pid)
    status, answer = await post(
        gateway.url,
        bomb,
        {"Content-Encoding": "gzip", "Authorization": f"Bearer {TEST_KEY}"},
    )
    spent = worker_cpu_seconds(pid) - before
    assert status == 415
    assert_openai_error(answer, "unsupported_content_encoding")
    assert spent < MAX_WORKER_CPU_SECONDS, f"the bomb cost the worker {spent:.3f} s of CPU"


@pytest.mark.parametrize("encoding", ["gzip", "br", "deflate", "gzip, gzip"])
async def test_invalid_compressed_bodies_get_415_never_500(
    gateway: GatewayProcess, encoding: str
) -> None:
    """Garbage labelled as compressed gets 415 and leaves no traceback in the log."""
    status, answer = await post(
        gateway.url,
        b"\x1f\x8b\x08 this is not gzip at all",
        {"Content-Encoding": encoding, "Authorization": f"Bearer {TEST_KEY}"},
    )
    assert status == 415
    assert_openai_error(answer, "unsupported_content_encoding")
    assert "Traceback" not in gateway.log()


async def test_identity_bodies_still_pass(gateway: GatewayProcess) -> None:
    """`Content-Encoding: identity` is no coding: the request is served."""
    status, _ = await post(
        gateway.url,
        orjson.dumps(chat_body(max_tokens=2)),
        {"Content-Encoding": "identity", "Authorization": f"Bearer {TEST_KEY}"},
    )
    assert status == 200


async def test_a_refusal_before_the_body_reaches_a_client_still_sending_it(
    gateway: GatewayProcess,
) -> None:
    """A 401 sent before the body was read is not destroyed by a reset: the worker half-closes
    and drops the rest for a moment, so a client (or nginx) still sending reads the answer."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: 10000000\r\n\r\n" + b" " * 262_144
        )
        await writer.drain()
        # The answer and the close happen now; bytes the worker never read are still queued
        # on its side. Closing with them there resets the connection, and a reset discards
        # what the client has not read yet.
        await asyncio.sleep(0.5)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]
    assert b"missing_api_key" in answer


async def test_a_refusal_before_a_large_body_reaches_a_client_that_sends_it_all_first(
    gateway: GatewayProcess,
) -> None:
    """A client (or a proxy streaming the body, as the shipped nginx does) that writes its
    whole body before it reads: the refused worker keeps draining, so the writes finish and
    the 401 is still there to read. Were reading left paused, the writes would stall on a full
    window and the close at the end of the linger would reset the answer away (1 in 2 runs)."""
    size = 8_000_000
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % size
        )
        for _ in range(size // 65_536):
            writer.write(b" " * 65_536)
            await asyncio.wait_for(writer.drain(), timeout=5)
        answer = await asyncio.wait_for(reader.read(), timeout=5)
    finally:
        writer.close()
    assert answer.startswith(b"HTTP/1.1 401 "), answer[:80]
    assert b"missing_api_key" in answer
    # The close is announced: a proxy keeping upstream connections alive must not reuse this one.
    assert b"\r\nconnection: close\r\n" in answer.lower(), answer[:400]


async def test_a_gzip_bomb_through_the_shipped_nginx_costs_the_worker_nothing(
    gateway: GatewayProcess, bomb: bytes, tmp_path: Path
) -> None:
    """Through the shipped nginx: 401 without a key, 415 with one, neither costs the worker."""
    nginx = NginxProcess([gateway.port], tmp_path / "nginx")
    nginx.start()
    try:
        pid = await worker_pid(nginx.url)
        before = worker_cpu_seconds(pid)
        status, answer = await post(nginx.url, bomb, {"Content-Encoding": "gzip"})
        assert status == 401
        assert_openai_error(answer, "missing_api_key")
        status, answer = await post(
            nginx.url, bomb, {"Content-Encoding": "gzip", "Authorization": f"Bearer {TEST_KEY}"}
        )
        assert status == 415
        assert_openai_error(answer, "unsupported_content_encoding")
        spent = worker_cpu_seconds(pid) - before
        assert spent < 2 * MAX_WORKER_CPU_SECONDS, f"two bombs cost {spent:.3f} s of CPU"
    finally:
        nginx.stop()


async def test_enabled_compression_decodes_after_authentication_within_limits(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path, bomb: bytes
) -> None:
    """With `request_compression: true`: a gzip body is served, a bomb gets 413 after at most
    `max_body_bytes` decoded (cheaply), invalid data 400, and no key still costs nothing."""
    process = await gateway_with(start_simulator, database_url, tmp_path, request_compression=True)
    try:
        keyed = {"Content-Encoding": "gzip", "Authorization": f"Bearer {TEST_KEY}"}
        body = gzip.compress(orjson.dumps(chat_body(max_tokens=2)))
        status, answer = await post(process.url, body, keyed)
        assert status == 200, answer
        status, answer = await post(
            process.url,
            zlib.compress(orjson.dumps(chat_body())),
            {**keyed, "Content-Encoding": "deflate"},
        )
        assert status == 200, answer

        pid = await worker_pid(process.url)
        before = worker_cpu_seconds(pid)
        status, answer = await post(process.url, bomb, {"Content-Encoding": "gzip"})
        assert status == 401
        small_bomb = gzip.compress(bytes(16 * 1024 * 1024))  # under max_body_bytes as sent
        status, answer = await post(process.url, small_bomb, keyed)
        spent = worker_cpu_seconds(pid) - before
        assert status == 413
        assert answer["error"]["code"] in {"body_too_large", "compression_ratio_exceeded"}
        assert spent < 2 * MAX_WORKER_CPU_SECONDS, f"two bombs cost {spent:.3f} s of CPU"

        status, answer = await post(process.url, b"\x1f\x8b\x08 not gzip", keyed)
        assert status == 400
        assert_openai_error(answer, "invalid_content_encoding")
        status, answer = await post(process.url, b"x", {**keyed, "Content-Encoding": "br"})
        assert status == 415
        assert "Traceback" not in process.log()
    finally:
        process.stop()
