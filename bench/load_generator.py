"""Load for `gateway bench throughput`: open loop at a fixed rate, or closed loop at a concurrency.

Run: `python -m bench.load_generator open --port 9001 --rate 2000 --duration 5` (or `closed
--concurrency 32`). Raw asyncio connections on uvloop with HTTP/1.1 keep-alive and one prepared
request, so the generator costs far less per request than the proxies it drives. Open loop: each
request has an intended send time on a fixed schedule; it goes out then on an idle connection (a
new one when none is idle), and its latency runs from that intended time to the last byte of the
answer, so a stalled server is charged for every request it delayed (no coordinated omission);
`from_write_*` are the 200s' latencies from the moment each went out (its connect, for a new
connection), without the wait for a connection once the generator's are all in use.
Only 200s count as `ok` and make the latency percentiles; every other answer or failure is an
error, and 503s (a server shedding load) are also counted as `shed` with percentiles of their own,
timed the same way, so how promptly a refusal arrives is measured too. Prints one JSON line with
the counts and percentiles.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from http import HTTPStatus
from typing import Any, cast

import uvloop

MAX_CONNECTIONS = 4096
DRAIN_SECONDS = 10.0


class Connection(asyncio.Protocol):
    """One keep-alive connection carrying one request at a time; parses the answer's framing."""

    def __init__(self, lost: Callable[[Connection], None]) -> None:
        """Idle until `send`; `lost` is told when the server closes."""
        self._lost = lost
        self._transport: asyncio.Transport | None = None
        self._done: Callable[[int], None] | None = None
        self._buffer = bytearray()
        self._early = b""  # an answer that came before the request went out (a refused connection)
        self._status = 0
        self._length: int | None = None  # body length, or None for chunked
        self._head_seen = False
        self._position = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail the request in flight, if any, and leave the pool."""
        self._transport = None
        self._finish(0)
        self._lost(self)

    @property
    def open(self) -> bool:
        """Whether requests can still go out on this connection."""
        return self._transport is not None and not self._transport.is_closing()

    def send(self, request: bytes, done: Callable[[int], None]) -> None:
        """Write one request; `done(status)` is called when its answer has fully arrived (0:
        the connection was lost first)."""
        assert self._transport is not None
        self._done = done
        self._buffer.clear()
        self._head_seen = False
        self._position = 0
        self._transport.write(request)
        if self._early:
            early, self._early = self._early, b""
            self.data_received(early)

    def data_received(self, data: bytes) -> None:
        """Advance the answer's framing; finish when the body is complete."""
        if self._done is None:
            self._early += data
            return
        self._buffer += data
        if not self._head_seen:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self._buffer[:end]).lower()
            self._status = int(head[9:12])
            self._length = None if b"transfer-encoding: chunked" in head else 0
            for line in head.split(b"\r\n"):
                if line.startswith(b"content-length:"):
                    self._length = int(line[15:])
            self._head_seen = True
            self._position = end + 4
        if self._length is not None:
            if len(self._buffer) - self._position >= self._length:
                self._finish(self._status)
            return
        while True:  # chunked: walk the chunk headers as far as the buffer goes
            line_end = self._buffer.find(b"\r\n", self._position)
            if line_end < 0:
                return
            size = int(bytes(self._buffer[self._position : line_end]).split(b";")[0], 16)
            if size == 0:
                if len(self._buffer) >= line_end + 4:
                    self._finish(self._status)
                return
            following = line_end + 2 + size + 2
            if len(self._buffer) < following:
                return
            self._position = following

    def _finish(self, status: int) -> None:
        done, self._done = self._done, None
        if done is not None:
            done(status)

    def close(self) -> None:
        """Close the connection."""
        if self._transport is not None:
            self._transport.close()


Done = Callable[[int, float], None]


