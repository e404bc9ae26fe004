"""`gateway simulate`: flags, start-up line, signals, and a real process killed and restarted."""

from __future__ import annotations

import socket
import subprocess
import sys

import aiohttp
import pytest

from gateway.simulator import Mode, main
from gateway.simulator.cli import build_parser, options_from_arguments
from tests.support.simulators import SimulatorProcess


def test_flags_map_onto_the_options() -> None:
    """Every timing, size and fault flag lands in the node's options."""
    arguments = build_parser().parse_args(
        [
            "--port", "9001", "--name", "gpu-a", "--models", "llama, qwen",
            "--base-ttft-ms", "5", "--per-token-ms", "0.5", "--tokens-per-second", "40",
            "--max-num-seqs", "3", "--cache-tokens", "1000", "--slow", "2",
            "--error-rate", "0.25", "--rate-limit-retry-after", "9", "--drop-after-chunks", "4",
            "--extra-waiting", "6", "--hold", "--refuse-seconds", "1.5",
            "--mode", "malformed_sse",
        ]
    )  # fmt: skip
    options = options_from_arguments(arguments)
    assert (options.name, options.port, options.models) == ("gpu-a", 9001, ("llama", "qwen"))
    timing = options.timing
    assert (timing.base_ttft_ms, timing.per_token_ms, timing.tokens_per_second) == (5, 0.5, 40)
    assert (timing.max_num_seqs, options.cache_tokens, options.refuse_seconds) == (3, 1000, 1.5)
    faults = options.faults
    assert (faults.slow, faults.error_rate, faults.rate_limit_retry_after) == (2, 0.25, 9)
    assert (faults.drop_after_chunks, faults.extra_waiting, faults.hold) == (4, 6, True)
    assert faults.mode is Mode.MALFORMED_SSE


def test_port_is_required_and_bad_values_are_usage_errors() -> None:
    """A missing port or an out-of-range value exits with argparse's usage status."""
    with pytest.raises(SystemExit) as missing:
        main([])
    with pytest.raises(SystemExit) as negative:
        main(["--port", "0", "--error-rate", "3"])
    assert missing.value.code == negative.value.code == 2


def test_a_port_in_use_is_reported_with_exit_code_one() -> None:
    """When the port is taken, the command says so on stderr and exits 1."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        finished = subprocess.run(
            [sys.executable, "-m", "gateway.simulator", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    assert finished.returncode == 1
    assert "cannot listen" in finished.stderr
    assert finished.stdout == ""


async def test_a_process_announces_its_port_serves_and_stops_on_sigterm() -> None:
    """Started on port 0, the process prints its URL, answers, and exits 0 on SIGTERM."""
    async with SimulatorProcess("proc-a", ["--base-ttft-ms", "0"]) as process:
        assert process.url == f"http://127.0.0.1:{process.port}"
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{process.url}/v1/models") as response,
        ):
            assert response.headers["x-simulator-node"] == "proc-a"
        await process.set_faults(extra_waiting=2)
        assert (await process.stats()).requests_by_path == {"/v1/models": 1}
    assert process.returncode == 0


async def test_a_killed_process_restarts_on_the_same_port() -> None:
    """After SIGKILL the port refuses connections; restart listens on the same port again."""
    async with SimulatorProcess("proc-b") as process, aiohttp.ClientSession() as session:
        port = process.port
        await process.kill()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with session.get(f"{process.url}/v1/models"):
                pass
        await process.restart()
        assert process.port == port
        async with session.get(f"{process.url}/v1/models") as response:
            assert response.status == 200
