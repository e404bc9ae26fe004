"""A real vLLM node (the CPU build in `.venv-vllm`) serving the tiny model on loopback.

`scripts/setup-vllm` installs the environment and builds the model; `scripts/test` runs it, so
CI always has both. Without them a test that asks for a node fails with the command to run,
never skips. The node runs vLLM's own command line with the flags its quirks need on the CPU
(docs/testing.md, "A real vLLM"): `VLLM_TARGET_DEVICE=cpu`, a block size that is a multiple of 32, a
bounded KV cache, `cached_tokens` in usage and the dev-mode `/reset_prefix_cache`.
"""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path

import aiohttp

from bench.launcher import PROJECT_ROOT, free_port, log_tail, spawn, stop

VLLM_ENV = PROJECT_ROOT / ".venv-vllm"
VLLM_COMMAND = VLLM_ENV / "bin" / "vllm"
TINY_MODEL = PROJECT_ROOT / ".cache" / "tiny-model"
VLLM_MODEL = "org/tiny-llama"  # the id the node serves (its `--served-model-name`)
MAX_MODEL_LEN = 2048
BLOCK_SIZE = 32
INSTALL_HINT = "the real-engine tests need vLLM: run `scripts/setup-vllm` (scripts/test does)"
START_TIMEOUT_SECONDS = 300.0
_SAMPLE = re.compile(rb"^(vllm:[a-z_]+)(?:\{[^}]*\})? ([0-9.e+-]+)$", re.MULTILINE)


def vllm_installed() -> bool:
    """Whether the vLLM environment and the tiny model are in place."""
    return VLLM_COMMAND.exists() and (TINY_MODEL / ".built").exists()


def node_command(port: int, *, kv_blocks: int = 512, extra: Sequence[str] = ()) -> list[str]:
    """`vllm serve` for the tiny model on `port`, with a KV cache of `kv_blocks` blocks."""
    return [
        str(VLLM_COMMAND), "serve", str(TINY_MODEL),
        "--served-model-name", VLLM_MODEL,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", str(MAX_MODEL_LEN),
        "--block-size", str(BLOCK_SIZE),
        "--num-gpu-blocks-override", str(kv_blocks),
        # On the CPU this is the share of memory reserved, checked against what is free.
        "--gpu-memory-utilization", "0.05",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
        "--max-num-seqs", "16",
        "--seed", "0",
        "--uvicorn-log-level", "warning",
        *extra,
    ]  # fmt: skip


def node_environment() -> dict[str, str]:
    """The node's environment: the CPU platform, dev routes, no hub and one thread per core."""
    return {
        **os.environ,
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_SERVER_DEV_MODE": "1",  # POST /reset_prefix_cache, so both sides meet a cold cache
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_CPU_KVCACHE_SPACE": "1",
    }


class VllmNode:
    """One `vllm serve` process tree on a free loopback port; its log in `directory`."""

    def __init__(self, directory: Path, *, kv_blocks: int = 512, extra: Sequence[str] = ()) -> None:
        assert vllm_installed(), INSTALL_HINT
        directory.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = directory / f"vllm-{self.port}.log"
        self.command = node_command(self.port, kv_blocks=kv_blocks, extra=extra)
        self.process: subprocess.Popen[bytes] | None = None
        self.start_seconds = 0.0
        self._launched = time.monotonic()

    @classmethod
    def running_at(cls, url: str, directory: Path) -> VllmNode:
        """A node someone already started (`GATEWAY_TEST_VLLM_URL`, for quick local reruns),
        with the flags of `node_command`; the tests neither start nor stop it."""
        node = cls(directory)
        node.url = url.rstrip("/")
        return node

    def launch(self) -> None:
        """Start the process tree (in its own process group, so it stops whole)."""
        # vLLM's own environment: this checkout is not put on its import path.
        environment = {**node_environment(), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
        self.process = spawn(self.command, self.log_path, cwd=PROJECT_ROOT, environment=environment)
        self._launched = time.monotonic()

    def wait_ready(self, timeout: float = START_TIMEOUT_SECONDS) -> None:
        """Poll `/health` until the node answers 200 (bounded); fail with its log's tail."""
        deadline = self._launched + timeout
        while time.monotonic() < deadline:
            exited = self.process is not None and self.process.poll() is not None
            assert not exited, f"vLLM exited:\n{self.log_tail()}"
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as response:  # noqa: S310
                    if response.status == 200:
                        self.start_seconds = time.monotonic() - self._launched
                        return
            except (OSError, urllib.error.URLError):
                pass
            time.sleep(0.5)
        raise AssertionError(f"vLLM not ready in {timeout:.0f} s:\n{self.log_tail()}")

    def start(self) -> None:
        """Launch and wait until ready (a node `running_at` a URL is only waited for)."""
        if self.url.endswith(f":{self.port}"):
            self.launch()
        else:
            self._launched = time.monotonic()
        self.wait_ready()

    def log_tail(self, lines: int = 40) -> str:
        """The last lines of the node's log."""
        if not self.log_path.exists():
            return "(no log: the node was started elsewhere)"
        return log_tail(self.log_path, lines)

    def stop(self) -> None:
        """Stop the whole process group: SIGTERM, then SIGKILL after 20 s."""
        if self.process is not None:
            stop(self.process, timeout=20, whole_group=True)


async def reset_prefix_cache(session: aiohttp.ClientSession, url: str) -> None:
    """Empty the node's prefix cache (dev mode), retrying while blocks are still held."""
    for _ in range(50):
        async with session.post(url + "/reset_prefix_cache") as response:
            assert response.status == 200, await response.text()
            if (await response.json())["success"]:
                return
        await asyncio.sleep(0.1)
    raise AssertionError("vLLM kept refusing to reset its prefix cache")


async def prefix_cache_counters(session: aiohttp.ClientSession, url: str) -> Mapping[str, float]:
    """vLLM's `/metrics` counters summed over labels (`vllm:prefix_cache_hits_total`, ...)."""
    async with session.get(url + "/metrics") as response:
        text = await response.read()
    totals: dict[str, float] = {}
    for name, value in _SAMPLE.findall(text):
        key = name.decode()
        totals[key] = totals.get(key, 0.0) + float(value)
    return totals
