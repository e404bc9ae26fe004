"""How many requests per second one simulator process serves on one core, with zero latency.

Run: `python -m bench.simulator_throughput [--requests N] [--concurrency C] [--runs R]`.
The simulator runs in its own process pinned to core 0; this driver (aiohttp, C concurrent
requests) runs pinned to core 1, so the figure is the simulator's, not the driver's. Prints a
table and writes `bench/results/simulator_throughput.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil

RESULTS = Path(__file__).resolve().parent / "results" / "simulator_throughput.json"
LISTENING = re.compile(r"listening on (http://\S+)")
START_TIMEOUT_SECONDS = 15.0
SIMULATOR_CORE = 0
DRIVER_CORE = 1


@dataclass(frozen=True)
class Run:
    """One timed batch of requests."""

    requests: int
    failures: int
    seconds: float
    latencies_ms: tuple[float, ...]
    simulator_cpu_seconds: float

    @property
    def requests_per_second(self) -> float:
        """Completed requests per wall-clock second."""
        return self.requests / self.seconds

    @property
    def requests_per_cpu_second(self) -> float:
        """Requests per second of simulator CPU: its ceiling on one core, whatever else runs."""
        return self.requests / self.simulator_cpu_seconds

    @property
    def simulator_busy(self) -> float:
        """Simulator CPU time over wall time: near 1 means it, not the driver, is the limit."""
        return self.simulator_cpu_seconds / self.seconds


@dataclass(frozen=True)
class ScenarioResult:
    """The median run of one scenario, with its latency percentiles."""

    scenario: str
    requests_per_second: float
    runs_requests_per_second: tuple[float, ...]
    p50_ms: float
    p99_ms: float
    simulator_busy: float
    requests_per_simulator_cpu_second: float
    failures: int


def percentile(values: list[float], fraction: float) -> float:
    """The nearest-rank percentile of `values`."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(fraction * len(ordered)) - 1))]


def pin(pid: int, core: int) -> bool:
    """Pin process `pid` to `core` when the machine has it; True when pinned."""
    if not hasattr(os, "sched_setaffinity") or core >= (os.cpu_count() or 1):
        return False
    os.sched_setaffinity(pid, {core})
    return True


@contextlib.contextmanager
def simulator_process() -> Iterator[tuple[str, psutil.Process, bool]]:
    """Run a zero-latency simulator pinned to one core; yield its URL, process, and pinning."""
    command = [
        sys.executable,
        "-m",
        "gateway.simulator",
        "--port", "0",
        "--name", "bench",
        "--base-ttft-ms", "0",
        "--per-token-ms", "0",
        "--tokens-per-second", "0",
        "--max-num-seqs", "1024",
    ]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        pinned = pin(process.pid, SIMULATOR_CORE)
        yield wait_for_url(process), psutil.Process(process.pid), pinned
    finally:
        process.terminate()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def wait_for_url(process: subprocess.Popen[str]) -> str:
    """The URL from the simulator's listening line; RuntimeError if it never comes."""
    assert process.stdout is not None  # stdout=PIPE above
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        match = LISTENING.search(line)
        if match:
            return match.group(1)
    raise RuntimeError("the simulator did not start")


async def drive(
    url: str,
    payload: bytes,
    simulator: psutil.Process,
    *,
    requests: int,
    concurrency: int,
    stream: bool,
) -> Run:
    """Send `requests` requests with `concurrency` in flight; read every body to its end."""
    remaining = requests
    failures = 0
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=concurrency)
    headers = {"Content-Type": "application/json"}
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal remaining, failures
            while remaining > 0:
                remaining -= 1
                started = time.perf_counter()
                async with session.post(url, data=payload, headers=headers) as response:
                    body = await response.read()
                    if response.status != 200 or (stream and not body.endswith(b"[DONE]\n\n")):
                        failures += 1
                latencies.append((time.perf_counter() - started) * 1000)

        cpu_before = cpu_seconds(simulator)
        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(simulator) - cpu_before
    return Run(requests, failures, seconds, tuple(latencies), cpu)


