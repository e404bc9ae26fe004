"""Secrets never leave: a gateway process driven through successes, failures, failovers, bad keys,
oversized and slow requests and the admin pages, plus broken configs, prints and answers no
client key, no key digest, no upstream credential, no admin token and no database password."""

from __future__ import annotations

import asyncio
import base64
import copy
import os
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import pytest
import yaml

from bench.launcher import PROJECT_ROOT, GatewayProcess
from gateway.config_fleet import hash_key
from tests.support.gateway import TEST_MODEL, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]


class Transcript:
    """Everything the gateway said: response statuses, headers and bodies, and command output."""

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.statuses: list[int] = []
        self.commands: list[str] = []

    def add(self, text: str) -> None:
        """Keep one piece of output."""
        self.parts.append(text)

    async def request(
        self,
        session: aiohttp.ClientSession,
        method: str,
        url: str,
        *,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
    ) -> int:
        """One request; its status, with everything it answered kept."""
        data = orjson.dumps(body) if isinstance(body, dict) else body
        async with session.request(method, url, data=data, headers=headers) as response:
            answer = await response.read()
            self.statuses.append(response.status)
            self.add(f"{response.status} {dict(response.headers)!r}")
            self.add(answer.decode("utf-8", errors="replace"))
            return response.status

    def run(self, *arguments: str, environ: Mapping[str, str]) -> int:
        """Run `gateway ARGUMENTS` to completion, keeping its stdout and stderr."""
        finished = subprocess.run(
            [sys.executable, "-m", "gateway", *arguments],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**environ, "PYTHONPATH": str(PROJECT_ROOT)},
        )
        self.add(finished.stdout)
        self.add(finished.stderr)
        self.commands.append(finished.stdout + finished.stderr)
        return finished.returncode


async def slow_head(port: int, key: str) -> bytes:
    """A head that stops halfway, after the key: what comes back before the connection closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer {key}\r\n".encode()
        )
        await writer.drain()
        received = b""
        while chunk := await asyncio.wait_for(reader.read(65536), 10):
            received += chunk
        return received
    finally:
        writer.close()


def broken(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` with secrets where they do not belong: each placement is a validation error."""
    wrong = copy.deepcopy(dict(config))
    wrong["server"]["admin_token"] = {"token": "${HOSTILE_ADMIN_TOKEN}"}
    wrong["providers"][0]["url"] = "http://user:${HOSTILE_UPSTREAM_CREDENTIAL}@node a:99999"
    wrong["providers"][0]["token"] = "${HOSTILE_UPSTREAM_CREDENTIAL}"
    wrong["providers"][1]["api_key"] = ["${HOSTILE_UPSTREAM_CREDENTIAL}"]
    wrong["keys"][0] = {"id": "client-a", "key_sha256": "${HOSTILE_CLIENT_KEY}"}
    wrong["keys"].append(
        {"id": "client-c", "key": "${HOSTILE_CLIENT_KEY}", "key_sha256": "${HOSTILE_CLIENT_KEY}"}
    )
    return wrong


async def drive(
    gateway: GatewayProcess,
    transcript: Transcript,
    nodes: tuple[SimulatorProcess, SimulatorProcess],
    secrets: Mapping[str, str],
) -> None:
    """Successes, failures, a failover, bad keys, oversized and slow requests, admin pages."""
    client_key, other_key = secrets["client key"], secrets["other client key"]
    admin_token = secrets["admin token"]
    chat = gateway.url + "/v1/chat/completions"
    auth = {"Authorization": f"Bearer {client_key}"}
    async with aiohttp.ClientSession() as session:

        async def answers() -> bool:
            try:
                return await transcript.request(session, "GET", gateway.url + "/healthz") == 200
            except aiohttp.ClientConnectionError:
                return False

        await wait_until(answers, timeout=30, interval=0.05, message="the gateway to answer")
        for stream in (False, True):
            body = chat_body(max_tokens=2, stream=stream)
            assert await transcript.request(session, "POST", chat, body=body, headers=auth) == 200
        other = {"Authorization": f"Bearer {other_key}"}
        other_model = {**chat_body(max_tokens=2), "model": "other-model"}
        assert (
            await transcript.request(session, "POST", chat, body=other_model, headers=other) == 200
        )
        assert (
            await transcript.request(session, "POST", chat, body=chat_body(), headers=other) == 403
        )

        basic = base64.b64encode(f"user:{client_key}".encode()).decode()
        for wrong in (
            f"Bearer {secrets['upstream credential']}",
            f"Bearer {admin_token}",
            f"Bearer {client_key}x",
            f"Bearer {secrets['client key digest']}",
            f"Basic {basic}",
        ):
            assert (
                await transcript.request(
                    session, "POST", chat, body=chat_body(), headers={"Authorization": wrong}
                )
                == 401
            )
        too_long = {"Authorization": f"Bearer {client_key}{'A' * 9000}"}
        assert (
            await transcript.request(session, "POST", chat, body=chat_body(), headers=too_long)
            == 431
        )
        not_json = f"{{not json {client_key}".encode()
        assert await transcript.request(session, "POST", chat, body=not_json, headers=auth) == 400
        too_big = chat_body(client_key * 3000)
        assert await transcript.request(session, "POST", chat, body=too_big, headers=auth) == 413
        cut = await slow_head(gateway.port, client_key)
        transcript.add(cut.decode("utf-8", errors="replace"))
        assert cut.startswith(b"HTTP/1.1 408")

        node_a, node_b = nodes
        await node_b.set_faults(error_rate=1.0)
        for _ in range(4):  # nodes alternate: node-b fails every other time, node-a takes over
            assert (
                await transcript.request(session, "POST", chat, body=chat_body(), headers=auth)
                == 200
            )
        await node_a.set_faults(error_rate=1.0)
        # Every node failing: the last upstream's status (500) and message reach the client.
        assert (
            await transcript.request(session, "POST", chat, body=chat_body(), headers=auth) == 500
        )
        await node_a.set_faults(error_rate=0.0)
        await node_b.set_faults(error_rate=0.0)

        admin = {"Authorization": f"Bearer {admin_token}"}
        browser = {
            "Authorization": "Basic " + base64.b64encode(f"ops:{admin_token}".encode()).decode()
        }
        bindings = gateway.url + "/admin/bindings"
        status = gateway.url + "/admin/status"
        assert await transcript.request(session, "GET", bindings, headers=admin) == 200
        assert await transcript.request(session, "GET", status, headers=browser) == 200
        assert await transcript.request(session, "GET", status, headers=auth) == 401
        assert await transcript.request(session, "GET", gateway.url + "/metrics") == 200
        assert (
            await transcript.request(session, "GET", gateway.url + "/v1/models", headers=auth)
            == 200
        )