class Pool:
    """Idle keep-alive connections to one server, opened on demand up to a ceiling."""

    def __init__(self, host: str, port: int) -> None:
        """An empty pool."""
        self._host, self._port = host, port
        self._idle: list[Connection] = []
        self._all: set[Connection] = set()
        self._waiting: deque[tuple[bytes, Done]] = deque()
        self.connect_failures = 0
        self.opened = 0  # connections opened (or tried)
        self.connect_seconds: list[float] = []  # how long each successful connect took

    def submit(self, request: bytes, done: Done) -> None:
        """Send on an idle connection, a new one, or queue when at the ceiling. `done(status,
        written)`: the answer's status (0: none) and when the request was written (its connect
        began, for a new connection)."""
        while self._idle:
            connection = self._idle.pop()
            if connection.open:
                self._send(connection, request, done)
                return
        if len(self._all) >= MAX_CONNECTIONS:
            self._waiting.append((request, done))
            return
        asyncio.get_running_loop().create_task(self._open_and_send(request, done))

    async def _open_and_send(self, request: bytes, done: Done) -> None:
        loop = asyncio.get_running_loop()
        connection = Connection(self._lost)
        self._all.add(connection)
        self.opened += 1
        started = time.perf_counter()
        try:
            await loop.create_connection(lambda: connection, self._host, self._port)
            self.connect_seconds.append(time.perf_counter() - started)
        except OSError:
            self._all.discard(connection)
            self.connect_failures += 1
            done(0, started)
            return
        self._send(connection, request, done, started)

    def _send(
        self,
        connection: Connection,
        request: bytes,
        done: Done,
        written: float | None = None,
    ) -> None:
        if written is None:
            written = time.perf_counter()

        def finished(status: int) -> None:
            done(status, written)
            if connection.open:
                if self._waiting:
                    self._send(connection, *self._waiting.popleft())
                else:
                    self._idle.append(connection)

        connection.send(request, finished)

    def _lost(self, connection: Connection) -> None:
        self._all.discard(connection)

    def close(self) -> None:
        """Close every connection."""
        for connection in list(self._all):
            connection.close()


def build_request(options: argparse.Namespace) -> bytes:
    """The one HTTP request every send repeats."""
    body = json.dumps(
        {
            "model": options.model,
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 4,
            "stream": options.stream,
        }
    ).encode()
    head = [
        f"POST {options.path} HTTP/1.1",
        f"Host: {options.host}:{options.port}",
        "Content-Type: application/json",
        f"Content-Length: {len(body)}",
        *options.header,
    ]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def percentiles(latencies: list[float]) -> dict[str, float | None]:
    """p50, p90, p99 and max in milliseconds (None without samples)."""
    ordered = sorted(latencies)

    def at(fraction: float) -> float | None:
        if not ordered:
            return None
        return round(ordered[min(len(ordered) - 1, int(len(ordered) * fraction))] * 1000, 3)

    return {"p50_ms": at(0.5), "p90_ms": at(0.9), "p99_ms": at(0.99), "max_ms": at(1.0)}


async def open_loop(options: argparse.Namespace) -> dict[str, Any]:
    """Send at the intended times for the duration; latency from each intended time."""
    pool, request = Pool(options.host, options.port), build_request(options)
    latencies: list[float] = []
    from_write: list[float] = []  # the served ones', from the moment each went out
    shed_latencies: list[float] = []
    # Per step of intended send time: answers that were 200, 503, or other; slowest 200.
    step = options.timeline_step
    seconds: list[list[float]] = [[0, 0, 0, 0.0] for _ in range(int(options.duration / step) + 1)]
    lags: list[float] = []
    counts = {"sent": 0, "ok": 0, "errors": 0, "shed": 0}
    outstanding: dict[int, float] = {}
    drained = asyncio.Event()
    total = int(options.rate * options.duration)
    start = time.perf_counter() + 0.01

    def finisher(index: int, intended: float) -> Done:
        def done(status: int, written: float) -> None:
            outstanding.pop(index, None)
            if not outstanding and counts["sent"] == total:
                drained.set()
            now = time.perf_counter()
            latency = now - intended
            second = seconds[min(len(seconds) - 1, int((intended - start) / step))]
            if status == HTTPStatus.OK:
                counts["ok"] += 1
                latencies.append(latency)
                from_write.append(now - written)
                second[0] += 1
                second[3] = max(second[3], latency)
                return
            counts["errors"] += 1
            if status == HTTPStatus.SERVICE_UNAVAILABLE:
                counts["shed"] += 1
                shed_latencies.append(latency)
                second[1] += 1
            else:
                second[2] += 1

        return done

    index = 0
    while index < total:
        now = time.perf_counter()
        while index < total and start + index / options.rate <= now:
            intended = start + index / options.rate
            lags.append(now - intended)
            outstanding[index] = intended
            pool.submit(request, finisher(index, intended))
            index += 1
        counts["sent"] = index
        if index < total:
            await asyncio.sleep(max(0.0, start + index / options.rate - time.perf_counter()))
    sent_seconds = time.perf_counter() - start
    if outstanding:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(DRAIN_SECONDS):
                await drained.wait()
    # Unfinished requests count at their age at the drain deadline: a lower bound, never dropped.
    now = time.perf_counter()
    latencies += [now - intended for intended in outstanding.values()]
    pool.close()
    return {
        "mode": "open",
        "rate": options.rate,
        "seconds": round(sent_seconds, 3),
        **counts,
        "unfinished": len(outstanding),
        "connect_failures": pool.connect_failures,
        "connections": pool.opened,
        **{f"connect_{name}": value for name, value in percentiles(pool.connect_seconds).items()},
        "achieved_rate": round(counts["ok"] / sent_seconds, 1),
        **percentiles(latencies),
        **{f"from_write_{name}": value for name, value in percentiles(from_write).items()},
        **{f"shed_{name}": value for name, value in percentiles(shed_latencies).items()},
        "send_lag_p99_ms": percentiles(lags)["p99_ms"],
        "generator_cpu_seconds": round(time.process_time(), 3),
        **(
            {
                "timeline": [
                    {
                        "ok": int(ok),
                        "shed": int(shed),
                        "other": int(other),
                        "max_ms": round(slowest * 1000, 1),
                    }
                    for ok, shed, other, slowest in seconds
                ]
            }
            if options.timeline
            else {}
        ),
    }


