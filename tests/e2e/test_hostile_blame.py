"""The client-induced cooldown as an attack on a real worker: a key whose requests make every
upstream answer 500 cannot cool a provider, so another key's requests keep succeeding."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path

import aiohttp
import openai
import pytest

from tests.e2e.test_hostile_clients import start_gateway_process
from tests.support.gateway import OTHER_KEY, TEST_KEY, TEST_MODEL, settings_dict
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ADMIN_TOKEN = "admin-token-0123456789-abcdef"
POISON = "POISON-e2e-91c4"
ATTACKS = 60


async def test_a_poisoning_key_cannot_cool_providers_for_another_key(
    database_url: str, tmp_path: Path
) -> None:
    """60 requests from key A that every node answers 500, interleaved with key B's, through
    `gateway serve` with default cooldown settings: every B request succeeds through the openai
    SDK, and neither /metrics nor /admin/status shows a provider cooling."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--base-ttft-ms", "0", "--error-on-text", POISON])
            )
            for name in ("node-a", "node-b")
        ]
        config = settings_dict(
            {node.name: node.url for node in nodes},
            extra={"database": {"url": database_url}, "server": {"admin_token": ADMIN_TOKEN}},
        )
        config["keys"][1]["models"] = ["*"]
        gateway = await start_gateway_process(config, tmp_path)
        stack.callback(gateway.stop)
        attacker = await stack.enter_async_context(
            openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0)
        )
        victim = await stack.enter_async_context(
            openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key=OTHER_KEY, max_retries=0)
        )

        async def attack() -> int:
            try:
                await attacker.chat.completions.create(
                    model=TEST_MODEL,
                    messages=[{"role": "user", "content": f"please {POISON}"}],
                    max_tokens=2,
                )
            except openai.APIStatusError as error:
                return error.status_code
            return 200

        async def serve() -> str | None:
            answer = await victim.chat.completions.create(
                model=TEST_MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=2
            )
            return answer.choices[0].message.content

        for _ in range(ATTACKS // 3):
            attacked = await asyncio.gather(attack(), attack(), attack())
            assert list(attacked) == [500, 500, 500]
            served = await asyncio.gather(serve(), serve())
            assert all(served), served

        stats = [await node.stats() for node in nodes]
        assert sum(stat.completion_requests for stat in stats) >= ATTACKS * 2
        async with aiohttp.ClientSession() as session:
            async with session.get(gateway.url + "/metrics") as response:
                metrics = await response.text()
            async with session.get(
                gateway.url + "/admin/status",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as response:
                assert response.status == 200
                page = await response.text()
        for node in nodes:
            assert f'gateway_provider_cooldown_seconds{{provider="{node.name}"}} 0.0' in metrics
        assert "cooling," not in page
