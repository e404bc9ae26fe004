"""Serving: one worker's event loop, and a supervisor of N workers sharing a port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import multiprocessing
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess

import structlog
from aiohttp import web
from prometheus_client import multiprocess

from gateway.app import create_app, create_metrics_app
from gateway.config import Settings
from gateway.connections import ConnectionLimits, GuardedSite
from gateway.database import provisioned
from gateway.observability import configure_logging

logger = structlog.get_logger("gateway.serve")

# Worker restarts back off so a worker that dies at start-up cannot spin the supervisor.
RESTART_BACKOFF_SECONDS = (0.5, 1.0, 2.0, 5.0)
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"


def install_uvloop() -> None:
    """Use uvloop's event loop when it is installed."""
    with contextlib.suppress(ImportError):
        import uvloop  # noqa: PLC0415 - optional dependency

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


async def serve_worker(
    settings: Settings,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    metrics_directory: str | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then stop accepting and drain in-flight requests.

    Connections are guarded by the `server` section's limits (see `gateway.connections`).
    """
    app = create_app(settings, metrics_directory=metrics_directory)
    runner = web.AppRunner(
        app,
        handler_cancellation=True,
        access_log=None,
        shutdown_timeout=settings.server.shutdown_timeout_seconds,
    )
    await runner.setup()
    # Everything allocated by start-up lives as long as the worker: take it out of the cyclic
    # collector's view, or every full collection walks it (measured: 65 ms pauses in the
    # overhead benchmark, none above 7 ms after this).
    gc.collect()
    gc.freeze()
    limits = ConnectionLimits.from_settings(settings.server)
    await GuardedSite(runner, host, port, limits=limits, reuse_port=reuse_port).start()
    metrics_runner = None
    if settings.server.metrics_port is not None:
        metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
        await metrics_runner.setup()
        await GuardedSite(
            metrics_runner, host, settings.server.metrics_port, limits=limits, reuse_port=reuse_port
        ).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    logger.info("worker_started", pid=os.getpid(), host=host, port=port)
    await stop.wait()
    logger.info("worker_draining", pid=os.getpid())
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    logger.info("worker_stopped", pid=os.getpid())


def run_worker(
    settings: Settings, host: str, port: int, reuse_port: bool, metrics_directory: str | None
) -> None:
    """A worker process's entry point."""
    configure_logging()
    install_uvloop()
    asyncio.run(
        serve_worker(
            settings, host, port, reuse_port=reuse_port, metrics_directory=metrics_directory
        )
    )


def serve(settings: Settings, host: str, port: int, workers: int) -> int:
    """Run `workers` processes on one port; forward SIGTERM/SIGINT and restart crashed workers.

    With no database configured, an embedded Postgres runs for as long as the workers do.
    """
    configure_logging()
    with provisioned(settings) as ready:
        if workers == 1:
            run_worker(ready, host, port, reuse_port=False, metrics_directory=None)
            return 0
        with shared_metrics_directory() as directory:
            return Supervisor(ready, host, port, workers, directory).run()


@contextlib.contextmanager
def shared_metrics_directory() -> Iterator[str]:
    """A fresh, empty directory for the workers' metrics, set in the environment for them.

    prometheus-client picks its multiprocess mode from PROMETHEUS_MULTIPROC_DIR when a worker
    imports it, so the variable must be set before the workers start.
    """
    directory = tempfile.mkdtemp(prefix="gateway-metrics-")
    previous = os.environ.get(MULTIPROC_VARIABLE)
    os.environ[MULTIPROC_VARIABLE] = directory
    try:
        yield directory
    finally:
        if previous is None:
            os.environ.pop(MULTIPROC_VARIABLE, None)
        else:
            os.environ[MULTIPROC_VARIABLE] = previous
        shutil.rmtree(directory, ignore_errors=True)


class Supervisor:
    """Starts N worker processes and keeps them running until told to stop."""

    def __init__(
        self, settings: Settings, host: str, port: int, workers: int, metrics_directory: str
    ) -> None:
        self._settings = settings
        self._metrics_directory = metrics_directory
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
            args=(self._settings, self._host, self._port, True, self._metrics_directory),
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
            if process.pid is not None:
                # prometheus-client leaves this function unannotated.
                multiprocess.mark_process_dead(  # type: ignore[no-untyped-call]
                    process.pid, self._metrics_directory
                )
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
