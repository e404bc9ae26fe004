"""Serving: one worker's event loop, and a supervisor of N workers sharing a port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import signal
import time
from collections.abc import Callable
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import structlog
from aiohttp import web

from gateway.app import create_app
from gateway.config import Settings
from gateway.database import provisioned
from gateway.observability import configure_logging

logger = structlog.get_logger("gateway.serve")

# Worker restarts back off so a worker that dies at start-up cannot spin the supervisor.
RESTART_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)


def install_uvloop() -> None:
    """Use uvloop's event loop when it is installed."""
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional dependency

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_worker(
    settings: Settings, host: str, port: int, *, reuse_port: bool, ready: Callable[[], None] | None
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and drain in-flight requests."""
    app = create_app(settings)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_seconds,
    )
    await runner.setup()
    site = web.TCPSite(
        runner,
        host,
        port,
        reuse_port=reuse_port,
        backlog=1024,
        shutdown_timeout=settings.server.shutdown_timeout_seconds,
    )
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("worker_started", pid=os.getpid(), host=host, port=port)
    if ready is not None:
        ready()
    await stop.wait()
    logger.info("worker_draining", pid=os.getpid())
    await runner.cleanup()
    logger.info("worker_stopped", pid=os.getpid())


def run_worker(settings: Settings, host: str, port: int, reuse_port: bool) -> None:
    """A worker process's entry point."""
    configure_logging()
    install_uvloop()
    asyncio.run(serve_worker(settings, host, port, reuse_port=reuse_port, ready=None))


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run `workers` processes on one port; forward SIGTERM/SIGINT and restart crashed workers.

    With no database configured, an embedded Postgres runs for as long as the workers do.
    """
    configure_logging()
    with provisioned(settings) as ready:
        if workers == 1:
            run_worker(ready, host, port, reuse_port=False)
            return 0
        return Supervisor(ready, host, port, workers).run()


class Supervisor:
    """Starts N worker processes and keeps them running until told to stop."""

    def __init__(self, settings: Settings, host: str, port: int, workers: int) -> None:
        self._settings = settings
        self._host = host
        self._port = port
        self._workers = workers
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        self._stopping = False
        self._restarts = 0

    def _spawn(self) -> BaseProcess:
        process = self._context.Process(
            target=run_worker,
            args=(self._settings, self._host, self._port, True),
            name="gateway-worker",
        )
        process.start()
        return process

    def _request_stop(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def run(self) -> int:
        """Supervise until a stop signal; return the exit code."""
        previous = {
            signum: signal.signal(signum, self._request_stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            self._processes = [self._spawn() for _ in range(self._workers)]
            logger.info(
                "supervisor_started", pid=os.getpid(), workers=self._workers, port=self._port
            )
            while not self._stopping:
                wait([process.sentinel for process in self._processes], timeout=0.2)
                self._replace_dead()
            return self._shutdown()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _replace_dead(self) -> None:
        for index, process in enumerate(self._processes):
            if process.is_alive() or self._stopping:
                continue
            logger.error("worker_exited", pid=process.pid, exitcode=process.exitcode)
            delay = RESTART_BACKOFF_SECONDS[min(self._restarts, len(RESTART_BACKOFF_SECONDS) - 1)]
            self._restarts += 1
            time.sleep(delay)
            self._processes[index] = self._spawn()

    def _shutdown(self) -> int:
        logger.info("supervisor_stopping", workers=len(self._processes))
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        deadline = time.monotonic() + self._settings.server.shutdown_timeout_seconds + 5
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker_killed", pid=process.pid)
                process.kill()
                process.join()
        return 0
