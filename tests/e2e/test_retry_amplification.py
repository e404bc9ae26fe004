"""Issue 20 acceptance: an SDK call that every node fails reaches the nodes at most three times
(it used to reach them nine times: three providers for each of the SDK's three attempts)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.conftest import SimulatorFactory
from tests.e2e.test_hostile_clients import start_gateway_process
from tests.support.gateway import TEST_KEY, TEST_MODEL, settings_dict

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_an_sdk_call_every_node_fails_reaches_the_nodes_at_most_three_times(
    start_simulator: SimulatorFactory, database_url: str, tmp_path: Path, stream: bool
) -> None:
    """Three nodes answering 500 to everything, `gateway serve` before them, the openai SDK with
    its default retries: the nodes count at most 3 attempts in all, and the client's error says
    `x-should-retry: false` with no Retry-After (the nodes sent none)."""
    nodes = [await start_simulator(name) for name in ("node-a", "node-b", "node-c")]
    for node in nodes:
        await node.set_faults(error_rate=1.0)
    config = settings_dict(
        {node.name: node.url for node in nodes},
        extra={
            "database": {"url": database_url},
            "models": [{"name": TEST_MODEL, "stickiness": "none"}],
        },
    )
    async with AsyncExitStack() as stack:
        gateway = await start_gateway_process(config, tmp_path)
        stack.callback(gateway.stop)
        client = await stack.enter_async_context(
            openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY)
        )
        assert client.max_retries == 2  # the SDK's default
        with pytest.raises(openai.InternalServerError) as raised:
            await client.chat.completions.create(
                model=TEST_MODEL,
                messages=[{"role": "user", "content": "hello"}],
                max_tokens=2,
                stream=stream,
            )
        async with (
            aiohttp.ClientSession() as session,
            session.get(gateway.url + "/metrics") as response,
        ):
            metrics = await response.text()
    attempts = sum([(await node.stats()).completion_requests for node in nodes])
    assert attempts <= 3
    headers = raised.value.response.headers
    assert headers["x-should-retry"] == "false"
    assert "retry-after" not in headers
    # Two providers failed the request alike: it was the common factor, no third was tried.
    assert attempts == 2
    assert "gateway_retries_total 1.0" in metrics
    assert 'gateway_retries_refused_total{reason="request_suspected"} 1.0' in metrics
