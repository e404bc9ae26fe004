"""Fixtures shared by every test folder: gateways served in-process in front of simulators."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack
from typing import Any

import pytest
from aiohttp.test_utils import TestServer

from gateway.app import create_app
from gateway.config import Settings
from tests.support.gateway import build_settings
from tests.support.simulators import InProcessSimulator

# The test Postgres (env URL → testcontainers → embedded) serves every folder.
pytest_plugins = ["tests.support.postgres"]

GatewayFactory = Callable[[Settings], Awaitable[TestServer]]
SimulatorFactory = Callable[..., Awaitable[InProcessSimulator]]


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