def cpu_seconds(process: psutil.Process) -> float:
    """User plus system CPU time the process has used so far."""
    times = process.cpu_times()
    return float(times.user + times.system)


async def scenario(
    name: str,
    url: str,
    simulator: psutil.Process,
    arguments: argparse.Namespace,
    *,
    stream: bool,
) -> ScenarioResult:
    """Warm up, then time `arguments.runs` runs and keep the median."""
    body: dict[str, Any] = {
        "model": "bench",
        "messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me a story about a lighthouse keeper."},
        ],
        "max_tokens": arguments.max_tokens,
        "stream": stream,
    }
    payload = json.dumps(body).encode()
    endpoint = f"{url}/v1/chat/completions"
    concurrency = arguments.concurrency
    warm_up = min(1000, arguments.requests)
    await drive(
        endpoint, payload, simulator, requests=warm_up, concurrency=concurrency, stream=stream
    )
    runs = [
        await drive(
            endpoint,
            payload,
            simulator,
            requests=arguments.requests,
            concurrency=concurrency,
            stream=stream,
        )
        for _ in range(arguments.runs)
    ]
    median = sorted(runs, key=lambda run: run.requests_per_second)[len(runs) // 2]
    latencies = list(median.latencies_ms)
    return ScenarioResult(
        scenario=name,
        requests_per_second=round(median.requests_per_second, 1),
        runs_requests_per_second=tuple(round(run.requests_per_second, 1) for run in runs),
        p50_ms=round(percentile(latencies, 0.50), 2),
        p99_ms=round(percentile(latencies, 0.99), 2),
        simulator_busy=round(median.simulator_busy, 2),
        requests_per_simulator_cpu_second=round(median.requests_per_cpu_second, 1),
        failures=sum(run.failures for run in runs),
    )


def print_table(results: list[ScenarioResult]) -> None:
    """A plain-text table of the results."""
    header = (
        f"{'scenario':<16}{'req/s (median)':>16}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'sim CPU':>10}{'req/sim CPU-s':>15}{'failures':>10}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        print(
            f"{result.scenario:<16}{result.requests_per_second:>16.1f}"
            f"{result.p50_ms:>10.2f}{result.p99_ms:>10.2f}"
            f"{result.simulator_busy:>10.0%}"
            f"{result.requests_per_simulator_cpu_second:>15.1f}{result.failures:>10}"
        )


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """The benchmark's flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=10_000, help="requests per run")
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3, help="timed runs; the median is kept")
    parser.add_argument("--max-tokens", type=int, default=16, help="output tokens per answer")
    parser.add_argument("--output", type=Path, default=RESULTS)
    return parser.parse_args(argv)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop when installed, so the driver is as cheap as it can be."""
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up
    except ImportError:
        return None
    return uvloop.new_event_loop


async def run_all(arguments: argparse.Namespace) -> dict[str, Any]:
    """Run both scenarios against one simulator process and collect the report."""
    with simulator_process() as (url, simulator, pinned):
        driver_pinned = pin(0, DRIVER_CORE)
        results = [
            await scenario("non-streaming", url, simulator, arguments, stream=False),
            await scenario("streaming", url, simulator, arguments, stream=True),
        ]
    print_table(results)
    return {
        "benchmark": "simulator_throughput",
        "requests_per_run": arguments.requests,
        "concurrency": arguments.concurrency,
        "runs": arguments.runs,
        "max_tokens": arguments.max_tokens,
        "simulator_pinned_to_core": SIMULATOR_CORE if pinned else None,
        "driver_pinned_to_core": DRIVER_CORE if driver_pinned else None,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "results": [asdict(result) for result in results],
    }


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON report."""
    arguments = parse_arguments(argv)
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        report = runner.run(run_all(arguments))
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {arguments.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
