"""One key flooding the per-process session table cannot evict the session of a key holding
less than its equal split of the table."""

from __future__ import annotations

import aiohttp

from gateway.config import Settings
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import OTHER_KEY, TEST_KEY, settings_dict

CAPACITY = 32
FLOOD = 10 * CAPACITY


async def affinity(session: aiohttp.ClientSession, url: str, key: str, model: str, sid: str) -> str:
    """`x-gateway-affinity` of one chat request in session `sid`."""
    async with session.post(
        url + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        headers={"Authorization": f"Bearer {key}", "x-session-id": sid},
    ) as response:
        await response.read()
        assert response.status == 200
        return response.headers["x-gateway-affinity"]


async def test_a_key_flooding_sessions_leaves_another_keys_session_bound(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """Ten times the table's capacity in new sessions from one key: the other key's session
    still hits its binding, and the flooder's newest sessions are bound too."""
    node = await start_simulator("node-a")
    config = settings_dict(
        {"node-a": node.url},
        extra={
            "routing": {"session_capacity": CAPACITY},
            "models": [
                {"name": "test-model", "stickiness": "session"},
                {"name": "other-model", "stickiness": "session"},
            ],
        },
    )
    server = await start_gateway(Settings.model_validate(config))
    url = str(server.make_url("")).rstrip("/")
    async with aiohttp.ClientSession() as session:
        assert await affinity(session, url, OTHER_KEY, "other-model", "victim") == "miss"
        assert await affinity(session, url, OTHER_KEY, "other-model", "victim") == "hit"
        for number in range(FLOOD):
            await affinity(session, url, TEST_KEY, "test-model", f"flood-{number}")
        assert await affinity(session, url, OTHER_KEY, "other-model", "victim") == "hit"
        assert await affinity(session, url, TEST_KEY, "test-model", f"flood-{FLOOD - 1}") == "hit"
        assert await affinity(session, url, TEST_KEY, "test-model", "flood-0") == "miss"
