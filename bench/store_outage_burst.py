"""Bursts of OpenAI SDK calls while the gateway's Postgres is down: none should fail.

Run: `gateway bench store_outage_burst [--burst 200] [--workers 2] [--outage-seconds 12]`.

One Postgres (embedded, of its own), two simulator nodes answering in ~50 ms, and one
`gateway serve` with `--workers` workers. A burst of `--burst` chat calls fired at once through
the `openai` SDK (no retries: every failure is counted) before the outage, then bursts every
2 s while Postgres is stopped for `--outage-seconds` (the first right after the stop), and one
after it is back. Reported per burst: sent, failed (with their error), and the slowest answer.
Writes `bench/results/store_outage_burst.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import openai
from openai.types.chat import ChatCompletionUserMessageParam

from affinity_store.embedded import EmbeddedPostgres
from bench.harness import write_results
from bench.launcher import GatewayProcess
from tests.support.gateway import TEST_KEY, TEST_MODEL, answers, settings_dict
from tests.support.simulators import SimulatorProcess

BURST_EVERY_SECONDS = 2.0
MESSAGE: ChatCompletionUserMessageParam = {"role": "user", "content": "Say hi."}


async def burst(client: openai.AsyncOpenAI, count: int, phase: str) -> dict[str, Any]:
    """`count` chat calls at once; what came back."""

    async def call() -> tuple[str | None, float]:
        started = time.monotonic()
        try:
            await client.chat.completions.create(model=TEST_MODEL, messages=[MESSAGE], max_tokens=4)
        except openai.APIStatusError as error:
            return f"{error.status_code} {error.code}", time.monotonic() - started
        except openai.APIError as error:
            return type(error).__name__, time.monotonic() - started
        return None, time.monotonic() - started

    outcomes = await asyncio.gather(*(call() for _ in range(count)))
    errors = Counter(error for error, _ in outcomes if error is not None)
    row = {
        "phase": phase,
        "sent": count,
        "failed": sum(errors.values()),
        "errors": dict(errors),
        "slowest_seconds": round(max(seconds for _, seconds in outcomes), 3),
    }
    print(row, flush=True)
    return row


async def run(options: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The bursts before, during and after the outage."""
    database = EmbeddedPostgres(work / "pgdata")
    database.start()
    rows: list[dict[str, Any]] = []
    try:
        async with (
            SimulatorProcess("node-a", ["--base-ttft-ms", "50", "--tokens-per-second", "0"]) as a,
            SimulatorProcess("node-b", ["--base-ttft-ms", "50", "--tokens-per-second", "0"]) as b,
        ):
            config = settings_dict(
                {a.name: a.url, b.name: b.url}, extra={"database": {"url": database.url}}
            )
            gateway = GatewayProcess(config, work, workers=options.workers)
            gateway.start()
            try:
                deadline = time.monotonic() + 60
                async with aiohttp.ClientSession() as session:
                    while not (
                        len(gateway.events("worker_started")) == options.workers
                        and await answers(session, gateway.url)
                    ):
                        if time.monotonic() > deadline:
                            raise RuntimeError("the gateway did not come up")
                        await asyncio.sleep(0.1)
                async with openai.AsyncOpenAI(
                    base_url=gateway.url + "/v1", api_key=TEST_KEY, max_retries=0, timeout=60
                ) as client:
                    rows.append(await burst(client, options.burst, "before"))
                    await asyncio.to_thread(database.stop, "fast")
                    stopped = time.monotonic()
                    while time.monotonic() - stopped < options.outage_seconds:
                        rows.append(await burst(client, options.burst, "outage"))
                        await asyncio.sleep(BURST_EVERY_SECONDS)
                    await asyncio.to_thread(database.start)
                    for _ in range(3):
                        rows.append(await burst(client, options.burst, "after"))
                        await asyncio.sleep(BURST_EVERY_SECONDS)
            finally:
                gateway.stop()
    finally:
        database.stop("immediate")
    return rows


def main(arguments: list[str] | None = None) -> int:
    """Run the drill and write `bench/results/store_outage_burst.json`."""
    parser = argparse.ArgumentParser(prog="gateway bench store_outage_burst", description=__doc__)
    parser.add_argument("--burst", type=int, default=200)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--outage-seconds", type=float, default=12.0)
    options = parser.parse_args(arguments)
    with tempfile.TemporaryDirectory(prefix="bench-outage-") as folder:
        rows = asyncio.run(run(options, Path(folder)))
    failed = sum(row["failed"] for row in rows)
    path = write_results(
        "store_outage_burst",
        {
            "options": vars(options),
            "bursts": rows,
            "sent": sum(r["sent"] for r in rows),
            "failed": failed,
        },
    )
    print(f"failed {failed}; wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
