"""Locality on real vLLM nodes: vLLM's own prefix-cache hit rate under each way of routing.

Run: `gateway bench locality --engine vllm [--users 12] [--turns 6] [--workers 4] [--processes 8]`
(needs `scripts/setup-vllm`). Three vLLM CPU nodes serve the tiny model, each with a KV cache of
`--kv-blocks` blocks of 32 tokens: about a third of the users' contexts, enough when every user
sticks to one node, not when users wander. Every user has a long private system prompt and a
growing conversation; the users run interleaved, each request on a new connection (so requests
spread over workers and processes). Phases, each on emptied node caches and cold gateways:
- one process: one `gateway serve --workers W` (its workers share its embedded Postgres);
- 8 processes: that many gateway processes behind the shipped nginx, one shared Postgres;
- per-process: the same 8 processes, each keeping bindings to itself (its own Postgres);
- any-node: no stickiness, every request to whichever node the gateway picks;
- one key: every user behind one application key (`affinity.scope: key`), one process;
- one key, conversations: the same with `affinity.scope: conversation`, one process;
- one key, conversations, 8 processes: that, through 8 processes behind nginx.
The one-key phases run when asked for (`--phase`).
Reported per phase from vLLM's `/metrics` (`vllm:prefix_cache_hits_total` over
`vllm:prefix_cache_queries_total`), from `usage.prompt_tokens_details.cached_tokens`, the time to
first token p50/p90, and the share of users whose turns all landed on one node. Writes
`bench/results/locality_vllm.json` and `docs/benchmarks/locality_vllm.png`.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from affinity_store.embedded import EmbeddedPostgres
from bench import launcher
from bench.harness import write_results
from bench.launcher import PROJECT_ROOT
from bench.nginx import running_nginx
from gateway.config_fleet import hash_key
from tests.support.vllm import VLLM_MODEL, VllmNode, prefix_cache_counters, reset_prefix_cache

MODEL = "tiny-llama"
PHASES = ("one process", "8 processes", "per-process", "any-node")
ONE_KEY_PHASES = ("one key", "one key, conversations", "one key, conversations, 8 processes")
APP_KEY = "sk-locality-app"


def key_of(phase: str, user: int) -> str:
    """The client key a user sends in a phase: its own, or the application's."""
    return APP_KEY if phase in ONE_KEY_PHASES else f"sk-locality-{user}"


def processes_of(phase: str) -> str:
    """How the phase's gateways run: `one` process, `shared` (8 on one Postgres) or `own`."""
    if phase in {"one process", "one key", "one key, conversations"}:
        return "one"
    return "own" if phase == "per-process" else "shared"


PLOT = PROJECT_ROOT / "docs" / "benchmarks" / "locality_vllm.png"


def gateway_config(
    nodes: Mapping[str, str], options: argparse.Namespace, phase: str
) -> dict[str, Any]:
    """The gateways' config for a phase: the nodes, the keys, the model's stickiness and scope."""
    keys = (
        [{"id": "app", "key_sha256": hash_key(APP_KEY)}]
        if phase in ONE_KEY_PHASES
        else [
            {"id": f"user-{index}", "key_sha256": hash_key(f"sk-locality-{index}")}
            for index in range(options.users)
        ]
    )
    scope = "conversation" if "conversations" in phase else "key"
    return {
        "providers": [
            {"name": name, "url": url, "models": {MODEL: VLLM_MODEL}} for name, url in nodes.items()
        ],
        "keys": keys,
        "affinity": {"lookup_timeout_ms": options.lookup_timeout_ms, "scope": scope},
        "models": [{"name": MODEL, "stickiness": "none" if phase == "any-node" else "shared"}],
        "server": {"drain_delay_seconds": 0, "shutdown_timeout_seconds": 5},
    }


@asynccontextmanager
async def gateways(
    work: Path, phase: str, nodes: Mapping[str, str], options: argparse.Namespace
) -> AsyncIterator[str]:
    """Cold gateways for one phase; yields the URL the users call."""
    config = gateway_config(nodes, options, phase)
    async with AsyncExitStack() as stack:
        if processes_of(phase) == "one":
            one = launcher.gateways(work, [config], workers=options.workers, limit_seconds=120)
            (gateway,) = await stack.enter_async_context(one)
            yield gateway.url
            return
        if processes_of(phase) == "shared":
            database = EmbeddedPostgres(work / "shared-pgdata")
            database.start()
            stack.callback(database.stop)
            config["database"] = {"url": database.url, "pool_min_size": 1, "pool_max_size": 2}
        # per-process: each gateway in its own folder, so with its own Postgres
        many = launcher.gateways(work, [config] * options.processes, limit_seconds=120)
        ports = [gateway.port for gateway in await stack.enter_async_context(many)]
        with running_nginx(work / "nginx", ports) as front:
            yield front


