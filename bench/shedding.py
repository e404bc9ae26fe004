"""Load shedding: bursts are served whole, sustained overload is shed, closed loops are not.

Run: `gateway bench shedding [--phases bursts,open,closed] [--open-seconds 10] [--no-hog]`.

- Bursts: a gateway (embedded Postgres) whose two simulator nodes answer in ~50 ms gets
  requests written at once on as many open connections (all queued in the gateway together):
  200 at one worker and 1,000 at two, `--repetitions` times each. Goal: none refused.
- Open loop: one worker on core 0 in front of the bench's fast upstream, with a busy process
  beside it on core 0 (`--no-hog` to leave it alone), so its capacity is within the load
  generator's reach on core 1. Capacity is wrk's closed-loop answers/s at c = 128; then
  `bench.load_generator` offers 1.5x and 3x that for `--open-seconds`. Reported: served/s against
  capacity, refusals, and the accepted requests' latency from their intended send time (an upper
  bound of their queueing in the gateway, since the upstream answers at once), and from the moment
  each went out (`accepted_from_write_*`: without the wait in the generator's own queue once its
  4,096 connections are all in use; with the connect, and so with the kernel's accept queue).
- Closed loop: wrk at c = 128 with shedding on and off: answers/s, and refusals.

Writes `bench/results/shedding.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from bench import launcher
from bench.harness import providers, write_results
from bench.launcher import (
    PROJECT_ROOT,
    free_port,
    gateway_command,
    processes,
    spawn,
    stop,
    wait_ready,
    write_config,
)
from bench.throughput_targets import (
    GATEWAY_KEY,
    LOAD_CORE,
    MODEL,
    TARGET_CORE,
    cpu_seconds,
    pinned,
    start_upstream,
)
from gateway.config_fleet import hash_key

LUA = Path(__file__).resolve().parent / "throughput_chat.lua"
BURSTS = ((1, 200), (2, 1000))  # (workers, requests written at once)
OPEN_FACTORS = (1.5, 3.0)
WRK_CONNECTIONS = 128
REQUEST = (
    b'{"model":"' + MODEL.encode() + b'","messages":[{"role":"user","content":"Say hi."}],'
    b'"max_tokens":4}'
)


def raw_request() -> bytes:
    """One chat request that closes its connection after the answer."""
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: gateway\r\n"
        f"Authorization: Bearer {GATEWAY_KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(REQUEST)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + REQUEST


async def burst(port: int, count: int) -> list[int]:
    """Open `count` connections, write a request on each at once; every answer's status."""
    connections = [await asyncio.open_connection("127.0.0.1", port) for _ in range(count)]
    request = raw_request()
    for _, writer in connections:
        writer.write(request)

    async def status(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        raw = await reader.read()
        writer.close()
        return int(raw.split(b" ", 2)[1]) if raw else 0

    async with asyncio.timeout(120):
        return await asyncio.gather(*(status(reader, writer) for reader, writer in connections))


async def workers_listening(log: Path, workers: int, limit_seconds: float = 60.0) -> None:
    """Wait (bounded) until the gateway's log shows `workers` workers started."""
    deadline = asyncio.get_running_loop().time() + limit_seconds
    while log.read_text(encoding="utf-8", errors="replace").count('"worker_started"') < workers:  # noqa: ASYNC240 - a small log, read between sleeps
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"{workers} workers did not start within {limit_seconds} s")
        await asyncio.sleep(0.1)


def gateway_config(folder: Path, port: int, upstreams: Mapping[str, str]) -> Path:
    """A config for one bench gateway on `port` in front of `upstreams` (default shedding)."""
    return write_config(
        folder / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": port},
            "providers": providers(upstreams, MODEL),
            "keys": [{"id": "bench", "key_sha256": hash_key(GATEWAY_KEY)}],
        },
    )