async def test_no_secret_appears_in_any_output(
    database_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Grep every log line, answer, admin page, scrape and check-config output for each secret."""
    # Made at run time, so no source line or fixture can be what a match finds.
    client_key = f"sk-client-{uuid.uuid4().hex}"
    other_key = f"sk-other-{uuid.uuid4().hex}"
    credential = f"upstream-credential-{uuid.uuid4().hex}"
    admin_token = f"admin-token-{uuid.uuid4().hex}"
    for name, value in (
        ("HOSTILE_CLIENT_KEY", client_key),
        ("HOSTILE_UPSTREAM_CREDENTIAL", credential),
        ("HOSTILE_ADMIN_TOKEN", admin_token),
    ):
        monkeypatch.setenv(name, value)
    secrets = {
        "client key": client_key,
        "other client key": other_key,
        "client key digest": hash_key(client_key),
        "other client key digest": hash_key(other_key),
        "upstream credential": credential,
        "admin token": admin_token,
    }
    database_password = urlsplit(database_url).password
    if database_password:
        secrets["database password"] = database_password
    transcript = Transcript()

    async with SimulatorProcess("node-a") as node_a, SimulatorProcess("node-b") as node_b:
        config = settings_dict(
            {"node-a": node_a.url, "node-b": node_b.url},
            extra={
                "database": {"url": database_url},
                "server": {
                    "admin_token": "${HOSTILE_ADMIN_TOKEN}",
                    "header_read_timeout_seconds": 1,
                },
                "routing": {"allowed_fails": 100},
                "models": [{"name": TEST_MODEL, "stickiness": "none"}],
                "keys": [
                    {"id": "client-a", "key": "${HOSTILE_CLIENT_KEY}", "models": ["*"]},
                    {
                        "id": "client-b",
                        "key_sha256": hash_key(other_key),
                        "models": ["other-model"],
                    },
                ],
            },
        )
        for provider in config["providers"]:
            provider["api_key"] = "${HOSTILE_UPSTREAM_CREDENTIAL}"
        gateway = GatewayProcess(config, tmp_path, workers=2)
        gateway.start()
        try:
            await drive(gateway, transcript, (node_a, node_b), secrets)
        finally:
            gateway.stop()
        received = (await node_a.stats()).last_request()
        assert received.headers["Authorization"] == f"Bearer {credential}"  # it does go upstream

    environ = dict(os.environ)
    assert transcript.run("check-config", str(gateway.config_path), environ=environ) == 0
    broken_path = tmp_path / "broken.yaml"
    broken_path.write_text(yaml.safe_dump(broken(config)), encoding="utf-8")
    assert transcript.run("check-config", str(broken_path), environ=environ) == 1
    assert transcript.run("serve", "--config", str(broken_path), environ=environ) == 1
    unparsable = tmp_path / "unparsable.yaml"
    unparsable.write_text(f"server:\n  admin_token: '{admin_token}\n  port: [\n", encoding="utf-8")
    assert transcript.run("check-config", str(unparsable), environ=environ) == 1

    log = gateway.log()
    assert '"key_id":"client-a"' in log.replace(" ", "")
    assert "worker_started" in log
    everything = "\n".join([log, *transcript.parts])
    leaked = [name for name, secret in secrets.items() if secret in everything]
    assert leaked == []
    assert {200, 400, 401, 403, 413, 431, 500}.issubset(transcript.statuses)
