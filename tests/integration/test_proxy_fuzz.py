"""Hypothesis-generated junk bodies, content types and headers never make the gateway answer 5xx."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading
from collections.abc import Iterator
from concurrent.futures import Future

import orjson
import pytest
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.app import create_app
from tests.support.gateway import TEST_KEY, TEST_MODEL, build_settings
from tests.support.simulators import InProcessSimulator


def encode(value: object) -> bytes:
    """Any JSON-ish value as bytes (stdlib json: big integers and NaN included, as junk can be)."""
    return json.dumps(value).encode()


JSON_SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)
MESSAGES = (
    st.lists(
        st.fixed_dictionaries(
            {"role": st.sampled_from(["user", "system", "bogus"]), "content": JSON_VALUES}
        ),
        max_size=3,
    )
    | JSON_VALUES
)
BODIES = st.one_of(
    st.binary(max_size=300),
    JSON_VALUES.map(encode),
    st.fixed_dictionaries(
        {"model": st.sampled_from([TEST_MODEL, "other-model", "nope"]) | JSON_VALUES},
        optional={
            "messages": MESSAGES,
            "prompt": JSON_VALUES,
            "stream": JSON_VALUES,
            "max_tokens": st.integers(-5, 40) | JSON_VALUES,
            "metadata": JSON_VALUES,
        },
    ).map(encode),
)
TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz-", min_size=1, max_size=20)
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)
CONTENT_TYPES = st.sampled_from(
    ["application/json", "text/plain", "multipart/form-data", "application/x-www-form-urlencoded",
     "", "application/json; charset=latin-1", "*/*"]
) | HEADER_VALUE  # fmt: skip
AUTHORIZATION = st.sampled_from([f"Bearer {TEST_KEY}", "Bearer nope", "", "Basic x"]) | HEADER_VALUE
PATHS = st.sampled_from(["/v1/chat/completions", "/v1/completions", "/v1/models", "/v1/x", "/"])


class BackgroundGateway:
    """A simulator and a gateway on their own event loop thread, for a synchronous fuzzer."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.port = 0

    def run(self, coroutine: object) -> object:
        future: Future[object] = asyncio.run_coroutine_threadsafe(coroutine, self.loop)  # type: ignore[arg-type]
        return future.result(timeout=30)

    def start(self) -> None:
        self.thread.start()
        self.run(self._start())

    async def _start(self) -> None:
        self.node = InProcessSimulator("node-a")
        await self.node.__aenter__()
        settings = build_settings({"node-a": self.node.url})
        self.server = TestServer(create_app(settings), host="127.0.0.1", handler_cancellation=True)
        await self.server.start_server()
        assert self.server.port is not None
        self.port = self.server.port

    async def _stop(self) -> None:
        await self.server.close()
        await self.node.__aexit__(None, None, None)

    def stop(self) -> None:
        self.run(self._stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


@pytest.fixture(scope="module")
def background_gateway() -> Iterator[BackgroundGateway]:
    """One gateway for the whole fuzz run."""
    gateway = BackgroundGateway()
    gateway.start()
    yield gateway
    gateway.stop()


@pytest.mark.timeout(300)
@settings(
    max_examples=300,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=st.sampled_from(["POST", "GET", "PUT", "DELETE"]),
    path=PATHS,
    body=BODIES,
    content_type=CONTENT_TYPES,
    authorization=AUTHORIZATION,
    extra=st.dictionaries(TOKEN.map(lambda name: f"x-{name}"), HEADER_VALUE, max_size=4),
)
def test_junk_never_makes_the_gateway_answer_5xx(
    background_gateway: BackgroundGateway,
    method: str,
    path: str,
    body: bytes,
    content_type: str,
    authorization: str,
    extra: dict[str, str],
) -> None:
    """Whatever arrives, the gateway answers below 500, and its own errors are OpenAI-shaped."""
    connection = http.client.HTTPConnection("127.0.0.1", background_gateway.port, timeout=20)
    headers = {**extra, "Content-Type": content_type, "Authorization": authorization}
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        answer = response.read()
    finally:
        connection.close()
    assert response.status < 500, answer[:300]
    if response.status >= 400 and response.getheader("x-gateway-provider") is None:
        error = orjson.loads(answer)["error"]
        assert error["message"]
        assert error["type"]
        assert error["code"]
