"""`/admin/status` in a real headless Chromium: the provider table renders, every worker of a
2-process gateway shows; no token, no page."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp.test_utils import TestServer

from bench.launcher import GatewayProcess
from gateway.config import Settings
from gateway.simulator import Faults
from tests.conftest import GatewayFactory, SimulatorFactory
from tests.support.gateway import OTHER_KEY, TEST_KEY, TEST_MODEL, answers, chat_body, settings_dict
from tests.support.polling import wait_until
from tests.support.simulators import SimulatorProcess

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

ADMIN_TOKEN = "status-page-admin-token-0123"
CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "/usr/bin/chromium")
CHROMIUM_INSTALL_HINT = (
    "headless Chromium is required for the status page browser test: install it with "
    "`apt-get update && apt-get install -y chromium` (the project's test script does this)"
)
CHROMIUM_TIMEOUT_SECONDS = 60.0
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class BrowserRun:
    """What one headless Chromium run printed."""

    exit_code: int
    stdout: str
    stderr: str


def chromium_executable() -> str:
    """The Chromium binary; fails the test (never skips) with install advice when absent."""
    for candidate in CHROMIUM_CANDIDATES:
        found = shutil.which(candidate)
        if found is not None:
            return found
    pytest.fail(CHROMIUM_INSTALL_HINT)


async def run_chromium(profile: Path, *arguments: str) -> BrowserRun:
    """Run headless Chromium once with a throwaway profile; kill it if it overruns."""
    command = [
        chromium_executable(),
        "--headless",
        "--no-sandbox",  # the tests run as root, where Chromium's sandbox cannot start
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        *arguments,
    ]
    process = await asyncio.create_subprocess_exec(
        *command,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(process.communicate(), CHROMIUM_TIMEOUT_SECONDS)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await process.wait()
        raise AssertionError(
            f"chromium did not finish within {CHROMIUM_TIMEOUT_SECONDS} s"
        ) from None
    assert process.returncode is not None
    return BrowserRun(
        process.returncode, stdout.decode(errors="replace"), stderr.decode(errors="replace")
    )


def status_url(server: TestServer, *, token: str | None) -> str:
    """The page's address; with `token`, as HTTP Basic credentials (any user name)."""
    credentials = "" if token is None else f"operator:{token}@"
    return f"http://{credentials}127.0.0.1:{server.port}/admin/status"


async def provider_row(session: aiohttp.ClientSession, server: TestServer, name: str) -> str:
    """The status page's table row for provider `name`, fetched with the bearer token."""
    async with session.get(
        server.make_url("/admin/status"), headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}
    ) as response:
        assert response.status == 200
        page = await response.text()
    start = page.index(f'data-provider="{name}"')
    return page[start : page.index("</tr>", start)]


