"""Serving: one worker's event loop, and a supervisor of N workers sharing a port (SO_REUSEPORT)."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import gc
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from pathlib import Path

import structlog
from aiohttp import web
from prometheus_client import multiprocess

from gateway.app import create_app, create_metrics_app
from gateway.config import Settings
from gateway.config_loading import ConfigError, load_config
from gateway.edge.connections import ConnectionLimits
from gateway.edge.site import GuardedSite
from gateway.operations.app_keys import LIFECYCLE, OVERLOAD_GATE, RELOADER, RUNTIME
from gateway.operations.reload import keep_restart_only
from gateway.selection.database import provisioned
from gateway.shared.background import Backoff, log_retry
from gateway.shared.observability import configure_logging

logger = structlog.get_logger("gateway.operations.serve")

# Worker restarts back off so a worker that dies at start-up cannot spin the supervisor.
RESTART_BACKOFF = Backoff((0.5, 1.0, 2.0, 5.0))
MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
# prctl(2) option: the signal this process gets when its parent dies.
PR_SET_PDEATHSIG = 1
PARENT_WATCH_SECONDS = 0.25
# Once the listener is closed: how long connections it handed over may take to start a request.
SETTLE_TIMEOUT_SECONDS = 2.0


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
    config_path: str | None = None,
    parent_pid: int | None = None,
    listening: WorkerFlags | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT, then drain as a lame duck; SIGHUP reloads `config_path`.

    Connections are guarded by the `server` section's limits (see `gateway.edge.site`). With
    `parent_pid`, the worker never outlives that process (see `die_with_parent`). With
    `listening`, the worker sets its flag once it listens, and answers /readyz 200 only once
    every worker's flag is set.
    """
    # Never outlive the supervisor, from the first moment on.
    needs_watchdog = parent_pid is not None and not die_with_parent(parent_pid)
    # Before anything listens: a stop asked for while starting becomes a lame duck, never a
    # kill that drops connections already accepted.
    stop = asyncio.Event()
    # A second Ctrl-C cuts the drain delay short. A repeated SIGTERM does not: service managers
    # that signal the whole process group send one to each worker besides the supervisor's.
    hurry = asyncio.Event()

    def on_interrupt() -> None:
        if stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, on_interrupt)
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
    site = GuardedSite(
        runner, host, port, limits=limits, reuse_port=reuse_port, admission=app[OVERLOAD_GATE]
    )
    await site.start()
    metrics_runner = None
    if settings.server.metrics_port is not None:
        metrics_runner = web.AppRunner(create_metrics_app(app), access_log=None)
        await metrics_runner.setup()
        await GuardedSite(
            metrics_runner, host, settings.server.metrics_port, limits=limits, reuse_port=reuse_port
        ).start()
    if config_path is not None:
        loop.add_signal_handler(signal.SIGHUP, app[RELOADER].reload, config_path)
    # A SIGHUP that arrived during start-up was held (blocked) until the handler above existed.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    watchdog = None
    if needs_watchdog and parent_pid is not None:
        watchdog = asyncio.create_task(_watch_parent(parent_pid), name="parent-watchdog")
    if listening is not None:
        listening.flags[listening.slot] = 1
        app[LIFECYCLE].workers_listening = listening.flags
    logger.info("worker_started", pid=os.getpid(), host=host, port=port)
    await stop.wait()
    await _lame_duck(app, site, hurry)
    await runner.cleanup()
    if metrics_runner is not None:
        await metrics_runner.cleanup()
    if watchdog is not None:
        watchdog.cancel()
    logger.info("worker_stopped", pid=os.getpid())


async def _lame_duck(app: web.Application, site: GuardedSite, hurry: asyncio.Event) -> None:
    """Fail /readyz and close each connection after its answer for the drain delay; then stop
    accepting (serving what the kernel already queued) and let those requests start."""
    server = app[RUNTIME].current.settings.server
    app[LIFECYCLE].draining = True
    logger.info("worker_draining", pid=os.getpid(), drain_delay_seconds=server.drain_delay_seconds)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(hurry.wait(), timeout=server.drain_delay_seconds)
    await site.stop()
    await site.settle(min(server.header_read_timeout_seconds, SETTLE_TIMEOUT_SECONDS))


def die_with_parent(parent_pid: int) -> bool:
    """Ask Linux to SIGKILL this process when its parent dies; False where that is unavailable.

    If the parent is already gone (it died before the request was made), exit now.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != parent_pid:
        os._exit(1)
    return True


async def _watch_parent(parent_pid: int) -> None:
    """Where no parent-death signal exists: exit as soon as the parent is gone."""
    # Nothing announces a parent's death portably: polling the parent pid is the fallback.
    while os.getppid() == parent_pid:  # noqa: ASYNC110
        await asyncio.sleep(PARENT_WATCH_SECONDS)
    logger.error("supervisor_gone", pid=os.getpid())
    os._exit(1)


@dataclass(frozen=True)
class WorkerFlags:
    """The supervisor's shared flags, one per worker (set once that worker listens), and which
    one is this worker's."""

    flags: ctypes.Array[ctypes.c_byte]  # in memory shared by the workers (RawArray)
    slot: int


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process serves, and where."""

    settings: Settings
    host: str
    port: int
    reuse_port: bool
    metrics_directory: str | None = None
    config_path: str | None = None
    parent_pid: int | None = None
    listening: WorkerFlags | None = None


def run_worker(spec: WorkerSpec) -> None:
    """A worker process's entry point."""
    configure_logging()
    install_uvloop()
    asyncio.run(
        serve_worker(
            spec.settings,
            spec.host,
            spec.port,
            reuse_port=spec.reuse_port,
            metrics_directory=spec.metrics_directory,
            config_path=spec.config_path,
            parent_pid=spec.parent_pid,
            listening=spec.listening,
        )
    )


