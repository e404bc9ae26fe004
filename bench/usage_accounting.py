"""Usage accounting's costs: the CPU it adds per request, the store statements per flush, and
the time of `/admin/usage` and the status page over 10,000 keys x 60 minutes of rollups.

Run: gateway bench usage_accounting [--keys 10000] [--minutes 60] [--loops 20000]
- per request: the added work timed in-process (the body splice, reading and taking out a
  stream's usage event, reading a whole answer's usage, the book and the token counters), for
  the fast upstream's canned answers (`bench/fast_upstream.py`);
- statements per flush: one worker's flusher against a throwaway embedded Postgres, with 10 and
  with 5,000 requests over 500 keys between flushes, counted by the driver's query logger (after
  one warm-up flush: a fresh connection asks once about the array types);
- reading: `keys x minutes` rollup rows (one model, one provider, outcome ok), then
  `/admin/usage?since=1h&by=key` and `/admin/status` of a real gateway app on that store, timed
  over HTTP (median of 5).
Prints a table and writes bench/results/usage_accounting.json.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp.test_utils import TestServer

from affinity_store.embedded import EmbeddedPostgres
from affinity_store.migrate import apply_migrations
from affinity_store.postgres import Pool, create_pool
from affinity_store.usage import PostgresUsageStore, Tokens, UsageKey, UsageRow
from bench.fast_upstream import responses
from bench.harness import write_results
from gateway.app import create_app
from gateway.config import Settings
from gateway.config_service import UsageSettings
from gateway.dispatch.usage import StreamUsage, usage_from_body, with_usage_requested
from gateway.dispatch.usage_book import UsageBook, UsageFlusher
from gateway.edge.request_log import RequestMetrics, count_tokens
from gateway.shared.metrics import Metrics

ADMIN_TOKEN = secrets.token_urlsafe(24)
BODY = b'{"model":"bench-model","messages":[{"role":"user","content":"hi"}],"stream":true}'
FILL_BATCH = 20_000


def _body_of(http_response: bytes) -> bytes:
    """The body of a canned HTTP response, chunked framing removed."""
    head, _, body = http_response.partition(b"\r\n\r\n")
    if b"chunked" not in head.lower():
        return body
    pieces = []
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        pieces.append(rest[:size])
        body = rest[size + 2 :]
    return b"".join(pieces)


def per_request_cost(loops: int) -> dict[str, float]:
    """Microseconds per request of each piece of added work, and their sums per kind."""
    plain, _, with_usage, _ = responses()
    whole, stream = _body_of(plain), _body_of(with_usage)
    metrics = RequestMetrics(Metrics())
    book = UsageBook(100_000)
    usage = usage_from_body(whole)
    assert usage is not None

    def splice() -> None:
        with_usage_requested(BODY)

    def strip() -> None:
        reader = StreamUsage(strip=True)
        reader.feed(stream)
        reader.flush()

    def read_whole() -> None:
        usage_from_body(whole)

    def account() -> None:
        book.add(UsageKey("bench", "bench-model", "fast", "ok"), usage)
        count_tokens(metrics, "bench", "bench-model", "fast", usage)

    pieces = {"splice": splice, "stream_strip": strip, "whole_usage": read_whole, "book": account}
    timings = {name: _microseconds(piece, loops) for name, piece in pieces.items()}
    timings["streamed_request"] = timings["splice"] + timings["stream_strip"] + timings["book"]
    timings["whole_request"] = timings["whole_usage"] + timings["book"]
    return timings


def _microseconds(piece: Callable[[], None], loops: int) -> float:
    """The best of 5 runs of `loops` calls, per call, in microseconds."""
    best = float("inf")
    for _ in range(5):
        started = time.perf_counter()
        for _ in range(loops):
            piece()
        best = min(best, time.perf_counter() - started)
    return round(best / loops * 1e6, 2)


async def statements_per_flush(url: str) -> list[dict[str, Any]]:
    """Statements the flusher sends per flush, for a light and a heavy interval, counted by the
    driver's query logger on the flusher's only connection."""
    pool = await create_pool(url, min_size=1, max_size=1, statement_cache_size=0)
    sent: list[str] = []
    try:
        async with pool.acquire() as connection:
            connection.add_query_logger(lambda record: sent.append(record.query))
        store = PostgresUsageStore(pool)
        results = []
        for requests in (10, 5_000):
            book = UsageBook(100_000)
            flusher = UsageFlusher(store, book, UsageSettings())
            flushes = 5
            # A fresh connection first asks the server about the array types once: not counted.
            book.add(UsageKey("warm-up", "m", "p", "ok"), None)
            await flusher.flush()
            sent.clear()
            for _ in range(flushes):
                for index in range(requests):
                    book.add(UsageKey(f"key-{index % 500}", "m", "p", "ok"), None)
                await flusher.flush()
            results.append(
                {"requests_per_interval": requests, "statements_per_flush": len(sent) / flushes}
            )
    finally:
        await pool.close()
    return results


async def fill(pool: Pool, keys: int, minutes: int) -> float:
    """`keys x minutes` rows over the last `minutes` minutes; the seconds it took."""
    store = PostgresUsageStore(pool)
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    started = time.perf_counter()
    batch: list[UsageRow] = []
    for minute in range(minutes):
        at = now - timedelta(minutes=minute)
        for key in range(keys):
            tokens = Tokens(1, 100 + key % 50, 20, (key * 7) % 100)
            batch.append(UsageRow(at, UsageKey(f"key-{key:05d}", "m", "node-a", "ok"), tokens))
            if len(batch) >= FILL_BATCH:
                await store.add_usage(batch, timeout=60)
                batch = []
    await store.add_usage(batch, timeout=60)
    async with pool.acquire() as connection:
        await connection.execute("ANALYZE usage_rollups, usage_span_rollups, usage_minute_totals")
    return time.perf_counter() - started


async def reading_times(url: str) -> dict[str, Any]:
    """Median and slowest milliseconds of `/admin/usage` and `/admin/status` over HTTP."""
    settings = Settings.model_validate(
        {
            "server": {"admin_token": ADMIN_TOKEN},
            "database": {"url": url, "pool_min_size": 1, "pool_max_size": 4},
            "providers": [{"name": "node-a", "url": "http://127.0.0.1:9", "models": {"m": "m"}}],
            "keys": [{"id": "bench", "key_sha256": "0" * 64}],
        }
    )
    server = TestServer(create_app(settings), host="127.0.0.1")
    await server.start_server()
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    results: dict[str, Any] = {}
    try:
        async with aiohttp.ClientSession() as session:

            async def get(path: str) -> Callable[[], Awaitable[int]]:
                async def call() -> int:
                    async with session.get(server.make_url(path), headers=headers) as response:
                        body = await response.read()
                        assert response.status == 200, body[:300]
                        return len(body)

                return call

            for name, path in (
                ("admin_usage", "/admin/usage?since=1h&by=key"),
                ("status_page", "/admin/status"),
            ):
                call = await get(path)
                await call()  # warm: the pool's connections, the statement cache
                times = []
                size = 0
                for _ in range(5):
                    started = time.perf_counter()
                    size = await call()
                    times.append((time.perf_counter() - started) * 1000)
                results[name] = {
                    "median_ms": round(statistics.median(times), 1),
                    "max_ms": round(max(times), 1),
                    "bytes": size,
                }
    finally:
        await server.close()
    return results


async def run(keys: int, minutes: int, loops: int) -> dict[str, Any]:
    """Every measurement, on one throwaway embedded Postgres."""
    cost = per_request_cost(loops)
    with tempfile.TemporaryDirectory(prefix="bench-usage-") as directory:
        server = EmbeddedPostgres(Path(directory) / "pgdata")
        server.start()
        try:
            pool = await create_pool(server.url, min_size=1, max_size=2, statement_cache_size=0)
            try:
                await apply_migrations(pool)
                statements = await statements_per_flush(server.url)
                fill_seconds = await fill(pool, keys, minutes)
            finally:
                await pool.close()
            reading = await reading_times(server.url)
        finally:
            server.stop()
    return {
        "per_request_microseconds": cost,
        "statements_per_flush": statements,
        "rollup_rows": keys * minutes,
        "fill_seconds": round(fill_seconds, 1),
        "reading": reading,
    }


def main() -> int:
    """Parse the flags, measure, print and write the results."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--minutes", type=int, default=60)
    parser.add_argument("--loops", type=int, default=20_000)
    options = parser.parse_args()
    result = asyncio.run(run(options.keys, options.minutes, options.loops))
    print("added CPU per request (us):")
    for name, value in result["per_request_microseconds"].items():
        print(f"  {name:<18} {value:>8.2f}")
    for row in result["statements_per_flush"]:
        print(
            f"statements per flush with {row['requests_per_interval']} requests per interval: "
            f"{row['statements_per_flush']:.2f}"
        )
    print(f"{result['rollup_rows']:,} rollup rows filled in {result['fill_seconds']} s")
    for name, figures in result["reading"].items():
        print(f"  {name:<12} median {figures['median_ms']} ms, max {figures['max_ms']} ms")
    print(f"wrote {write_results('usage_accounting', result)}")
    return 0
