"""Run one simulated node on a TCP port, including stopping and resuming listening on demand."""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web

from gateway.simulator.app import create_simulator_app
from gateway.simulator.options import SimulatorOptions
from gateway.simulator.state import SimulatorState

REBIND_ATTEMPTS = 100
REBIND_INTERVAL_SECONDS = 0.05

logger = structlog.get_logger(__name__)


class SimulatorServer:
    """Owns the node's runner and listening site; `refuse` closes the port for a while."""

    def __init__(self, options: SimulatorOptions, *, shutdown_timeout: float = 1.0) -> None:
        """Build the node; nothing listens until `start`."""
        self.state = SimulatorState(options)
        self.state.refuse = self.refuse
        self.app = create_simulator_app(self.state)
        # handler_cancellation: a client that goes away cancels its handler, as vLLM aborts it.
        self._runner = web.AppRunner(
            self.app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
        )
        self._host = options.host
        self._port = options.port
        self._site: web.TCPSite | None = None
        self._refusal: asyncio.Task[None] | None = None
        self._listening = asyncio.Event()

    @property
    def name(self) -> str:
        """The node's name."""
        return self.state.options.name

    @property
    def port(self) -> int:
        """The bound port (known once started, also when started on port 0)."""
        return self._port

    @property
    def url(self) -> str:
        """The node's base URL, e.g. `http://127.0.0.1:8001`."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def listening(self) -> bool:
        """Whether the port currently accepts connections."""
        return self._listening.is_set()

    async def start(self) -> None:
        """Listen; with `refuse_seconds` in the options, return only after that pause ended."""
        await self._runner.setup()
        await self._listen()
        if self.state.options.refuse_seconds > 0:
            await self.refuse(self.state.options.refuse_seconds)
            await self.wait_listening()

    async def wait_listening(self) -> None:
        """Return once the port accepts connections."""
        await self._listening.wait()

    async def refuse(self, seconds: float, keep: asyncio.BaseTransport | None = None) -> None:
        """Stop listening and drop open connections now, then listen again after `seconds`.

        The connection `keep` (the caller's own) closes only once its answer has been sent.
        """
        if self._refusal is not None:
            self._refusal.cancel()
            self._refusal = None
        self._listening.clear()
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server
        if server is not None:
            # Open keep-alive connections would otherwise keep reaching a node that is "down".
            for connection in server.connections:
                if keep is not None and connection.transport is keep:
                    connection.close()
                else:
                    connection.force_close()
        self._refusal = asyncio.get_running_loop().create_task(self._listen_after(seconds))

    async def stop(self) -> None:
        """Stop listening, end the requests in flight and release the port."""
        if self._refusal is not None:
            self._refusal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refusal
            self._refusal = None
        await self._runner.cleanup()
        self._site = None
        self._listening.clear()

    async def _listen(self) -> None:
        site = web.TCPSite(self._runner, self._host, self._port, reuse_address=True)
        await site.start()
        self._site = site
        self._port = site.port
        self._listening.set()

    async def _listen_after(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        for attempt in range(1, REBIND_ATTEMPTS + 1):
            try:
                await self._listen()
            except OSError as error:
                logger.warning(
                    "simulator_rebind_failed", port=self._port, attempt=attempt, error=str(error)
                )
                await asyncio.sleep(REBIND_INTERVAL_SECONDS)
            else:
                return
        logger.error("simulator_rebind_gave_up", port=self._port)
