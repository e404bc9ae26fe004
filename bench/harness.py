"""What the benchmarks share: real simulator and gateway processes, readiness, and percentiles."""

from __future__ import annotations

import asyncio
import json
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import aiohttp
import yaml

RESULTS = Path(__file__).resolve().parent / "results"
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def start(command: list[str], log: Path, *, core: int | None = None) -> subprocess.Popen[bytes]:
    """Start a process in the log's folder (an embedded Postgres lands there), output to the log;
    pinned to one core when asked."""
    process = subprocess.Popen(
        command,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        cwd=log.parent,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    if core is not None and core < (os.cpu_count() or 1):
        os.sched_setaffinity(process.pid, {core})
    return process


def stop(processes: list[subprocess.Popen[bytes]]) -> None:
    """Terminate the processes and reap them (kill after a bounded wait)."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def simulator_command(name: str, port: int, *flags: str) -> list[str]:
    """`gateway simulate` for one node."""
    return [
        sys.executable, "-m", "gateway.simulator", "--port", str(port), "--name", name, *flags,
    ]  # fmt: skip


def gateway_command(config: Path, port: int, workers: int = 1) -> list[str]:
    """`gateway serve` on a config file."""
    return [
        sys.executable, "-m", "gateway", "serve", "--config", str(config),
        "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip


async def start_nodes(
    started: list[subprocess.Popen[bytes]], work: Path, names: Sequence[str], *flags: str
) -> dict[str, str]:
    """Start one simulator process per name (into `started`), wait for each; their URLs."""
    urls = {}
    for name in names:
        port = free_port()
        started.append(start(simulator_command(name, port, *flags), work / f"{name}.log"))
        urls[name] = f"http://127.0.0.1:{port}"
    for url in urls.values():
        await wait_ready(url + "/metrics")
    return urls


def providers(urls: Mapping[str, str], model: str) -> list[dict[str, Any]]:
    """A config `providers` list: one provider per node URL, serving `model` under its own name."""
    return [{"name": name, "url": url, "models": {model: model}} for name, url in urls.items()]


def write_config(path: Path, config: Mapping[str, Any]) -> Path:
    """Write a gateway config as YAML."""
    path.write_text(yaml.safe_dump(dict(config)), encoding="utf-8")
    return path


@contextmanager
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    """A list to put started processes in; all are stopped on exit."""
    started: list[subprocess.Popen[bytes]] = []
    try:
        yield started
    finally:
        stop(started)


async def wait_ready(url: str, limit_seconds: float = 60.0) -> None:
    """Poll a URL until it answers below 500 (bounded)."""
    deadline = time.monotonic() + limit_seconds
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(url) as response:
                    if response.status < 500:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError(f"{url} did not come up within {limit_seconds} s")


def summary(latencies_ms: list[float]) -> dict[str, float]:
    """Count, failures (NaN entries), median and p99 of the rest."""
    ok = sorted(value for value in latencies_ms if not math.isnan(value))
    return {
        "requests": len(latencies_ms),
        "failed": len(latencies_ms) - len(ok),
        "median_ms": statistics.median(ok) if ok else math.nan,
        "p99_ms": ok[min(len(ok) - 1, int(len(ok) * 0.99))] if ok else math.nan,
    }


def write_results(name: str, payload: Mapping[str, Any]) -> Path:
    """Write a benchmark's JSON next to the others, with the machine it ran on."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    document = {
        "benchmark": name,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        **payload,
    }
    path.write_text(json.dumps(document, indent=2), encoding="utf-8")
    return path
