"""Operations drills under steady load: key rotation, a refused config, a provider drain and a
rolling restart of three `gateway serve` behind nginx; requests sent, failed, p50/p99 and the
time until each change took effect.

Load: `--clients` per key for six keys through nginx (keep-alive upstreams, like
deploy/nginx.conf), alternately streamed and not, through the real `openai` SDK with retries off.
Each operation is applied to every replica, as an operator rolls a change out.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from affinity_store.embedded import EmbeddedPostgres
from bench.harness import write_results
from bench.launcher import GatewayProcess, SimulatorProcess
from bench.nginx import nginx_binary, running_nginx
from gateway.config_fleet import hash_key
from tests.support.gateway import chat_body, settings_dict
from tests.support.traffic import Outcome, Traffic, summary

KEYS = [f"sk-operations-bench-key-{index:02d}-5e0d7c" for index in range(6)]
KEY_B = "sk-operations-bench-key-b-91c4e2a7"
KEY_C = "sk-operations-bench-key-c-3f8b6d10"
STEADY_SECONDS = 6.0
EFFECT_LIMIT_SECONDS = 60.0
DRAIN_DELAY_SECONDS = 2.0
NGINX_IDLE_SECONDS = 1.0
WORKERS = 2  # per replica


@dataclass
class Fleet:
    """Three replicas behind nginx, and the config they run."""

    gateways: list[GatewayProcess]
    front: str
    config: dict[str, Any]
    session: aiohttp.ClientSession

    def roll_out(self, config: dict[str, Any] | str) -> None:
        """Write the config to every replica and SIGHUP each."""
        for gateway in self.gateways:
            gateway.write_config(config)
            gateway.reload()


async def until(condition: Callable[[], Awaitable[bool]], started: float) -> float:
    """Seconds from `started` until `condition()` holds (bounded)."""
    while time.monotonic() - started < EFFECT_LIMIT_SECONDS:
        if await condition():
            return time.monotonic() - started
        await asyncio.sleep(0.01)
    raise RuntimeError(f"the change did not take effect within {EFFECT_LIMIT_SECONDS} s")


async def status(session: aiohttp.ClientSession, url: str, key: str) -> int:
    """One small completion on a fresh connection; its status."""
    async with session.post(
        url + "/v1/chat/completions",
        data=orjson.dumps(chat_body(max_tokens=1)),
        headers={"Authorization": f"Bearer {key}", "Connection": "close"},
    ) as response:
        await response.read()
        return response.status


async def ready(session: aiohttp.ClientSession, url: str) -> bool:
    """/readyz answers 200 on a fresh connection."""
    try:
        async with session.get(url + "/readyz", headers={"Connection": "close"}) as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


def event_times(fleet: Fleet, event: str) -> list[float]:
    """Unix times of every log line with this event, over all replicas."""
    return [
        datetime.fromisoformat(record["timestamp"]).timestamp()
        for gateway in fleet.gateways
        for record in gateway.events(event)
    ]


async def applied_everywhere(fleet: Fleet, event: str, expected: int, signalled: float) -> float:
    """Seconds from the signal (Unix time) until the last `event` line, once there are
    `expected` in all: when the change took effect in every worker, as they logged it."""

    async def logged() -> bool:
        return len(event_times(fleet, event)) >= expected

    await until(logged, time.monotonic())
    return max(event_times(fleet, event)) - signalled


async def rotate_keys(fleet: Fleet) -> tuple[float, str]:
    """Remove key B and add key C everywhere; then B gets 401 and C 200 on every replica."""
    config = copy.deepcopy(fleet.config)
    config["keys"] = [key for key in config["keys"] if key["id"] != "key-b"]
    config["keys"].append({"id": "key-c", "key_sha256": hash_key(KEY_C), "models": ["*"]})
    fleet.config = config
    expected = len(event_times(fleet, "config_reloaded")) + WORKERS * 3
    signalled = time.time()
    fleet.roll_out(config)
    effect = await applied_everywhere(fleet, "config_reloaded", expected, signalled)
    probes = [status(fleet.session, g.url, key) for g in fleet.gateways for key in (KEY_B, KEY_C)]
    statuses = await asyncio.gather(*(probe for probe in probes for _ in range(3)))
    if statuses != [401, 401, 401, 200, 200, 200] * len(fleet.gateways):
        raise RuntimeError(f"rotation not in effect everywhere: {statuses}")
    return effect, "applied by every worker; then B got 401 and C 200 on every replica"


async def refuse_invalid(fleet: Fleet) -> tuple[float, str]:
    """Roll out a config with errors: every worker refuses it, C is still served."""
    invalid = copy.deepcopy(fleet.config)
    invalid["providers"][0]["url"] = "not a url"
    invalid["keys"][0]["route"] = {"strategy": "fixed", "fixed": "nowhere"}
    # The supervisor and both workers of each replica log the refusal.
    expected = len(event_times(fleet, "config_reload_refused")) + (WORKERS + 1) * 3
    signalled = time.time()
    fleet.roll_out(invalid)
    effect = await applied_everywhere(fleet, "config_reload_refused", expected, signalled)
    for gateway in fleet.gateways:
        if await status(fleet.session, gateway.url, KEY_C) != 200:
            raise RuntimeError("the running config stopped serving key C")
        gateway.write_config(fleet.config)  # the file back to what runs, for the next drill
    return effect, "refused by every worker, every error logged; C still answered 200"


async def drain_provider(fleet: Fleet, traffic: Traffic) -> tuple[float, str]:
    """Mark node-a draining everywhere: no request starts on it, its in-flight ones finish."""
    config = copy.deepcopy(fleet.config)
    config["providers"][0]["draining"] = True
    fleet.config = config
    expected = len(event_times(fleet, "config_reloaded")) + WORKERS * 3
    signalled, started = time.time(), time.monotonic()
    fleet.roll_out(config)
    effect = await applied_everywhere(fleet, "config_reloaded", expected, signalled)
    probed = time.monotonic()
    await asyncio.sleep(STEADY_SECONDS)  # every key sends its next request meanwhile
    late = [o for o in traffic.outcomes if o.started > probed and o.provider == "node-a"]
    if late:
        raise RuntimeError(f"{len(late)} requests started on the draining provider")
    last_end = max((o.ended for o in traffic.outcomes if o.provider == "node-a"), default=started)
    return effect, (
        f"applied by every worker; none started on node-a after, its last in-flight "
        f"request ended {last_end - started:.2f} s after the signal"
    )


async def rolling_restart(fleet: Fleet) -> tuple[float, str]:
    """SIGTERM each replica in turn, start it again, wait until nginx uses it again."""
    started = time.monotonic()
    for gateway in fleet.gateways:
        gateway.terminate()
        await asyncio.to_thread(gateway.wait, 120)
        served = len(gateway.events("request"))
        gateway.start()
        await until(partial(ready, fleet.session, gateway.url), time.monotonic())
        # In turn: the next stops once nginx sends this one traffic again.
        await until(partial(_serves_more, gateway, served), time.monotonic())
    return time.monotonic() - started, "all three replicas restarted and serving through nginx"


async def _serves_more(gateway: GatewayProcess, count: int) -> bool:
    await asyncio.sleep(0.2)  # the check reads the whole log: not in a tight loop
    return len(gateway.events("request")) > count


@asynccontextmanager
async def fleet_of(work: Path, database_url: str) -> AsyncIterator[Fleet]:
    """Three simulators, three `gateway serve --workers 2` and nginx in front."""
    async with AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                SimulatorProcess(name, ["--tokens-per-second", "200", "--base-ttft-ms", "10"])
            )
            for name in ("node-a", "node-b", "node-c")
        ]
        config = settings_dict(
            {node.name: node.url for node in nodes},
            extra={
                "database": {"url": database_url},
                "server": {"drain_delay_seconds": DRAIN_DELAY_SECONDS},
            },
        )
        config["keys"] = [
            {"id": f"user-{index}", "key_sha256": hash_key(key), "models": ["*"]}
            for index, key in enumerate(KEYS)
        ] + [{"id": "key-b", "key_sha256": hash_key(KEY_B), "models": ["*"]}]
        gateways = []
        for index in range(3):
            directory = work / f"gateway-{index}"
            directory.mkdir()
            gateway = GatewayProcess(config, directory, workers=WORKERS)
            stack.callback(gateway.stop)
            gateway.start()
            gateways.append(gateway)
        session = await stack.enter_async_context(aiohttp.ClientSession())
        for gateway in gateways:
            await until(partial(ready, session, gateway.url), time.monotonic())
        ports = [gateway.port for gateway in gateways]
        front = stack.enter_context(
            running_nginx(work / "nginx", ports, upstream_idle_seconds=NGINX_IDLE_SECONDS)
        )
        yield Fleet(gateways, front, config, session)


async def run(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Each drill in turn on one fleet under one steady load."""
    database = EmbeddedPostgres(work / "pgdata")
    database.start()
    rows: dict[str, Any] = {}
    try:
        async with (
            fleet_of(work, database.url) as fleet,
            Traffic(fleet.front, KEYS, clients=options.clients, max_tokens=16) as traffic,
        ):
            await asyncio.sleep(STEADY_SECONDS)
            drills: list[tuple[str, Callable[[], Awaitable[tuple[float, str]]]]] = [
                ("baseline (no change)", _nothing),
                ("rotate keys (B removed, C added) by SIGHUP", lambda: rotate_keys(fleet)),
                ("invalid config refused", lambda: refuse_invalid(fleet)),
                ("drain provider node-a", lambda: drain_provider(fleet, traffic)),
                ("rolling restart of 3 replicas", lambda: rolling_restart(fleet)),
            ]
            for name, drill in drills:
                began = time.monotonic()
                effect, detail = await drill()
                await asyncio.sleep(STEADY_SECONDS)
                ended = time.monotonic()
                window: list[Outcome] = [
                    o for o in traffic.outcomes if began <= o.started and o.ended <= ended
                ]
                failures = [o.error for o in window if not o.ok][:5]
                rows[name] = {
                    **summary(window),
                    "effect_seconds": round(effect, 3),
                    "effect": detail,
                    "first_failures": failures,
                }
                print(_row(name, rows[name]), flush=True)
            total = summary(traffic.outcomes)
    finally:
        database.stop()
    return {"drills": rows, "all_requests": total}


async def _nothing() -> tuple[float, str]:
    return 0.0, "-"


def _row(name: str, row: dict[str, Any]) -> str:
    return (
        f"{name:<46}{row['sent']:>7}{row['failed']:>7}{row['p50_ms']:>9.1f}{row['p99_ms']:>9.1f}"
        f"{row['effect_seconds']:>9.2f}  {row['effect']}"
    )


def main() -> int:
    """Run, print, write."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--clients", type=int, default=2, help="clients per key (6 keys)")
    parser.add_argument("--keep", help="keep logs (gateways, nginx) in this new directory")
    options = parser.parse_args()
    nginx_binary()
    print(f"{'operation':<46}{'sent':>7}{'failed':>7}{'p50 ms':>9}{'p99 ms':>9}{'effect s':>9}")
    if options.keep:
        Path(options.keep).mkdir(parents=True)
        results = asyncio.run(run(options, Path(options.keep)))
    else:
        with tempfile.TemporaryDirectory(prefix="bench-operations-") as work:
            results = asyncio.run(run(options, Path(work)))
    write_results("operations", {"options": {"clients": options.clients}, **results})
    return 0