async def bursts(work: Path, repetitions: int) -> list[dict[str, Any]]:
    """Each burst size at its worker count, `repetitions` times: statuses counted."""
    rows = []
    flags = ("--base-ttft-ms", "50")
    async with launcher.simulators(work, ["node-a", "node-b"], *flags) as simulators:
        nodes = {name: node.url for name, node in simulators.items()}
        for workers, count in BURSTS:
            port = free_port()
            folder = work / f"burst-{workers}"
            folder.mkdir()
            config = gateway_config(folder, port, nodes)
            gateway = spawn(gateway_command(config, port, workers), folder / "gateway.log")
            try:
                await wait_ready(f"http://127.0.0.1:{port}/healthz", limit_seconds=120)
                # /healthz answers once one worker listens; a burst before the others do would
                # all go to that one (the first burst of 1,000 measured so was 488 refused).
                await workers_listening(folder / "gateway.log", workers)
                for repetition in range(repetitions):
                    statuses = await burst(port, count)
                    row = {
                        "workers": workers,
                        "requests": count,
                        "repetition": repetition,
                        "answered": statuses.count(200),
                        "refused": len(statuses) - statuses.count(200),
                        "statuses": {str(code): statuses.count(code) for code in set(statuses)},
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
            finally:
                stop(gateway, timeout=60)
    return rows


async def start_worker(
    started: list[subprocess.Popen[bytes]], folder: Path, upstream: int, shedding: bool
) -> tuple[int, list[int]]:
    """One `gateway serve` worker on the target core, living in `folder`; its port and pids."""
    port = free_port()
    config = write_config(
        fresh(folder) / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": port, "workers": 1, "load_shedding": shedding},
            "providers": providers({"fast": f"http://127.0.0.1:{upstream}"}, MODEL),
            "keys": [{"id": "bench", "key_sha256": hash_key(GATEWAY_KEY)}],
        },
    )
    process = spawn(pinned(TARGET_CORE, gateway_command(config, port)), folder / "gateway.log")
    started.append(process)
    await wait_ready(f"http://127.0.0.1:{port}/healthz", limit_seconds=120)
    pids = [process.pid]
    for child in psutil.Process(process.pid).children(recursive=True):
        if "postgres" in " ".join(child.cmdline()):
            os.sched_setaffinity(child.pid, {LOAD_CORE})
        else:
            pids.append(child.pid)
    return port, pids


def fresh(folder: Path) -> Path:
    """`folder`, created."""
    folder.mkdir()
    return folder


def wrk(port: int, seconds: int) -> dict[str, Any]:
    """wrk's closed loop at `WRK_CONNECTIONS`: answers/s, refusals/s, p99."""
    env = {**os.environ, "BENCH_KEY": GATEWAY_KEY, "BENCH_STREAM": "0", "BENCH_MODEL": MODEL}
    command = [
        "wrk", "-t1", f"-c{WRK_CONNECTIONS}", f"-d{seconds}s", "--timeout", "30s",
        "-s", str(LUA), f"http://127.0.0.1:{port}/v1/chat/completions",
    ]  # fmt: skip
    output = subprocess.run(
        pinned(LOAD_CORE, command), env=env, capture_output=True, text=True, check=True
    ).stdout
    line = next(row for row in output.splitlines() if row.startswith("BENCH_RESULT "))
    raw = json.loads(line.removeprefix("BENCH_RESULT "))
    duration = raw["duration_us"] / 1e6
    answered = raw["requests"] - raw["status_errors"]
    return {
        "requests": raw["requests"],
        "answers_per_second": round(answered / duration, 1),
        "refused_per_second": round(raw["status_errors"] / duration, 1),
        "p99_ms": raw["p99_us"] / 1000,
    }


