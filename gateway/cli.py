"""The `gateway` command: serve, reload, check-config, config-schema, config-doc, hash-key,
simulate, demo."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from pathlib import Path

from gateway.config_fleet import hash_key
from gateway.config_loading import ConfigError, LoadedConfig, load_config

BENCHMARKS = (
    "overhead",
    "affinity",
    "locality",
    "fault_drills",
    "ordering",
    "simulator_throughput",
    "store_scale",
    "store_statements",
    "agreement",
    "latency_bands",
    "latency_recovery",
    "operations",
    "store_outage_burst",
    "throughput",
    "usage_accounting",
    "redaction",
    "body_parse",
    "keepalive_races",
    "shedding",
    "key_limits",
)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line and run one command; returns the process exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    # `simulate` and `bench` own their flags; hand them over untouched.
    if arguments[:1] == ["simulate"]:
        from gateway.simulator import main as simulate  # noqa: PLC0415 - keep start-up lean

        return simulate(arguments[1:])
    if arguments[:1] == ["bench"]:
        return _bench(arguments[1:])
    parser = _parser()
    options = parser.parse_args(arguments)
    command: str | None = options.command
    if command == "serve":
        return _serve(options)
    if command == "reload":
        return _reload(options)
    if command == "check-config":
        return _check_config(options.file)
    if command == "config-schema":
        return _config_schema()
    if command == "config-doc":
        return _config_doc()
    if command == "hash-key":
        return _hash_key()
    if command == "migrate":
        return _migrate(options.config)
    if command == "bindings":
        return _bindings(options)
    if command == "usage":
        return _usage(options)
    if command == "demo":
        from gateway.operations.demo import run_demo  # noqa: PLC0415 - keep start-up lean

        return run_demo(port=options.port, workers=options.workers)
    parser.print_help(sys.stderr)
    return 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="An OpenAI-compatible LLM router with shared cache affinity."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the gateway")
    serve.add_argument("--config", required=True, help="path to the YAML config")
    serve.add_argument("--host", help="listen address (default: server.host)")
    serve.add_argument("--port", type=int, help="listen port (default: server.port)")
    serve.add_argument("--workers", type=int, help="worker processes (default: server.workers)")
    serve.add_argument("--pid-file", help="write the serving process's pid here (for `reload`)")

    reload = commands.add_parser(
        "reload", help="have a running `gateway serve` re-read its config (SIGHUP)"
    )
    reload.add_argument("--pid-file", required=True, help="the pid file `serve --pid-file` wrote")
    reload.add_argument(
        "--config", help="validate this file first and refuse to signal when it is invalid"
    )

    check = commands.add_parser(
        "check-config", help="validate a config file, listing every problem"
    )
    check.add_argument("file")

    commands.add_parser("hash-key", help="read a client key on stdin and print its SHA-256")
    commands.add_parser(
        "config-schema", help="print the config file's JSON Schema (docs/config.schema.json)"
    )
    commands.add_parser(
        "config-doc", help="print the configuration reference (docs/configuration.md)"
    )

    migrate = commands.add_parser("migrate", help="apply pending database migrations")
    migrate.add_argument("--config", required=True, help="path to the YAML config")

    bindings = commands.add_parser("bindings", help="list live (key, model) → provider bindings")
    bindings.add_argument("--config", required=True, help="path to the YAML config")
    bindings.add_argument("--key", help="only this key id")
    bindings.add_argument("--model", help="only this model")
    bindings.add_argument("--limit", type=int, default=1000)
    usage = commands.add_parser("usage", help="requests and tokens per key, model and provider")
    usage.add_argument("--config", required=True, help="path to the YAML config")
    usage.add_argument("--since", default="24h", help="how far back: 90m, 24h, 7d (default 24h)")
    usage.add_argument(
        "--by", default="key,model", help="group by some of key,model,provider,outcome"
    )
    usage.add_argument("--format", choices=("table", "csv", "json"), default="table")
    commands.add_parser("simulate", help="run the bundled vLLM-like upstream simulator")
    commands.add_parser(
        "bench", help=f"run a benchmark from a source checkout: {', '.join(BENCHMARKS)}"
    )

    demo = commands.add_parser("demo", help="three simulated nodes and a gateway, ready for curl")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--workers", type=int, default=2)
    return parser


def _load_or_report(path: str) -> LoadedConfig | None:
    try:
        loaded = load_config(path)
    except ConfigError as error:
        print(f"{path}: {len(error.problems)} problem(s)", file=sys.stderr)
        for problem in error.problems:
            print(f"  error: {problem}", file=sys.stderr)
        return None
    for warning in loaded.warnings:
        print(f"  warning: {warning}", file=sys.stderr)
    return loaded


def _serve(options: argparse.Namespace) -> int:
    from gateway.operations.serve import serve  # noqa: PLC0415 - keep start-up lean

    loaded = _load_or_report(options.config)
    if loaded is None:
        return 1
    server = loaded.settings.server
    workers = options.workers if options.workers is not None else server.workers
    if workers < 1:
        print("--workers must be at least 1", file=sys.stderr)
        return 2
    host = options.host or server.host
    port = options.port if options.port is not None else server.port
    return serve(
        loaded.settings,
        host,
        port,
        workers,
        config_path=str(Path(options.config).resolve()),
        pid_file=options.pid_file,
    )


def _reload(options: argparse.Namespace) -> int:
    import os  # noqa: PLC0415 - keep start-up lean
    import signal  # noqa: PLC0415

    if options.config is not None and _load_or_report(options.config) is None:
        print("not reloading: the running config keeps serving", file=sys.stderr)
        return 1
    try:
        pid = int(Path(options.pid_file).read_text(encoding="ascii").strip())
        os.kill(pid, signal.SIGHUP)
    except (OSError, ValueError) as error:
        print(f"reload: no running gateway from {options.pid_file}: {error}", file=sys.stderr)
        return 1
    print(f"sent SIGHUP to gateway pid {pid}; its log reports config_reloaded or the errors")
    return 0


def _config_schema() -> int:
    from gateway.operations.config_schema import config_schema_json  # noqa: PLC0415 - keep start-up lean

    sys.stdout.write(config_schema_json())
    return 0


def _config_doc() -> int:
    from gateway.operations.config_doc import config_doc  # noqa: PLC0415 - keep start-up lean

    sys.stdout.write(config_doc())
    return 0


def _check_config(path: str) -> int:
    loaded = _load_or_report(path)
    if loaded is None:
        return 1
    settings = loaded.settings
    print(
        f"{path}: OK ({len(settings.providers)} providers, {len(settings.keys)} keys, "
        f"{len(loaded.warnings)} warning(s))"
    )
    return 0


def _migrate(path: str) -> int:
    import asyncio  # noqa: PLC0415 - keep start-up lean

    from gateway.selection.database import apply_pending, provisioned  # noqa: PLC0415

    loaded = _load_or_report(path)
    if loaded is None:
        return 1
    with provisioned(loaded.settings) as settings:
        applied = asyncio.run(apply_pending(settings))
    print("\n".join(f"applied {name}" for name in applied) or "nothing to apply")
    return 0


def _bindings(options: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - keep start-up lean

    from gateway.selection.database import list_bindings, provisioned  # noqa: PLC0415

    loaded = _load_or_report(options.config)
    if loaded is None:
        return 1
    with provisioned(loaded.settings) as settings:
        rows = asyncio.run(
            list_bindings(settings, key_id=options.key, model=options.model, limit=options.limit)
        )
    print(f"{'KEY':<24} {'MODEL':<28} {'PROVIDER':<20} {'IDENTITY':<20} TTL LEFT")
    for row in rows:
        print(
            f"{row.api_key_id:<24} {row.model:<28} {row.provider:<20} "
            f"{row.routing_identity:<20} {row.ttl_remaining:.0f}s"
        )
    return 0


def _usage(options: argparse.Namespace) -> int:
    import asyncio  # noqa: PLC0415 - keep start-up lean
    from datetime import UTC, datetime  # noqa: PLC0415

    from gateway.operations.usage_report import (  # noqa: PLC0415
        grouped,
        parse_groups,
        parse_span,
        render,
    )
    from gateway.selection.database import provisioned, usage_totals  # noqa: PLC0415

    try:
        span, by = parse_span(options.since), parse_groups(options.by)
    except ValueError as error:
        print(f"usage: {error}", file=sys.stderr)
        return 2
    loaded = _load_or_report(options.config)
    if loaded is None:
        return 1
    since = datetime.now(UTC) - span
    with provisioned(loaded.settings) as settings:
        totals = asyncio.run(usage_totals(settings, since, by))
    print(render(grouped(totals, by), by, options.format))
    return 0


def _bench(arguments: list[str]) -> int:
    if not arguments or arguments[0] not in BENCHMARKS:
        print(f"usage: gateway bench {{{','.join(BENCHMARKS)}}} [options]", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(f"bench.{arguments[0]}")
    except ModuleNotFoundError:
        print("gateway bench: the benchmarks run from a source checkout (bench/)", file=sys.stderr)
        return 2
    sys.argv = [f"gateway bench {arguments[0]}", *arguments[1:]]
    result: int = module.main()
    return result


def _hash_key() -> int:
    key = sys.stdin.read().rstrip("\r\n")
    if not key:
        print("hash-key: no key on standard input", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0