@pytest.fixture
async def gateway_with_traffic(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> tuple[TestServer, list[str]]:
    """Three nodes (node-c always failing) behind a gateway that has served some requests."""
    nodes = [
        await start_simulator("node-a"),
        await start_simulator("node-b"),
        await start_simulator("node-c", faults=Faults(error_rate=1.0)),
    ]
    config = settings_dict(
        {node.name: node.url for node in nodes},
        extra={
            "server": {"admin_token": ADMIN_TOKEN},
            # No stickiness and one allowed failure: traffic reaches node-c and cools it.
            "models": [{"name": TEST_MODEL, "stickiness": "none"}],
            "routing": {"allowed_fails": 1, "cooldown_seconds": 300},
        },
    )
    # Issue 13: one key's 5xx never cools a provider, so the traffic comes from two keys. Every
    # other request meets node-c first: a cycle of three keeps both keys meeting it.
    config["keys"][1]["models"] = ["*"]
    keys = itertools.cycle([TEST_KEY, OTHER_KEY, OTHER_KEY])
    server = await start_gateway(Settings.model_validate(config))
    async with aiohttp.ClientSession() as session:

        async def node_c_cooling() -> bool:
            async with session.post(
                server.make_url("/v1/chat/completions"),
                data=orjson.dumps(chat_body("Hello, status page")),
                headers={"Authorization": f"Bearer {next(keys)}"},
            ) as response:
                assert response.status == 200
                await response.read()
            return "cooling" in await provider_row(session, server, "node-c")

        await wait_until(node_c_cooling, timeout=20, message="node-c to cool down")
    return server, [node.name for node in nodes]


async def test_status_page_renders_every_provider_in_chromium_with_the_admin_token(
    gateway_with_traffic: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """With the token as Basic credentials the browser's DOM holds every provider's row."""
    server, names = gateway_with_traffic
    run = await run_chromium(
        tmp_path / "profile-dom", "--dump-dom", status_url(server, token=ADMIN_TOKEN)
    )
    assert run.exit_code == 0, run.stderr[-2000:]
    dom = run.stdout
    assert 'id="providers"' in dom, dom[:2000]
    for name in names:
        assert f'data-provider="{name}"' in dom
    assert 'id="decisions"' in dom
    cooling_row = dom[dom.index('data-provider="node-c"') :]
    assert "cooling" in cooling_row[: cooling_row.index("</tr>")]
    assert TEST_KEY not in dom
    assert "Hello, status page" not in dom

    screenshot = tmp_path / "admin-status.png"
    shot = await run_chromium(
        tmp_path / "profile-screenshot",
        "--hide-scrollbars",
        "--window-size=1400,900",
        f"--screenshot={screenshot}",
        status_url(server, token=ADMIN_TOKEN),
    )
    assert shot.exit_code == 0, shot.stderr[-2000:]
    print(f"status page screenshot: {screenshot}")
    assert screenshot.read_bytes()[: len(PNG_SIGNATURE)] == PNG_SIGNATURE
    assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank frame


async def test_status_page_is_refused_without_the_admin_token(
    gateway_with_traffic: tuple[TestServer, list[str]], tmp_path: Path
) -> None:
    """Without the token: 401 with a Basic challenge, and the browser shows no provider table."""
    server, _ = gateway_with_traffic
    async with aiohttp.ClientSession() as session:
        for headers in ({}, {"Authorization": f"Bearer {TEST_KEY}"}):
            async with session.get(server.make_url("/admin/status"), headers=headers) as denied:
                assert denied.status == 401
                assert denied.headers["WWW-Authenticate"].startswith("Basic ")
                assert (await denied.json())["error"]["code"] == "invalid_admin_token"
    run = await run_chromium(
        tmp_path / "profile-denied", "--dump-dom", status_url(server, token=None)
    )
    assert 'id="providers"' not in run.stdout


async def test_status_page_shows_every_worker_of_a_two_process_gateway_in_chromium(
    database_url: str, tmp_path: Path
) -> None:
    """`gateway serve --workers 2` on Postgres: whichever worker answers, the browser's DOM
    holds a card for each of the two workers, its own marked, the cluster totals, and the
    usage section with the key's requests."""
    async with SimulatorProcess("node-a") as node:
        config = settings_dict(
            {"node-a": node.url},
            extra={
                "server": {"admin_token": ADMIN_TOKEN},
                "usage": {"flush_interval_seconds": 0.2},
            },
        )
        config["database"] = {"url": database_url, "pool_min_size": 1, "pool_max_size": 4}
        directory = tmp_path / "gateway"
        directory.mkdir()
        gateway = GatewayProcess(config, directory, workers=2)
        gateway.start()
        try:
            async with aiohttp.ClientSession() as session:
                await wait_until(lambda: answers(session, gateway.url), timeout=60, message="up")
                async with session.post(
                    gateway.url + "/v1/chat/completions",
                    data=orjson.dumps(chat_body("Hello, cluster")),
                    headers={"Authorization": f"Bearer {TEST_KEY}"},
                ) as response:
                    assert response.status == 200
                    await response.read()

                async def both_workers_and_the_request() -> bool:
                    async with session.get(
                        gateway.url + "/admin/status",
                        headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                    ) as page:
                        html = await page.text()
                    return html.count("data-worker=") == 2 and 'data-usage-key="team-a"' in html

                await wait_until(both_workers_and_the_request, timeout=30, message="2 workers")
            url = f"http://operator:{ADMIN_TOKEN}@127.0.0.1:{gateway.port}/admin/status"
            run = await run_chromium(tmp_path / "profile-cluster", "--dump-dom", url)
        finally:
            gateway.stop()
    assert run.exit_code == 0, run.stderr[-2000:]
    dom = run.stdout
    assert 'id="cluster-totals"' in dom, dom[:2000]
    cards = re.findall(r'data-worker="[^"]+" data-own="(true|false)"', dom)
    assert sorted(cards) == ["false", "true"]
    pids = set(re.findall(r"pid (\d+)</div>", dom))
    assert len(pids) == 2
    assert '<svg id="usage-chart"' in dom
    assert TEST_KEY not in dom
    assert "Hello, cluster" not in dom