def serve(
    settings: Settings,
    host: str,
    port: int,
    workers: int,
    *,
    config_path: str | None = None,
    pid_file: str | None = None,
) -> int:
    """Run `workers` processes on one port; forward SIGTERM/SIGINT, reload on SIGHUP, restart
    crashed workers. `pid_file` receives this process's pid (for `gateway reload`).

    With no database configured, an embedded Postgres runs for as long as the workers do.
    """
    configure_logging()
    # Held until a handler exists (the supervisor's, or the single worker's), never fatal.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
    with written_pid_file(pid_file), provisioned(settings) as ready:
        if workers == 1:
            run_worker(WorkerSpec(ready, host, port, reuse_port=False, config_path=config_path))
            return 0
        with shared_metrics_directory() as directory:
            return Supervisor(ready, host, port, workers, directory, config_path=config_path).run()


@contextlib.contextmanager
def written_pid_file(path: str | None) -> Iterator[None]:
    """This process's pid in `path` while the block runs (nothing when `path` is None)."""
    if path is None:
        yield
        return
    pid_path = Path(path)
    pid_path.write_text(f"{os.getpid()}\n", encoding="ascii")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if pid_path.read_text(encoding="ascii").strip() == str(os.getpid()):
                pid_path.unlink()


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
    """Starts N worker processes, keeps them running, reloads them, and stops them."""

    def __init__(
        self,
        settings: Settings,
        host: str,
        port: int,
        workers: int,
        metrics_directory: str,
        *,
        config_path: str | None = None,
    ) -> None:
        self._settings = settings
        self._metrics_directory = metrics_directory
        self._host = host
        self._port = port
        self._workers = workers
        self._config_path = config_path
        self._context = multiprocessing.get_context("spawn")
        self._processes: list[BaseProcess] = []
        self._stopping = False
        self._reload_requested = False
        self._reloads = 0
        self._restarts = 0
        # Set by each worker once it listens, never cleared: a restarted worker's slot stays set.
        self._listening = self._context.RawArray("b", workers)

    def _spawn(self, slot: int) -> BaseProcess:
        process = self._context.Process(
            target=run_worker,
            args=(
                WorkerSpec(
                    self._settings,
                    self._host,
                    self._port,
                    reuse_port=True,
                    metrics_directory=self._metrics_directory,
                    config_path=self._config_path,
                    parent_pid=os.getpid(),
                    listening=WorkerFlags(self._listening, slot),
                ),
            ),
            name="gateway-worker",
        )
        # The worker inherits SIGHUP blocked and unblocks it once it can reload: a reload asked
        # for while it starts is applied, never fatal.
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP})
        try:
            process.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        return process

    def _request_stop(self, signum: int, _frame: object) -> None:
        self._stopping = True

    def _request_reload(self, signum: int, _frame: object) -> None:
        self._reload_requested = True

    def run(self) -> int:
        """Supervise until a stop signal; return the exit code."""
        previous = {
            signum: signal.signal(signum, self._request_stop)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._request_reload)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
        try:
            self._processes = [self._spawn(slot) for slot in range(self._workers)]
            logger.info(
                "supervisor_started", pid=os.getpid(), workers=self._workers, port=self._port
            )
            while not self._stopping:
                wait([process.sentinel for process in self._processes], timeout=0.2)
                if self._reload_requested:
                    self._reload_requested = False
                    self._reload()
                self._replace_dead()
            return self._shutdown()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _reload(self) -> None:
        """Validate the config once here (every error logged), then have each worker reload it.

        Workers re-read and re-validate the file themselves, so one edited in between is never
        applied unchecked. A valid config also becomes what restarted workers start with.
        """
        if self._config_path is None:
            logger.warning("reload_ignored", detail="serve was started without a config file")
            return
        self._reloads += 1  # numbered, so a repeated refusal is never dropped as a repeat
        try:
            loaded = load_config(self._config_path)
        except ConfigError as error:
            logger.error(
                "config_reload_refused",
                path=self._config_path,
                errors=[str(problem) for problem in error.problems],
                detail="the running config keeps serving",
                attempt=self._reloads,
            )
        else:
            self._settings, restart_needed = keep_restart_only(self._settings, loaded.settings)
            if restart_needed:
                logger.warning(
                    "config_restart_needed",
                    fields=list(restart_needed),
                    detail="these settings keep their running values until the gateway restarts",
                    attempt=self._reloads,
                )
        logger.info("config_reload_requested", workers=len(self._processes), attempt=self._reloads)
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGHUP)

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
            delay = RESTART_BACKOFF.delay(self._restarts)
            self._restarts += 1
            log_retry("worker-restart", self._restarts, delay, "WorkerExited")
            time.sleep(delay)
            self._processes[index] = self._spawn(index)
            logger.info("worker_restarted", pid=self._processes[index].pid)

    def _shutdown(self) -> int:
        logger.info("supervisor_stopping", workers=len(self._processes))
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        server = self._settings.server
        deadline = (
            time.monotonic()
            + server.drain_delay_seconds
            + SETTLE_TIMEOUT_SECONDS
            + server.shutdown_timeout_seconds
            + 5
        )
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                logger.error("worker_killed", pid=process.pid)
                process.kill()
                process.join()
        return 0