async def closed_loop(options: argparse.Namespace) -> dict[str, Any]:
    """`concurrency` connections, each sending its next request when the last answer arrived.

    Requests sent in the first `warmup` seconds (connections opening, the target's first burst)
    are not counted. Besides the run's percentiles, the p99 of each whole second and their
    median, the *steady* p99: one slow second does not make it, as it makes the run's p99.
    """
    loop = asyncio.get_running_loop()
    request = build_request(options)
    samples: list[tuple[float, float]] = []  # (sent, latency)
    counts = {"ok": 0, "errors": 0}
    started = time.perf_counter()
    counted_from = started + options.warmup
    stop_at = counted_from + options.duration

    async def worker() -> None:
        connection = Connection(lambda _connection: None)
        await loop.create_connection(lambda: connection, options.host, options.port)
        while time.perf_counter() < stop_at and connection.open:
            answered: asyncio.Future[int] = loop.create_future()
            sent = time.perf_counter()
            connection.send(request, answered.set_result)
            status = await answered
            if sent < counted_from:
                continue
            if status == HTTPStatus.OK:
                counts["ok"] += 1
                samples.append((sent, time.perf_counter() - sent))
            else:
                counts["errors"] += 1
        connection.close()

    await asyncio.gather(*(worker() for _ in range(options.concurrency)))
    seconds = time.perf_counter() - counted_from
    by_second: dict[int, list[float]] = {}
    for sent, latency in samples:
        by_second.setdefault(int(sent - counted_from), []).append(latency)
    per_second = [
        p99
        for second in sorted(by_second)
        if (p99 := percentiles(by_second[second])["p99_ms"]) is not None
    ]
    return {
        "mode": "closed",
        "concurrency": options.concurrency,
        "seconds": round(seconds, 3),
        **counts,
        "requests_per_second": round(counts["ok"] / seconds, 1),
        **percentiles([latency for _, latency in samples]),
        "p99_per_second_ms": per_second,
        "steady_p99_ms": statistics.median(per_second) if per_second else None,
    }


def main() -> int:
    """Parse the flags, run one load, print its JSON line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("mode", choices=("open", "closed"))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--header", action="append", default=[], help="'Name: value', repeatable")
    parser.add_argument("--model", default="bench-model")
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop: requests/s")
    parser.add_argument("--concurrency", type=int, default=32, help="closed loop: connections")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of sending")
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="closed loop: seconds sent but not counted"
    )
    parser.add_argument(
        "--timeline", action="store_true", help="open loop: also counts per step of sending"
    )
    parser.add_argument("--timeline-step", type=float, default=1.0, help="seconds per step")
    options = parser.parse_args()
    runner = open_loop if options.mode == "open" else closed_loop
    print(json.dumps(uvloop.run(runner(options))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
