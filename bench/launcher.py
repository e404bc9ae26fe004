"""One launcher for the processes benchmarks and tests run: `gateway serve`, simulators, nginx.

Every process starts in its own process group with its output in a log file; a stop sends
SIGTERM to the leader (a gateway drains its workers itself), waits a bounded time, then kills the
whole group, so nothing outlives the run. Readiness is a bounded poll that fails with the log's
last lines. nginx runs the shipped `deploy/nginx.conf` (see `bench.nginx`). The benchmarks use it
through `gateway bench`, the tests import it; it never imports the tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import aiohttp
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LISTENING_LINE = re.compile(r"^simulator (\S+) listening on (http://\S+)$", re.MULTILINE)
SIMULATOR_START_SECONDS = 10.0
SIMULATOR_STOP_SECONDS = 5.0


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log file ('(no log)' when there is none)."""
    if not path.exists():
        return "(no log)"
    return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])


def spawn(
    command: Sequence[str],
    log: Path,
    *,
    cwd: Path | None = None,
    environment: Mapping[str, str] | None = None,
    core: int | None = None,
) -> subprocess.Popen[bytes]:
    """Start `command` in its own process group, stdout and stderr appended to `log`, in `cwd`
    (default: the log's folder, where an embedded Postgres lands), importing this checkout;
    pinned to one core when asked."""
    with log.open("ab") as output:
        process = subprocess.Popen(
            list(command),
            stdout=output,
            stderr=subprocess.STDOUT,
            cwd=cwd or log.parent,
            env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT), **(environment or {})},
            start_new_session=True,
        )
    if core is not None and core < (os.cpu_count() or 1):
        os.sched_setaffinity(process.pid, {core})
    return process


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def stop(
    process: subprocess.Popen[bytes], timeout: float = 15.0, *, whole_group: bool = False
) -> None:
    """SIGTERM to the leader (to its whole group if asked), a bounded wait, then SIGKILL to the
    whole group; reaped."""
    if process.poll() is None:
        if whole_group:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGTERM)
        else:
            process.terminate()
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(process.pid)
            process.wait(timeout=5)
    _kill_group(process.pid)  # whatever the leader left behind


def stop_all(processes: Sequence[subprocess.Popen[bytes]], timeout: float = 30.0) -> None:
    """Stop several processes: all are asked at once, then each is waited for (bounded)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        stop(process, timeout)


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to put spawned processes in; all are stopped on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        stop_all(started)


async def wait_ready(
    url: str,
    limit_seconds: float = 60.0,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log: Path | None = None,
) -> None:
    """Poll a URL until it answers below 500 (bounded); fail early if `process` exits, with the
    tail of `log`."""
    deadline = time.monotonic() + limit_seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                tail = log_tail(log) if log else ""
                raise RuntimeError(f"{url}: the process exited with {process.returncode}\n{tail}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            await asyncio.sleep(0.1)
    tail = log_tail(log) if log else ""
    raise RuntimeError(f"{url} did not come up within {limit_seconds} s\n{tail}")


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on loopback:port (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listened on port {port} within {timeout} s")


def gateway_command(
    config: Path, port: int, workers: int = 1, pid_file: Path | None = None
) -> list[str]:
    """`gateway serve` on a config file, on loopback."""
    return [
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
        *(["--pid-file", str(pid_file)] if pid_file else []),
    ]  # fmt: skip


def simulator_command(name: str, port: int, *flags: str) -> list[str]:
    """`python -m gateway.simulator` for one node."""
    return [
        sys.executable, "-m", "gateway.simulator", "--port", str(port), "--name", name, *flags,
    ]  # fmt: skip


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write a gateway config as YAML."""
    path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    return path


