"""The `gateway simulate` command line: parse flags, serve until SIGTERM or SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Callable

from gateway.shared.observability import configure_logging
from gateway.simulator.options import Faults, Mode, SimulatorOptions, Timing
from gateway.simulator.server import SimulatorServer


def build_parser() -> argparse.ArgumentParser:
    """The simulator's argument parser; defaults match `SimulatorOptions`."""
    timing = Timing()
    options = SimulatorOptions()
    faults = Faults()
    parser = argparse.ArgumentParser(
        prog="gateway simulate", description="Serve a simulated vLLM-like OpenAI-compatible node."
    )
    parser.add_argument(
        "--host", default=options.host, help="address to bind (default %(default)s)"
    )
    parser.add_argument("--port", type=int, required=True, help="port to bind; 0 picks a free one")
    parser.add_argument("--name", default=options.name, help="node name, sent as x-simulator-node")
    parser.add_argument("--models", default="", help="comma-separated models served (default: any)")
    parser.add_argument("--base-ttft-ms", type=float, default=timing.base_ttft_ms)
    parser.add_argument(
        "--per-token-ms",
        type=float,
        default=timing.per_token_ms,
        help="TTFT cost per uncached prompt token",
    )
    parser.add_argument(
        "--tokens-per-second",
        type=float,
        default=timing.tokens_per_second,
        help="output rate; 0 is unlimited",
    )
    parser.add_argument("--max-num-seqs", type=int, default=timing.max_num_seqs)
    parser.add_argument(
        "--ttft-jitter-ms",
        type=float,
        default=timing.ttft_jitter_ms,
        help="a random extra of up to this much on every TTFT",
    )
    parser.add_argument(
        "--cache-tokens", type=int, default=options.cache_tokens, help="prefix-cache capacity"
    )
    parser.add_argument(
        "--default-max-tokens",
        type=int,
        default=options.default_max_tokens,
        help="output length without max_tokens",
    )
    parser.add_argument(
        "--recent-requests",
        type=int,
        default=options.recent_requests,
        help="completion requests kept for /sim/stats",
    )
    parser.add_argument(
        "--slow", type=float, default=faults.slow, help="factor applied to every time"
    )
    parser.add_argument(
        "--error-rate", type=float, default=faults.error_rate, help="fraction answered 500"
    )
    parser.add_argument(
        "--rate-limit-retry-after", type=int, default=None, help="answer 429 with this Retry-After"
    )
    parser.add_argument(
        "--drop-after-chunks", type=int, default=None, help="abort streams after N chunks"
    )
    parser.add_argument(
        "--error-on-text", default=None, help="answer 500 to requests whose body holds this text"
    )
    parser.add_argument(
        "--extra-waiting", type=int, default=faults.extra_waiting, help="added to reported waiting"
    )
    parser.add_argument(
        "--hold", action="store_true", help="hold admitted requests before their first token"
    )
    parser.add_argument(
        "--refuse-seconds", type=float, default=0.0, help="refuse connections this long at start"
    )
    parser.add_argument("--mode", choices=[mode.value for mode in Mode], default=faults.mode.value)
    return parser


def options_from_arguments(arguments: argparse.Namespace) -> SimulatorOptions:
    """Turn parsed arguments into options; ValueError when a value is out of range."""
    return SimulatorOptions(
        name=arguments.name,
        host=arguments.host,
        port=arguments.port,
        models=tuple(model.strip() for model in arguments.models.split(",") if model.strip()),
        timing=Timing(
            base_ttft_ms=arguments.base_ttft_ms,
            per_token_ms=arguments.per_token_ms,
            tokens_per_second=arguments.tokens_per_second,
            max_num_seqs=arguments.max_num_seqs,
            ttft_jitter_ms=arguments.ttft_jitter_ms,
        ),
        cache_tokens=arguments.cache_tokens,
        default_max_tokens=arguments.default_max_tokens,
        recent_requests=arguments.recent_requests,
        faults=Faults(
            slow=arguments.slow,
            error_rate=arguments.error_rate,
            rate_limit_retry_after=arguments.rate_limit_retry_after,
            drop_after_chunks=arguments.drop_after_chunks,
            error_on_text=arguments.error_on_text,
            extra_waiting=arguments.extra_waiting,
            hold=arguments.hold,
            mode=Mode(arguments.mode),
        ),
        refuse_seconds=arguments.refuse_seconds,
    )


async def serve(options: SimulatorOptions) -> None:
    """Run the node, announce it on stdout once it listens, and stop on SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    stopping = asyncio.Event()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stopping.set)
    server = SimulatorServer(options)
    try:
        await server.start()
        print(f"simulator {server.name} listening on {server.url}", flush=True)
        await stopping.wait()
    finally:
        await server.stop()
        for signal_number in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signal_number)


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    try:
        import uvloop  # noqa: PLC0415 - optional speed-up, absent on some platforms
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    """Run `gateway simulate` with `argv` (default: the process arguments); return the exit code."""
    parser = build_parser()
    arguments = parser.parse_args(argv)
    try:
        options = options_from_arguments(arguments)
    except ValueError as error:
        parser.error(str(error))
    # Log lines go to stderr, so stdout carries only the listening line parents wait for.
    configure_logging()
    try:
        with asyncio.Runner(loop_factory=_loop_factory()) as runner:
            runner.run(serve(options))
    except OSError as error:
        print(
            f"simulator {options.name} cannot listen on {options.host}:{options.port}: {error}",
            file=sys.stderr,
        )
        return 1
    return 0
