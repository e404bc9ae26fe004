"""Inspecting bindings: `/admin/bindings` behind the admin token, `gateway bindings`, `migrate`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import aiohttp
import orjson
import yaml

from gateway.config import Settings
from gateway.config_fleet import hash_key
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import TEST_KEY, TEST_MODEL, chat_body, settings_dict

ADMIN_TOKEN = "admin-token-for-tests-0123"


async def test_admin_bindings_lists_ids_and_needs_the_token(
    database_url: str, start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """After a request, /admin/bindings shows the key id's binding; no token, no list."""
    node = await start_simulator("node-a")
    config = settings_dict(
        {"node-a": node.url},
        extra={"database": {"url": database_url}, "server": {"admin_token": ADMIN_TOKEN}},
    )
    server = await start_gateway(Settings.model_validate(config))
    async with aiohttp.ClientSession() as session:
        async with session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body()),
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        ) as response:
            assert response.status == 200
        for headers in ({}, {"Authorization": f"Bearer {TEST_KEY}"}):
            async with session.get(server.make_url("/admin/bindings"), headers=headers) as denied:
                assert denied.status == 401
                assert (await denied.json())["error"]["code"] == "invalid_admin_token"
        async with session.get(
            server.make_url("/admin/bindings"),
            params={"key": "team-a"},
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as response:
            assert response.status == 200
            text = await response.text()
    rows = orjson.loads(text)["data"]
    assert [(row["key_id"], row["model"], row["provider"]) for row in rows] == [
        ("team-a", TEST_MODEL, "node-a")
    ]
    assert 0 < rows[0]["ttl_remaining_seconds"] <= 300
    assert TEST_KEY not in text
    assert hash_key(TEST_KEY) not in text


async def test_admin_endpoints_are_absent_without_a_token(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> None:
    """With no admin token configured, /admin/bindings does not exist."""
    node = await start_simulator("node-a")
    server = await start_gateway(Settings.model_validate(settings_dict({"node-a": node.url})))
    async with (
        aiohttp.ClientSession() as session,
        session.get(
            server.make_url("/admin/bindings"), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
        ) as response,
    ):
        assert response.status == 404


def run_gateway(*arguments: str) -> subprocess.CompletedProcess[str]:
    """The real `gateway` command."""
    return subprocess.run(
        [sys.executable, "-m", "gateway", *arguments],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def test_bindings_command_lists_live_bindings(
    database_url: str,
    start_simulator: SimulatorFactory,
    start_gateway: GatewayFactory,
    tmp_path: Path,
) -> None:
    """`gateway bindings --key ID` prints the binding made by a request, with its TTL."""
    node = await start_simulator("node-a")
    config = settings_dict({"node-a": node.url}, extra={"database": {"url": database_url}})
    server = await start_gateway(Settings.model_validate(config))
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            server.make_url("/v1/chat/completions"),
            data=orjson.dumps(chat_body()),
            headers={"Authorization": f"Bearer {TEST_KEY}"},
        ) as response,
    ):
        assert response.status == 200
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    listed = run_gateway("bindings", "--config", str(path), "--key", "team-a")
    assert listed.returncode == 0, listed.stderr
    lines = listed.stdout.strip().splitlines()
    assert len(lines) == 2
    assert lines[1].split()[:3] == ["team-a", TEST_MODEL, "node-a"]
    assert run_gateway("bindings", "--config", str(path), "--key", "nobody").stdout.count("\n") == 1
    migrated = run_gateway("migrate", "--config", str(path))
    assert migrated.returncode == 0, migrated.stderr
    assert migrated.stdout.strip() == "nothing to apply"