class GatewayProcess:
    """`gateway serve` as a real process tree on a free loopback port; its config file, log and
    pid file in `directory`."""

    def __init__(
        self,
        config: Mapping[str, Any],
        directory: Path,
        *,
        workers: int = 1,
        environment: Mapping[str, str] | None = None,
        port: int | None = None,
        core: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = directory / "gateway.yaml"
        self.write_config(config)
        self.log_path = directory / "gateway.log"
        self.pid_file = directory / "gateway.pid"
        self._workers = workers
        self._environment = {"PYTHONUNBUFFERED": "1", **(environment or {})}
        self._core = core
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; readiness is for the caller to poll (`ready`)."""
        command = gateway_command(self.config_path, self.port, self._workers, self.pid_file)
        self.process = spawn(command, self.log_path, environment=self._environment, core=self._core)

    async def ready(self, path: str = "/healthz", limit_seconds: float = 60.0) -> None:
        """Poll `path` until it answers below 500 (bounded; fails with the log's tail)."""
        await wait_ready(self.url + path, limit_seconds, process=self.process, log=self.log_path)

    def write_config(self, config: Mapping[str, Any] | str) -> None:
        """Replace the config file (a mapping, or raw text); `reload()` applies it."""
        text = config if isinstance(config, str) else yaml.safe_dump(dict(config))
        self.config_path.write_text(text, encoding="utf-8")

    def reload(self) -> None:
        """Send SIGHUP (reload the config file)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines so far whose event is `name`."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == name:
                    found.append(record)
        return found

    def terminate(self) -> None:
        """Send SIGTERM (graceful drain)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Wait for exit; return the exit code."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop it for good, whatever state it is in (its whole process group)."""
        if self.process is not None:
            stop(self.process)

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


class SimulatorProcess:
    """A node run as `python -m gateway.simulator` in a real process; always cleaned up. Its
    output goes to `log` (by default a temporary file, removed when the object is collected)."""

    def __init__(
        self,
        name: str = "sim",
        arguments: Sequence[str] = (),
        port: int = 0,
        *,
        log: Path | None = None,
        core: int | None = None,
    ) -> None:
        """Describe the process; `arguments` are extra command-line flags."""
        self.name = name
        self.arguments = tuple(arguments)
        self.port = port
        self.url = ""
        self._core = core
        self._scratch: tempfile.TemporaryDirectory[str] | None = None
        if log is None:
            self._scratch = tempfile.TemporaryDirectory(prefix=f"simulator-{name}-")
            log = Path(self._scratch.name) / "simulator.log"
        self.log_path = log
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        """The running process's id."""
        assert self._process is not None, "the simulator process is not running"
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the process ended, else None."""
        return None if self._process is None else self._process.poll()

    async def __aenter__(self) -> Self:
        """Start the process and wait for it to listen."""
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the process, killing it if it does not stop in time."""
        await self.terminate()

    async def start(self) -> None:
        """Spawn the process and wait (bounded) for its listening line; remember its URL and
        port (a restart listens on the same port)."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        command = simulator_command(self.name, self.port, *self.arguments)
        self._process = spawn(command, self.log_path, core=self._core)
        try:
            self.url = await self._listening(offset)
        except BaseException:
            await self.kill()
            raise
        self.port = int(self.url.rsplit(":", 1)[1])

    async def _listening(self, offset: int) -> str:
        assert self._process is not None
        deadline = time.monotonic() + SIMULATOR_START_SECONDS
        while time.monotonic() < deadline:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                match = LISTENING_LINE.search(log.read().decode(errors="replace"))
            if match:
                return match.group(2)
            code = self._process.poll()
            if code is not None:
                tail = log_tail(self.log_path)
                raise RuntimeError(f"simulator {self.name} exited with {code}:\n{tail}")
            await asyncio.sleep(0.02)
        tail = log_tail(self.log_path)
        raise TimeoutError(f"simulator {self.name} did not listen in time:\n{tail}")

    async def terminate(self) -> None:
        """Ask the process to stop (SIGTERM); kill its group after a bounded wait."""
        process = self._process
        if process is not None:
            await asyncio.to_thread(stop, process, SIMULATOR_STOP_SECONDS)

    async def kill(self) -> None:
        """Kill the process at once (SIGKILL), as a crash would, and reap it."""
        process = self._process
        if process is None or process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            process.kill()
        await asyncio.to_thread(process.wait)

    async def restart(self) -> None:
        """Stop the process if it runs, then start it again on the same port."""
        await self.terminate()
        await self.start()


@asynccontextmanager
async def simulators(
    work: Path, names: Sequence[str], *flags: str
) -> AsyncIterator[dict[str, SimulatorProcess]]:
    """One simulator process per name (log `work/<name>.log`), each listening; all stopped on
    exit."""
    async with AsyncExitStack() as stack:
        nodes = {}
        for name in names:
            node = SimulatorProcess(name, flags, log=work / f"{name}.log")
            nodes[name] = await stack.enter_async_context(node)
        yield nodes


@asynccontextmanager
async def gateways(
    work: Path,
    configs: Sequence[Mapping[str, Any]],
    *,
    workers: int = 1,
    environment: Mapping[str, str] | None = None,
    ready_path: str | None = "/healthz",
    limit_seconds: float = 60.0,
) -> AsyncIterator[list[GatewayProcess]]:
    """One `gateway serve` per config, each in `work/gateway-<n>` (so each would keep its own
    embedded Postgres), all started, then each waited for at `ready_path` (None: not waited
    for); all stopped at once on exit."""
    started: list[GatewayProcess] = []
    try:
        for index, config in enumerate(configs):
            directory = work / f"gateway-{index}"
            directory.mkdir(parents=True, exist_ok=True)
            gateway = GatewayProcess(config, directory, workers=workers, environment=environment)
            gateway.start()
            started.append(gateway)
        for gateway in started:
            if ready_path is not None:
                await gateway.ready(ready_path, limit_seconds)
        yield started
    finally:
        await asyncio.to_thread(
            stop_all, [gateway.process for gateway in started if gateway.process is not None]
        )
