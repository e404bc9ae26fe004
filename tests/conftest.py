"""Fixtures shared by every test folder: gateways served in-process in front of simulators."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Settings
from tests.support.gateway import build_settings
from tests.support.simulators import InProcessSimulator
from tests.support.vllm import VllmNode

# The test Postgres (env URL → testcontainers → embedded) serves every folder.
pytest_plugins = ["tests.support.postgres"]

GatewayFactory = Callable[[Settings], Awaitable[TestServer]]
SimulatorFactory = Callable[..., Awaitable[InProcessSimulator]]
VLLM_START_SECONDS: list[float] = []


@pytest.fixture
async def exit_stack() -> AsyncIterator[AsyncExitStack]:
    """An exit stack closed after the test, for servers the test starts."""
    async with AsyncExitStack() as stack:
        yield stack


@pytest.fixture
def start_simulator(exit_stack: AsyncExitStack) -> SimulatorFactory:
    """Start an in-process simulator on a free loopback port; stopped after the test."""

    async def start(name: str = "sim", **options: Any) -> InProcessSimulator:
        return await exit_stack.enter_async_context(InProcessSimulator(name, **options))

    return start


@pytest.fixture
def start_gateway(exit_stack: AsyncExitStack) -> GatewayFactory:
    """Serve a gateway app on a free loopback port, cancelling handlers on client disconnect."""

    async def start(settings: Settings) -> TestServer:
        server = TestServer(create_app(settings), host="127.0.0.1", handler_cancellation=True)
        await server.start_server()
        exit_stack.push_async_callback(server.close)
        return server

    return start


@pytest.fixture
async def one_node(
    start_simulator: SimulatorFactory, start_gateway: GatewayFactory
) -> tuple[InProcessSimulator, TestServer]:
    """One instant simulator behind a gateway."""
    node = await start_simulator("node-a")
    server = await start_gateway(build_settings({"node-a": node.url}))
    return node, server


@pytest.fixture(scope="session")
def vllm_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VllmNode]:
    """One real vLLM node serving the tiny model for the whole session (fails, never skips,
    when `scripts/setup-vllm` has not run)."""
    directory = tmp_path_factory.mktemp("vllm")
    url = os.environ.get("GATEWAY_TEST_VLLM_URL")
    node = VllmNode.running_at(url, directory) if url else VllmNode(directory)
    try:
        node.start()
        VLLM_START_SECONDS.append(node.start_seconds)
        yield node
    finally:
        node.stop()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say how long the session's vLLM node took to start, when one ran."""
    for seconds in VLLM_START_SECONDS:
        terminalreporter.write_line(f"vLLM node ready in {seconds:.1f} s")
