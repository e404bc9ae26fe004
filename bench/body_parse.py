"""What a chat body's parse costs the event loop: hostile shapes (1.4 M top-level keys, 2.7 M
empty arrays, 4 M zeros) and honest ones (100k messages, a 9 MB conversation of long messages,
a 1 KiB chat), each read by `read_request` while a 1 ms heartbeat runs on the same loop.

Per body: orjson's own parse (what the loop was held for before), the bound that decides where
it is parsed, where it went, the longest the heartbeat waited (the loop's stall), and the time
to the routing summary. Run `gateway bench body_parse`; writes `bench/results/body_parse.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import orjson

from gateway.edge.body_parse import (
    INLINE_BUDGET_NS,
    close_pool,
    parse_cost_bound_ns,
    read_request,
)
from gateway.edge.endpoints import ENDPOINTS

DEFAULT_OUTPUT = Path(__file__).parent / "results" / "body_parse.json"
CHAT = next(spec for spec in ENDPOINTS if spec.path == "/v1/chat/completions")
OPENING = b'{"model":"m","messages":[{"role":"user","content":"hi"}]'


@dataclass(frozen=True)
class Measurement:
    """One body read `runs` times."""

    body: str
    megabytes: float
    orjson_parse_ms: float  # the old inline cost: the loop held this long
    bound_ms: float
    where: str  # "inline" or "helper"
    loop_stall_ms: float  # the longest heartbeat gap while it was read (median of runs)
    summary_ms: float  # until routing had what it needs (median of runs)


def bodies() -> dict[str, Callable[[], bytes]]:
    """The bodies, built on demand."""
    messages = [
        {"role": "user" if index % 2 == 0 else "assistant", "content": "word, " * 15}
        for index in range(100_000)
    ]
    long_messages = [
        {"role": "user" if index % 2 == 0 else "assistant", "content": "Lorem ipsum dolor. " * 470}
        for index in range(1000)
    ]
    return {
        "1.4M top-level keys": lambda: (
            OPENING + b"," + b",".join(b'"%x":1' % i for i in range(1_400_000)) + b"}"
        ),
        "2.7M empty arrays": lambda: OPENING + b',"x":[' + b",".join([b"[]"] * 2_700_000) + b"]}",
        "4M zeros": lambda: OPENING + b',"x":[' + b",".join([b"0"] * 4_000_000) + b"]}",
        "100k messages": lambda: orjson.dumps({"model": "m", "messages": messages}),
        "9 MB conversation": lambda: orjson.dumps({"model": "m", "messages": long_messages}),
        "1 KiB chat": lambda: orjson.dumps(
            {"model": "m", "messages": [{"role": "user", "content": "x" * 1000}]}
        ),
    }


async def _read_once(body: bytes) -> tuple[float, float]:
    """One read beside a 1 ms heartbeat: (longest gap, time to the summary), in ms."""
    worst = 0.0
    running = True

    async def heartbeat() -> None:
        nonlocal worst
        last = time.perf_counter()
        while running:
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            worst = max(worst, now - last)
            last = now

    beat = asyncio.create_task(heartbeat())
    await asyncio.sleep(0.005)
    started = time.perf_counter()
    await read_request(CHAT, body, 4096)
    took = time.perf_counter() - started
    await asyncio.sleep(0.002)
    running = False
    await beat
    return worst * 1000, took * 1000


async def measure(name: str, body: bytes, runs: int) -> Measurement:
    """Read one body `runs` times (after one warm-up that starts the helper)."""
    parses = []
    for _ in range(runs):
        started = time.perf_counter()
        orjson.loads(body)
        parses.append((time.perf_counter() - started) * 1000)
    bound = parse_cost_bound_ns(body)
    await _read_once(body)
    stalls, summaries = zip(*[await _read_once(body) for _ in range(runs)], strict=True)
    return Measurement(
        body=name,
        megabytes=round(len(body) / 1e6, 2),
        orjson_parse_ms=round(statistics.median(parses), 1),
        bound_ms=round(bound / 1e6, 1),
        where="inline" if bound <= INLINE_BUDGET_NS else "helper",
        loop_stall_ms=round(statistics.median(stalls), 1),
        summary_ms=round(statistics.median(summaries), 1),
    )


async def run(runs: int) -> list[Measurement]:
    """Every body, in order."""
    try:
        return [await measure(name, make(), runs) for name, make in bodies().items()]
    finally:
        close_pool()


def main() -> int:
    """Run, print a table, write the JSON result."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    arguments = parser.parse_args()
    results = asyncio.run(run(arguments.runs))
    print(
        f"{'body':22} {'MB':>6} {'orjson':>8} {'bound':>8} {'where':>7} {'stall':>7} {'ready':>7}"
    )
    for row in results:
        print(
            f"{row.body:22} {row.megabytes:6.2f} {row.orjson_parse_ms:6.1f}ms "
            f"{row.bound_ms:6.1f}ms {row.where:>7} {row.loop_stall_ms:5.1f}ms "
            f"{row.summary_ms:5.1f}ms"
        )
    arguments.output.parent.mkdir(parents=True, exist_ok=True)
    arguments.output.write_text(
        json.dumps(
            {
                "benchmark": "body_parse",
                "python": platform.python_version(),
                "inline_budget_ms": INLINE_BUDGET_NS / 1e6,
                "results": [asdict(row) for row in results],
            },
            indent=2,
        )
        + "\n"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