def system_prompt(user: int, words: int) -> str:
    """A user's long private system prompt."""
    return f"You are the assistant of user {user}. " + " ".join(
        f"fact {user} {index}" for index in range(words)
    )


async def conversation(
    front: str, user: int, options: argparse.Namespace, key: str
) -> list[dict[str, Any]]:
    """One user's turns in order, each streamed on a new connection: node, TTFT, usage."""
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": system_prompt(user, options.prompt_words)}
    ]
    turns = []
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session:
        for turn in range(options.turns):
            messages.append({"role": "user", "content": f"question {turn} from user {user}"})
            body = {
                "model": MODEL,
                "messages": messages,
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
            started = time.perf_counter()
            first: float | None = None
            text: list[str] = []
            usage: dict[str, Any] = {}
            async with session.post(
                front + "/v1/chat/completions",
                json=body,
                headers={"Authorization": f"Bearer {key}"},
            ) as response:
                assert response.status == 200, await response.text()
                node = response.headers.get("x-gateway-provider", "?")
                async for line in response.content:
                    if not line.startswith(b"data: {"):
                        continue
                    chunk = orjson.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        if first is None:
                            first = time.perf_counter()
                        text.append(choice["delta"].get("content") or "")
                    usage = chunk.get("usage") or usage
            messages.append({"role": "assistant", "content": "".join(text)})
            ttft = ((first or time.perf_counter()) - started) * 1000
            details = usage.get("prompt_tokens_details") or {}
            turns.append(
                {
                    "node": node,
                    "ttft_ms": ttft,
                    "prompt_tokens": usage.get("prompt_tokens", 0),
                    "cached_tokens": details.get("cached_tokens") or 0,
                }
            )
    return turns


def percentile(values: list[float], share: float) -> float:
    """The value below which `share` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(len(ordered) * share))], 1)


async def run_phase(
    work: Path, phase: str, nodes: Mapping[str, str], options: argparse.Namespace
) -> dict[str, Any]:
    """One phase: empty the nodes' caches, run every user, read the counters' increase."""
    async with aiohttp.ClientSession() as session:
        for url in nodes.values():
            await reset_prefix_cache(session, url)
        before = [await prefix_cache_counters(session, url) for url in nodes.values()]
        async with gateways(work, phase, nodes, options) as front:
            outcomes = await asyncio.gather(
                *(
                    conversation(front, user, options, key_of(phase, user))
                    for user in range(options.users)
                )
            )
        after = [await prefix_cache_counters(session, url) for url in nodes.values()]

    def increase(name: str) -> float:
        return sum(
            end.get(name, 0.0) - start.get(name, 0.0)
            for start, end in zip(before, after, strict=True)
        )

    hits, queries = (
        increase("vllm:prefix_cache_hits_total"),
        increase("vllm:prefix_cache_queries_total"),
    )
    turns = [turn for outcome in outcomes for turn in outcome]
    shares = [
        Counter(turn["node"] for turn in outcome).most_common(1)[0][1] / len(outcome)
        for outcome in outcomes
    ]
    ttfts = [turn["ttft_ms"] for turn in turns]
    per_node = Counter(turn["node"] for turn in turns)
    even = len(turns) / len(nodes)
    prompt = sum(turn["prompt_tokens"] for turn in turns)
    return {
        "requests": len(turns),
        "vllm_prefix_cache_hit_rate": round(hits / queries, 4) if queries else 0.0,
        "vllm_prefix_cache_queries": int(queries),
        "cached_tokens_share": round(sum(t["cached_tokens"] for t in turns) / prompt, 4)
        if prompt
        else 0.0,
        "users_on_one_node": round(sum(share == 1.0 for share in shares) / len(shares), 3),
        "requests_per_node": dict(sorted(per_node.items())),
        "busiest_node_over_even": round(max(per_node.values()) / even, 3),
        "mean_share_on_one_node": round(statistics.fmean(shares), 3),
        "ttft_p50_ms": percentile(ttfts, 0.5),
        "ttft_p90_ms": percentile(ttfts, 0.9),
    }


def goals(results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """The issue's goals, computed from the phases that ran."""
    rate = {phase: row["vllm_prefix_cache_hit_rate"] for phase, row in results.items()}
    verdict: dict[str, Any] = {}
    if "8 processes" in rate and "one process" in rate and rate["one process"]:
        verdict["8_vs_one_process"] = round(rate["8 processes"] / rate["one process"], 3)
    if "8 processes" in rate and rate.get("any-node"):
        verdict["8_vs_any_node"] = round(rate["8 processes"] / rate["any-node"], 3)
    conversations = "one key, conversations"
    if conversations in rate and rate.get("one process"):
        verdict["one_key_conversations_vs_key_per_user"] = round(
            rate[conversations] / rate["one process"], 3
        )
    shared = [
        p
        for p in ("one process", "8 processes", conversations, f"{conversations}, 8 processes")
        if p in results
    ]
    verdict["all_users_on_one_node_when_shared"] = all(
        results[p]["users_on_one_node"] == 1.0 for p in shared
    )
    return verdict


async def run(options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Start the nodes (or use the given ones), then every phase, one after the other."""
    started: list[VllmNode] = []
    try:
        if options.node_url:
            nodes = {f"node-{index}": url for index, url in enumerate(options.node_url)}
        else:
            sizes = [int(size) for size in options.node_kv_blocks.split(",") if size]
            for index in range(options.nodes):
                blocks = sizes[index] if index < len(sizes) else options.kv_blocks
                node = VllmNode(work / "vllm", kv_blocks=blocks)
                node.launch()
                started.append(node)
            for node in started:
                node.wait_ready()
            nodes = {f"node-{index}": node.url for index, node in enumerate(started)}
        results = {}
        for phase in options.phases:
            directory = work / phase.replace(" ", "-")
            directory.mkdir()
            results[phase] = await run_phase(directory, phase, nodes, options)
        return {
            "node_start_seconds": [round(node.start_seconds, 1) for node in started],
            "results": results,
            "goals": goals(results),
        }
    finally:
        for node in started:
            node.stop()


def plot(results: Mapping[str, Mapping[str, Any]], path: Path) -> Path | None:
    """Hit rate and TTFT per phase as a PNG; None without matplotlib (the `bench` extra)."""
    try:
        import matplotlib as mpl  # noqa: PLC0415 - optional extra

        mpl.use("Agg")
        from matplotlib import pyplot  # noqa: PLC0415
    except ImportError:
        return None
    phases = list(results)
    figure, (rates, ttft) = pyplot.subplots(1, 2, figsize=(11, 4))
    rates.bar(phases, [results[p]["vllm_prefix_cache_hit_rate"] for p in phases], color="tab:blue")
    rates.set_ylim(0, 1)
    rates.set_title("vLLM prefix-cache hit rate (its /metrics)")
    width = 0.4
    positions = range(len(phases))
    ttft.bar([x - width / 2 for x in positions], [results[p]["ttft_p50_ms"] for p in phases],
             width, label="p50")  # fmt: skip
    ttft.bar([x + width / 2 for x in positions], [results[p]["ttft_p90_ms"] for p in phases],
             width, label="p90")  # fmt: skip
    ttft.set_xticks(list(positions), phases)
    ttft.set_title("time to first token (ms)")
    ttft.legend()
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    pyplot.close(figure)
    return path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The vLLM engine's options (beside `--engine vllm`)."""
    parser.add_argument("--users", type=int, default=12)
    parser.add_argument("--prompt-words", type=int, default=160, help="system prompt size")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--kv-blocks", type=int, default=160, help="each node's KV cache")
    parser.add_argument(
        "--node-kv-blocks",
        default="",
        help="each node's KV cache in blocks, comma-separated (unequal nodes; else --kv-blocks)",
    )
    parser.add_argument("--node-url", action="append", default=[], help="use running nodes")
    parser.add_argument("--phase", dest="phases", action="append", choices=PHASES + ONE_KEY_PHASES)
    parser.add_argument("--output", default="locality_vllm", help="results name (bench/results)")
    parser.add_argument("--no-plot", action="store_true")


def main(options: argparse.Namespace) -> int:
    """Run, print, write the results and the plot."""
    options.phases = options.phases or list(PHASES)
    with tempfile.TemporaryDirectory(prefix="bench-locality-vllm-") as work:
        document = asyncio.run(run(options, Path(work)))
    results = document["results"]
    print(f"{options.users} users x {options.turns} turns on vLLM, {options.workers} workers / "
          f"{options.processes} processes")  # fmt: skip
    print(f"{'phase':<14}{'vLLM hits':>10}{'cached':>8}{'one node':>10}{'TTFT p50':>10}{'p90':>8}")
    for phase, row in results.items():
        print(
            f"{phase:<14}{row['vllm_prefix_cache_hit_rate']:>10.1%}{row['cached_tokens_share']:>8.1%}"
            f"{row['users_on_one_node']:>10.0%}{row['ttft_p50_ms']:>10.1f}{row['ttft_p90_ms']:>8.1f}"
        )
    print("goals:", document["goals"])
    options_out = {key: value for key, value in vars(options).items() if key != "node_url"}
    write_results(options.output, {"options": options_out, **document})
    if not options.no_plot:
        plot(results, PLOT)
    return 0
