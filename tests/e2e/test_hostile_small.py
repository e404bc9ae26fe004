"""The small findings as attacks on a real worker: non-UTF-8 credentials, `Expect:
100-continue` before the checks, a `Server` header naming versions."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from bench.launcher import GatewayProcess
from tests.conftest import SimulatorFactory
from tests.e2e.test_hostile_clients import parse_answer, read_until_closed, start_gateway_process
from tests.support.gateway import TEST_KEY, chat_body, settings_dict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

ADMIN_TOKEN = "admin-token-0123456789-abcdef"
BODY = orjson.dumps(chat_body(max_tokens=2))
MAX_BODY_BYTES = 64 * 1024


@pytest.fixture
async def gateway(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path
) -> AsyncIterator[GatewayProcess]:
    """`gateway serve` with an admin token, before one simulator."""
    node = await start_simulator("node-a")
    config = settings_dict(
        {"node-a": node.url},
        extra={"database": {"url": database_url}, "server": {"admin_token": ADMIN_TOKEN}},
    )
    process = await start_gateway_process(config, tmp_path)
    yield process
    process.stop()


async def exchange(port: int, head: bytes, body: bytes = b"") -> bytes:
    """Send a raw request head (and body) on a fresh connection; everything answered."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(head + body)
        await writer.drain()
        return await asyncio.wait_for(read_until_closed(reader), 15)
    finally:
        writer.close()


def head(path: str, *lines: bytes, method: bytes = b"POST", length: int = 0) -> bytes:
    """A raw HTTP/1.1 request head that asks for the connection to close after the answer."""
    return (
        method
        + b" "
        + path.encode()
        + b" HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\nContent-Type: application/json\r\n"
        + b"".join(line + b"\r\n" for line in lines)
        + f"Content-Length: {length}\r\n\r\n".encode()
    )


@pytest.mark.parametrize(
    "credential",
    [
        b"Authorization: Bearer sk-\xff\xfe-key",
        b"api-key: sk-\xc3\x28-key",
        b"x-api-key: \x80\x81",
    ],
)
async def test_a_non_utf8_client_credential_gets_401(
    gateway: GatewayProcess, credential: bytes
) -> None:
    """Bytes that are not UTF-8 in a key header: 401, never 500, no traceback."""
    answer = await exchange(
        gateway.port, head("/v1/chat/completions", credential, length=len(BODY)), BODY
    )
    status, body = parse_answer(answer)
    assert status == 401
    assert body["error"]["code"] == "invalid_api_key"
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize(
    "credential", [b"Authorization: Bearer adm\xff\xfein", b"Authorization: Basic \xff\xfe"]
)
async def test_a_non_utf8_admin_token_gets_401(gateway: GatewayProcess, credential: bytes) -> None:
    """Bytes that are not UTF-8 in the admin credential: 401, never 500, no traceback."""
    answer = await exchange(gateway.port, head("/admin/status", credential, method=b"GET"))
    status, body = parse_answer(answer)
    assert status == 401
    assert body["error"]["code"] == "invalid_admin_token"
    assert "Traceback" not in gateway.log()


@pytest.mark.parametrize(
    ("credential", "length", "status"),
    [
        (b"Authorization: Bearer sk-wrong-key", 100, 401),
        (b"X-Nothing: 1", 100, 401),
        (f"Authorization: Bearer {TEST_KEY}".encode(), MAX_BODY_BYTES + 1, 413),
    ],
)
async def test_100_continue_comes_only_after_the_key_and_the_size_pass(
    gateway: GatewayProcess, credential: bytes, length: int, status: int
) -> None:
    """A bad key or an oversized declared body gets its error instead of `100 Continue`."""
    answer = await exchange(
        gateway.port,
        head("/v1/chat/completions", credential, b"Expect: 100-continue", length=length),
    )
    assert b"100 Continue" not in answer
    assert parse_answer(answer)[0] == status


async def test_100_continue_then_the_answer_for_a_valid_request(gateway: GatewayProcess) -> None:
    """A valid key and size: `100 Continue` first, the body is then sent and answered 200."""
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
    try:
        writer.write(
            head(
                "/v1/chat/completions",
                f"Authorization: Bearer {TEST_KEY}".encode(),
                b"Expect: 100-continue",
                length=len(BODY),
            )
        )
        await writer.drain()
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        assert interim.startswith(b"HTTP/1.1 100 Continue")
        writer.write(BODY)
        await writer.drain()
        answer = await asyncio.wait_for(read_until_closed(reader), 15)
    finally:
        writer.close()
    assert parse_answer(answer)[0] == 200


@pytest.mark.parametrize(
    ("request_head", "body"),
    [
        (head("/healthz", method=b"GET"), b""),
        (head("/nowhere", method=b"GET"), b""),
        (head("/v1/chat/completions", length=len(BODY)), BODY),
        (
            head(
                "/v1/chat/completions",
                f"Authorization: Bearer {TEST_KEY}".encode(),
                length=len(BODY),
            ),
            BODY,
        ),
        (b"GARBAGE\r\n\r\n", b""),
    ],
)
async def test_no_answer_names_server_software_versions(
    gateway: GatewayProcess, request_head: bytes, body: bytes
) -> None:
    """Successes, errors and unparseable requests: `Server: affinity-gateway`, no version."""
    answer = await exchange(gateway.port, request_head, body)
    response_head = answer.partition(b"\r\n\r\n")[0].lower()
    assert b"\r\nserver: affinity-gateway\r\n" in response_head + b"\r\n"
    assert b"python" not in response_head
    assert b"aiohttp" not in response_head


@pytest.mark.parametrize("boundary", [b"\xe2\x82\xac-euro", b"\xff\xfe", b"x\xf0\x9f\x92\xa5"])
async def test_a_multipart_boundary_that_is_not_ascii_gets_400(
    gateway: GatewayProcess, boundary: bytes
) -> None:
    """A form whose `boundary` holds bytes beyond ASCII (UTF-8 or not): an OpenAI-shaped 400
    naming the boundary, never a 500."""
    form = b"--" + boundary + b'\r\nContent-Disposition: form-data; name="model"\r\n\r\nwhisper\r\n'
    form += b"--" + boundary + b"--\r\n"
    request_head = (
        b"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n"
        + f"Authorization: Bearer {TEST_KEY}\r\n".encode()
        + b"Content-Type: multipart/form-data; boundary="
        + boundary
        + f"\r\nContent-Length: {len(form)}\r\n\r\n".encode()
    )
    status, body = parse_answer(await exchange(gateway.port, request_head, form))
    assert status == 400
    assert body["error"]["code"] == "invalid_multipart_boundary"
    assert body["error"]["type"] == "invalid_request_error"
    assert "Traceback" not in gateway.log()
