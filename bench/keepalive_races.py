"""Keep-alive races: how many of 500 POSTs fail against upstreams that close kept connections.

Two upstreams (issue 21, D1), each a raw-socket server in a process of its own:

- `idle-close`: closes a connection after 50 ms idle; requests go one at a time, 47-53 ms apart,
  so many are sent just as the upstream closes.
- `close-after-answer`: closes every connection right after its answer, without
  `Connection: close`; 20 requests at a time.

Each is run through the gateway's `UpstreamPool` and through aiohttp's `ClientSession`. The
upstream counts every request id it received: a request that reached it twice is reported.
Run: `gateway bench keepalive_races` (writes bench/results/keepalive_races.json under the label
given by `--label`). To measure another checkout's client, run this file with that checkout first
on PYTHONPATH: `PYTHONPATH=/other/checkout python bench/keepalive_races.py --label before`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from gateway.dispatch.upstream_pool import UpstreamPool

REQUESTS = 500
IDLE_LIMIT = 0.05
CONCURRENCY = 20
RESULTS = Path(__file__).resolve().parent / "results" / "keepalive_races.json"
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
SCENARIOS = ("idle-close", "close-after-answer")


# -- the upstream (its own process)


class Upstream:
    """A raw HTTP/1.1 server that answers every POST with `{}` and closes as its scenario says."""

    def __init__(self, scenario: str) -> None:
        self.scenario = scenario
        self.seen: Counter[bytes] = Counter()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Answer requests on one connection until the scenario closes it."""
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), IDLE_LIMIT)
                except TimeoutError:
                    return  # idle too long (the first scenario's close)
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                    elif name.lower() == b"x-request-id":
                        self.seen[value.strip()] += 1
                await reader.readexactly(length)
                if head.startswith(b"GET /stats"):
                    body = json.dumps(self.stats()).encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
                    writer.write(body)
                    await writer.drain()
                    return
                writer.write(ANSWER)
                await writer.drain()
                if self.scenario == "close-after-answer":
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def stats(self) -> dict[str, int]:
        """Requests received, and those received more than once."""
        return {
            "received": sum(self.seen.values()),
            "twice": sum(1 for count in self.seen.values() if count > 1),
        }


async def run_upstream(scenario: str, port: int) -> None:
    """Serve until killed."""
    upstream = Upstream(scenario)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", port)
    async with server:
        await server.serve_forever()


# -- the clients

Send = Callable[[str], Awaitable[None]]


async def through_pool(url: str, scenario: str) -> dict[str, Any]:
    """The scenario's requests through the gateway's upstream client."""
    pool = UpstreamPool()

    async def send(request_id: str) -> None:
        headers = [("Content-Type", "application/json"), ("x-request-id", request_id)]
        response = await pool.request(
            "POST", url, "/v1/chat/completions", headers, b"{}", connect_timeout=5
        )
        try:
            while await response.read():
                pass
        finally:
            response.release()

    try:
        return await drive(send, scenario)
    finally:
        await pool.close()


async def through_aiohttp(url: str, scenario: str) -> dict[str, Any]:
    """The scenario's requests through aiohttp's `ClientSession` (its defaults)."""
    async with aiohttp.ClientSession() as session:

        async def send(request_id: str) -> None:
            async with session.post(
                url + "/v1/chat/completions",
                data=b"{}",
                headers={"Content-Type": "application/json", "x-request-id": request_id},
            ) as response:
                await response.read()

        return await drive(send, scenario)


async def drive(send: Send, scenario: str) -> dict[str, Any]:
    """Send REQUESTS requests as the scenario says; count the failures by exception."""
    failures: Counter[str] = Counter()
    pace = random.Random(21)
    ids = iter(f"req-{index}" for index in range(REQUESTS))

    async def one(request_id: str) -> None:
        try:
            await send(request_id)
        except Exception as error:  # noqa: BLE001 - every failure is counted, by its class
            failures[type(error).__name__] += 1

    started = time.monotonic()
    if scenario == "idle-close":
        for request_id in ids:
            await one(request_id)
            await asyncio.sleep(pace.uniform(IDLE_LIMIT - 0.003, IDLE_LIMIT + 0.003))
    else:

        async def worker() -> None:
            for request_id in ids:
                await one(request_id)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return {
        "failed": sum(failures.values()),
        "failures": dict(failures),
        "seconds": round(time.monotonic() - started, 2),
    }


async def upstream_stats(url: str) -> dict[str, int]:
    """What the upstream received (asked on a connection of its own)."""
    async with aiohttp.ClientSession() as session, session.get(url + "/stats") as response:
        stats: dict[str, int] = json.loads(await response.read())
        return stats


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


async def measure(scenario: str, client: str) -> dict[str, Any]:
    """One client through one scenario, against an upstream process of its own."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, __file__, "--serve", scenario, "--port", str(port)]
    upstream = subprocess.Popen(command)  # noqa: ASYNC220 - started once, before the load
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        run = through_pool if client == "gateway" else through_aiohttp
        result = await run(url, scenario)
        result["upstream"] = await upstream_stats(url)
        return result
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


async def run_all(clients: list[str]) -> dict[str, Any]:
    """Every scenario through every client asked for."""
    results: dict[str, Any] = {}
    for scenario in SCENARIOS:
        for client in clients:
            result = await measure(scenario, client)
            results[f"{scenario}/{client}"] = result
            print(f"{scenario:20} {client:8} failed {result['failed']:3}/{REQUESTS}", result)
    return results


def main() -> int:
    """Serve one scenario (`--serve`), or measure the clients and record the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--serve", choices=SCENARIOS)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--label", default="gateway")
    parser.add_argument("--clients", default="gateway,aiohttp")
    options = parser.parse_args()
    if options.serve:
        asyncio.run(run_upstream(options.serve, options.port))
        return 0
    results = asyncio.run(run_all(options.clients.split(",")))
    document: dict[str, Any] = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    document["benchmark"] = "keepalive_races"
    document["requests"] = REQUESTS
    runs: dict[str, Any] = document.setdefault("runs", {})
    runs[options.label] = results
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
