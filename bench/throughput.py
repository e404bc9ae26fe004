"""Throughput per core: direct, a bare aiohttp pass-through, one gateway worker and LiteLLM's proxy.

Run: `gateway bench throughput [--targets direct,bare,gateway,litellm] [--duration 5]
[--repetitions 3] [--quick]`.

Each target runs alone on core 0 (`taskset`); the shared fast upstream and the load generator
run on core 1. Closed loop: wrk with `bench/throughput_chat.lua` at each concurrency (the
bench's own closed-loop generator when wrk is not installed). Open loop: `bench.load_generator`,
which measures from each request's intended send time, stepping the rate up until p99 passes
50 ms. Steady p99: at the highest concurrency, the bench's own closed loop after a second of
warm-up, the median of each second's p99 (wrk's p99 of a whole run can be set by the burst of its
connections opening). Non-streaming and streaming; scenarios interleave the targets and repeat.
CPU per request is the target's CPU time (`/proc/<pid>/stat`) over the requests it answered. Writes
`docs/benchmarks/throughput.json` and `throughput.png` (rate vs p99 per target) and prints the
ratios. LiteLLM is installed by the bench into its own virtual environment under
`~/.cache/affinity-gateway/bench` (pinned version); when that fails (offline), it says so and the
other targets run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from bench.launcher import PROJECT_ROOT, processes
from bench.throughput_report import plot, print_report, summarise
from bench.throughput_targets import (
    DEFAULT_CACHE,
    LITELLM_VERSION,
    MODEL,
    TARGETS,
    Target,
    cpu_seconds,
    install_litellm,
    load_core,
    pinned,
    start_bare,
    start_direct,
    start_gateway,
    start_litellm,
    start_upstream,
)

LUA = Path(__file__).resolve().parent / "throughput_chat.lua"
OUTPUT = PROJECT_ROOT / "docs" / "benchmarks"
P99_LIMIT_MS = 50.0
RUN_TIMEOUT_SECONDS = 120.0
OPEN_START_FRACTION = 1 / 3
MAX_STEPS_DOWN = 4
SETTLE_SECONDS = 15.0
IDLE_SHARE = 0.1
# Seconds of the steady run that are sent but not counted: connections opening, the first burst.
STEADY_WARMUP_SECONDS = 1.0


@dataclass(frozen=True)
class Plan:
    """What to run: targets, loads, lengths and repetitions."""

    targets: tuple[str, ...]
    streaming: tuple[bool, ...]
    concurrencies: tuple[int, ...]
    rates: tuple[float, ...]
    duration: float
    open_duration: float
    repetitions: int
    closed: bool
    open: bool
    use_wrk: bool
    fixed_rates: bool


def closed_loop(target: Target, concurrency: int, stream: bool, plan: Plan) -> dict[str, Any]:
    """One closed-loop run: wrk (or the bench's generator) at `concurrency` for the duration."""
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    if plan.use_wrk:
        seconds = max(1, round(plan.duration))
        command = [
            "wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--timeout", "30s",
            "-s", str(LUA), target.url,
        ]  # fmt: skip
        env |= {"BENCH_KEY": target.key or "", "BENCH_STREAM": "1" if stream else "0"}
        env["BENCH_MODEL"] = MODEL
        output = _run(pinned(load_core(), command), env)
        line = next(row for row in output.splitlines() if row.startswith("BENCH_RESULT "))
        raw = json.loads(line.removeprefix("BENCH_RESULT "))
        errors = sum(raw[name] for name in raw if name.endswith(("errors", "timeouts")))
        ok = raw["requests"] - raw["status_errors"]
        seconds_run = raw["duration_us"] / 1e6
        return {
            "generator": "wrk",
            "ok": ok,
            "errors": errors,
            "refused": raw["status_errors"],  # non-2xx answers: 503s, if the gateway sheds
            "seconds": round(seconds_run, 3),
            "requests_per_second": round(ok / seconds_run, 1),
            **{f"{name}_ms": raw[f"{name}_us"] / 1000 for name in ("p50", "p90", "p99", "max")},
        }
    result = _generator(target, stream, ["closed", "--concurrency", str(concurrency)], plan)
    return {"generator": "python", **result}


def steady_loop(target: Target, concurrency: int, stream: bool, plan: Plan) -> dict[str, Any]:
    """A closed-loop run after a warm-up, for the median of its per-second p99s."""
    extra = ["closed", "--concurrency", str(concurrency), "--warmup", str(STEADY_WARMUP_SECONDS)]
    return {"generator": "python", **_generator(target, stream, extra, plan)}


def open_loop(target: Target, rate: float, stream: bool, plan: Plan) -> dict[str, Any]:
    """One open-loop run at `rate` requests per second."""
    extra = ["open", "--rate", str(rate), "--duration", str(plan.open_duration)]
    return _generator(target, stream, extra, plan)


def _generator(target: Target, stream: bool, extra: list[str], plan: Plan) -> dict[str, Any]:
    command = [
        sys.executable, "-m", "bench.load_generator", *extra, "--port", str(target.port),
        "--path", target.path, "--model", MODEL,
    ]  # fmt: skip
    if "--duration" not in extra:
        command += ["--duration", str(plan.duration)]
    if target.key:
        command += ["--header", f"Authorization: Bearer {target.key}"]
    if stream:
        command.append("--stream")
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    result: dict[str, Any] = json.loads(_run(pinned(load_core(), command), env).splitlines()[-1])
    return result


def _run(command: list[str], env: dict[str, str]) -> str:
    completed = subprocess.run(
        command, capture_output=True, env=env, timeout=RUN_TIMEOUT_SECONDS, check=False
    )
    if completed.returncode != 0:
        detail = completed.stderr.decode(errors="replace")[-2000:]
        raise RuntimeError(f"{command[0]} exited {completed.returncode}: {detail}")
    return completed.stdout.decode()


def measured(target: Target, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run a load against the target and add the target's CPU per answered request."""
    before, started = cpu_seconds(target.pids), time.monotonic()
    result = run()
    cpu, wall = cpu_seconds(target.pids) - before, time.monotonic() - started
    result["target_cpu_seconds"] = round(cpu, 3)
    result["target_busy"] = round(cpu / wall, 3)
    ok = result["ok"]
    result["cpu_us_per_request"] = round(cpu / ok * 1e6, 1) if ok else None
    result["settle_seconds"] = settle(target)
    return result


def failed_step(result: dict[str, Any]) -> bool:
    """An open-loop step past capacity: p99 over the limit, errors or unfinished requests."""
    p99 = result.get("p99_ms")
    errors = result["errors"] + result.get("unfinished", 0)
    return p99 is None or p99 > P99_LIMIT_MS or errors > 0.01 * max(1, result["sent"])


async def start_targets(
    plan: Plan, started: list[Any], work: Path, cache: Path
) -> tuple[dict[str, Target], dict[str, str]]:
    """Start the shared upstream and every planned target; notes on any that could not start."""
    upstream = await start_upstream(started, work)
    running: dict[str, Target] = {}
    notes: dict[str, str] = {}
    for name in plan.targets:
        if name == "direct":
            running[name] = await start_direct(started, work)
        elif name == "bare":
            running[name] = await start_bare(started, work, upstream)
        elif name == "gateway":
            running[name] = await start_gateway(started, work, upstream)
        elif name == "litellm":
            executable, note = await asyncio.to_thread(install_litellm, cache)
            notes[name] = note
            if executable is None:
                print(f"litellm: skipped, {note}", flush=True)
                continue
            try:
                running[name] = await start_litellm(started, work, upstream, executable)
            except RuntimeError as error:
                notes[name] = f"did not start: {error}"
                print(f"litellm: skipped, {notes[name]}", flush=True)
    return running, notes


def execute(plan: Plan, running: dict[str, Target]) -> list[dict[str, Any]]:
    """Every scenario, targets interleaved within each, repeated; one row per run.

    The open loop steps through the rate grid from a third of the target's best closed-loop rate
    in the same repetition (so a slow target does not start far past its capacity) until a step
    fails; after every run the target is left to go idle before the next one starts.
    """
    rows: list[dict[str, Any]] = []
    for target in running.values():  # warm connections, caches and code paths
        for stream in plan.streaming:
            closed_loop(target, 8, stream, plan)
    for repetition in range(1, plan.repetitions + 1):
        for stream in plan.streaming:
            base = {"repetition": repetition, "streaming": stream}
            best: dict[str, float] = {}
            for concurrency in plan.concurrencies if plan.closed else ():
                for name, target in running.items():
                    result = measured(
                        target, partial(closed_loop, target, concurrency, stream, plan)
                    )
                    rows.append(
                        {**base, "target": name, "kind": "closed", "concurrency": concurrency}
                        | result
                    )
                    best[name] = max(best.get(name, 0.0), result["requests_per_second"])
                    _progress(rows[-1])
            steady = max(plan.concurrencies)
            for name, target in running.items() if plan.closed else ():
                result = measured(target, partial(steady_loop, target, steady, stream, plan))
                rows.append(
                    {**base, "target": name, "kind": "steady", "concurrency": steady} | result
                )
                _progress(rows[-1])
            for name, target in running.items() if plan.open else ():
                floor = best.get(name, 0.0) * OPEN_START_FRACTION
                for result in open_steps(target, stream, plan, floor):
                    rows.append({**base, "target": name, "kind": "open"} | result)
                    _progress(rows[-1])
    return rows


def step_rates(plan: Plan, floor: float) -> tuple[list[float], list[float]]:
    """The open loop's rates: up the grid from `floor` until a step fails; when the very first
    one fails, down the grid below it (at most MAX_STEPS_DOWN) until one passes."""
    if plan.fixed_rates:
        return list(plan.rates), []
    up = [rate for rate in plan.rates if rate >= floor]
    down = [rate for rate in plan.rates if rate < floor][::-1][:MAX_STEPS_DOWN]
    return up, down


def open_steps(target: Target, stream: bool, plan: Plan, floor: float) -> Iterator[dict[str, Any]]:
    """Open-loop steps up the rate grid until one fails; down it until one passes when the first
    failed."""
    up, down = step_rates(plan, floor)
    first_failed = not up
    for index, rate in enumerate(up):
        result = measured(target, partial(open_loop, target, rate, stream, plan))
        yield result
        if failed_step(result):
            first_failed = index == 0
            break
    for rate in down if first_failed else ():
        result = measured(target, partial(open_loop, target, rate, stream, plan))
        yield result
        if not failed_step(result):
            break


def settle(target: Target) -> float:
    """Wait (bounded) until the target stops using CPU: a backlog left by an overloaded run
    must not run on the core during the next target's measurement."""
    started = time.monotonic()
    while time.monotonic() < started + SETTLE_SECONDS:
        before = cpu_seconds(target.pids)
        time.sleep(0.25)
        if cpu_seconds(target.pids) - before <= 0.25 * IDLE_SHARE:
            break
    return round(time.monotonic() - started, 2)


def _progress(row: dict[str, Any]) -> None:
    load = f"rate={row['rate']:g}" if row["kind"] == "open" else f"c={row['concurrency']}"
    rate = row.get("requests_per_second", row.get("achieved_rate"))
    p99 = (
        f"steady p99 {row['steady_p99_ms']}" if row["kind"] == "steady" else f"p99 {row['p99_ms']}"
    )
    print(
        f"  rep {row['repetition']} {'stream' if row['streaming'] else 'plain '} "
        f"{row['target']:<8} {row['kind']:<6} {load:<12} {rate:>9} req/s  "
        f"{p99} ms  cpu/req {row['cpu_us_per_request']} us",
        flush=True,
    )


def make_plan(options: argparse.Namespace) -> Plan:
    """The plan from the flags; `--quick` is the few-second smoke run."""
    quick = options.quick
    targets = tuple(
        name.strip()
        for name in (
            options.targets or ("direct,bare,gateway" if quick else ",".join(TARGETS))
        ).split(",")
        if name.strip()
    )
    unknown = set(targets) - set(TARGETS)
    if unknown:
        raise SystemExit(f"unknown targets: {', '.join(sorted(unknown))}")
    if options.rates:
        rates = tuple(float(rate) for rate in options.rates.split(","))
    elif quick:
        rates = (100.0, 200.0)
    else:
        rates = tuple(
            round(options.start_rate * options.rate_factor**step)
            for step in range(64)
            if options.start_rate * options.rate_factor**step <= options.max_rate
        )
    duration = options.duration if options.duration is not None else (1.0 if quick else 5.0)
    streaming = {"off": (False,), "on": (True,), "both": (False, True)}[
        options.streaming or ("off" if quick else "both")
    ]
    concurrencies = options.concurrency or ("8,32" if quick else "8,32,128")
    return Plan(
        targets=targets,
        streaming=streaming,
        concurrencies=tuple(int(value) for value in concurrencies.split(",")),
        rates=rates,
        duration=duration,
        open_duration=options.open_duration or duration,
        repetitions=options.repetitions or (1 if quick else 3),
        closed=options.loop in ("closed", "both"),
        open=options.loop in ("open", "both"),
        use_wrk=shutil.which("wrk") is not None and not options.no_wrk,
        fixed_rates=options.rates is not None or quick,
    )


def parse(arguments: list[str] | None = None) -> argparse.Namespace:
    """The command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--targets", help=f"comma-separated, of {','.join(TARGETS)}")
    parser.add_argument("--duration", type=float, help="seconds per closed-loop run (default 5)")
    parser.add_argument("--open-duration", type=float, help="seconds per open-loop step")
    parser.add_argument("--repetitions", type=int, help="interleaved repetitions (default 3)")
    parser.add_argument("--concurrency", help="closed-loop concurrencies (default 8,32,128)")
    parser.add_argument("--rates", help="open-loop rates to step through, e.g. 500,1000")
    parser.add_argument("--start-rate", type=float, default=50.0, help="open-loop grid start")
    parser.add_argument("--rate-factor", type=float, default=1.4)
    parser.add_argument("--max-rate", type=float, default=25_000.0)
    parser.add_argument("--streaming", choices=("off", "on", "both"), help="default both")
    parser.add_argument("--loop", choices=("closed", "open", "both"), default="both")
    parser.add_argument("--no-wrk", action="store_true", help="the bench's own closed loop")
    parser.add_argument("--quick", action="store_true", help="a few-second smoke run")
    parser.add_argument("--output-dir", type=Path, default=OUTPUT)
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE, help="LiteLLM's venv")
    return parser.parse_args(arguments)


async def run(plan: Plan, cache: Path) -> dict[str, Any]:
    """Start everything, run the plan, stop everything; the JSON document."""
    with tempfile.TemporaryDirectory() as folder, processes() as started:
        running, notes = await start_targets(plan, started, Path(folder), cache)
        rows = await asyncio.to_thread(execute, plan, running)
    return {
        "benchmark": "throughput",
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        },
        "plan": {
            **{name: value for name, value in plan.__dict__.items() if name != "use_wrk"},
            "closed_loop_generator": "wrk" if plan.use_wrk else "python",
            "p99_limit_ms": P99_LIMIT_MS,
            "litellm_version": LITELLM_VERSION,
        },
        "targets_run": list(running),
        "notes": notes,
        "runs": rows,
        "summary": summarise(rows),
    }


def main(arguments: list[str] | None = None) -> int:
    """Run the benchmark, print the table and ratios, write the JSON and the plot."""
    options = parse(arguments)
    plan = make_plan(options)
    print(
        f"throughput: {', '.join(plan.targets)}; closed loop with "
        f"{'wrk' if plan.use_wrk else 'the bench generator (wrk not installed)'}",
        flush=True,
    )
    document = asyncio.run(run(plan, options.cache_dir))
    options.output_dir.mkdir(parents=True, exist_ok=True)
    path = options.output_dir / "throughput.json"
    path.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print_report(document)
    picture = plot(document, options.output_dir / "throughput.png")
    print(f"wrote {path}" + (f" and {picture}" if picture else " (no plot: matplotlib missing)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