def open_loop(port: int, rate: float, seconds: float) -> dict[str, Any]:
    """`bench.load_generator` at `rate` for `seconds`; its JSON result."""
    command = [
        sys.executable, "-m", "bench.load_generator", "open", "--port", str(port),
        "--rate", str(rate), "--duration", str(seconds), "--model", MODEL,
        "--header", f"Authorization: Bearer {GATEWAY_KEY}",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    output = subprocess.run(
        pinned(LOAD_CORE, command), env=env, capture_output=True, text=True, check=True
    ).stdout
    result: dict[str, Any] = json.loads(output.splitlines()[-1])
    return result


async def shed_count(port: int, limit_seconds: float = 60.0) -> float:
    """The worker's `gateway_requests_shed_total` (asked again while the worker is still at its
    connection cap after a run and refuses the bench's connection too)."""
    deadline = asyncio.get_running_loop().time() + limit_seconds
    while True:
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{port}/metrics") as response,
        ):
            text = await response.text()
        for row in text.splitlines():
            if row.startswith("gateway_requests_shed_total"):
                return float(row.split()[-1])
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"no shed count from the worker within {limit_seconds} s")
        await asyncio.sleep(0.5)


async def one_worker(
    work: Path, phases: set[str], seconds: float, hog: bool
) -> dict[str, list[dict[str, Any]]]:
    """The open-loop and closed-loop phases against one worker."""
    rows: dict[str, list[dict[str, Any]]] = {"open": [], "closed": []}
    with processes() as started:
        upstream = await start_upstream(started, work)
        if "closed" in phases:
            for run, shedding in enumerate((False, True, False, True)):
                port, pids = await start_worker(started, work / f"closed-{run}", upstream, shedding)
                before = cpu_seconds(pids)
                row = {"shedding": shedding, **wrk(port, 5)}
                row["cpu_ms_per_request"] = round(
                    1000 * (cpu_seconds(pids) - before) / max(row["requests"], 1), 3
                )
                print(json.dumps(row), flush=True)
                rows["closed"].append(row)
                stop(started.pop(), timeout=60)
        if "open" in phases:
            port, pids = await start_worker(started, work / "open", upstream, True)
            if hog:
                busy = [sys.executable, "-c", "while True: pass"]
                started.append(spawn(pinned(TARGET_CORE, busy), work / "hog.log"))
            capacity = wrk(port, 5)["answers_per_second"]
            for factor in OPEN_FACTORS:
                shed_before = await shed_count(port)
                result = open_loop(port, capacity * factor, seconds)
                row = {
                    "factor": factor,
                    "capacity_per_second": capacity,
                    "served_per_second": round(result["ok"] / result["seconds"], 1),
                    "served_share_of_capacity": round(
                        result["ok"] / result["seconds"] / capacity, 3
                    ),
                    "shed_by_the_gateway": await shed_count(port) - shed_before,
                    **{
                        name: result.get(name)
                        for name in ("sent", "ok", "shed", "errors", "connections")
                    },
                    **{f"accepted_{name}": result.get(name) for name in ("p50_ms", "p99_ms")},
                    **{
                        f"accepted_from_write_{name}": result.get(f"from_write_{name}")
                        for name in ("p50_ms", "p99_ms")
                    },
                }
                print(json.dumps(row), flush=True)
                rows["open"].append(row)
                await asyncio.sleep(3)  # let the queue drain before the next rate
    return rows


async def run(options: argparse.Namespace) -> dict[str, Any]:
    """Every chosen phase; the results."""
    phases = set(options.phases.split(","))
    with tempfile.TemporaryDirectory(prefix="bench-shedding-") as folder:
        work = Path(folder)
        result: dict[str, Any] = {}
        if "bursts" in phases:
            (work / "bursts").mkdir()
            result["bursts"] = await bursts(work / "bursts", options.repetitions)
        if phases & {"open", "closed"}:
            (work / "worker").mkdir()
            result |= await one_worker(work / "worker", phases, options.open_seconds, options.hog)
    return result


def main(arguments: list[str] | None = None) -> int:
    """Run the phases and write `bench/results/shedding.json`."""
    parser = argparse.ArgumentParser(prog="gateway bench shedding", description=__doc__)
    parser.add_argument("--phases", default="bursts,open,closed")
    parser.add_argument("--repetitions", type=int, default=3)
    parser.add_argument("--open-seconds", type=float, default=10.0)
    parser.add_argument("--no-hog", dest="hog", action="store_false")
    options = parser.parse_args(arguments)
    result = asyncio.run(run(options))
    path = write_results("shedding", {"options": vars(options), **result})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
