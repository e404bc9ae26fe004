"""The processes `gateway bench throughput` measures, each pinned to its own core, and their CPU.

Core 0 holds the target under load (the fast upstream itself for `direct`, the bare pass-through,
one `gateway serve` worker, LiteLLM's proxy); core 1 holds the shared fast upstream the proxies
forward to and the load generator. CPU time comes from `/proc/<pid>/stat` of the pinned process.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

from bench.launcher import free_port, gateway_command, spawn, wait_ready, write_config
from gateway.config_fleet import hash_key

TARGETS = ("direct", "bare", "gateway", "litellm")
MODEL = "bench-model"
GATEWAY_KEY = "sk-bench-throughput"
TARGET_CORE = 0
LOAD_CORE = 1
LITELLM_VERSION = "1.80.0"
LITELLM_INSTALL_SECONDS = 900
DEFAULT_CACHE = Path.home() / ".cache" / "affinity-gateway" / "bench"


@dataclass
class Target:
    """One running target: where to send, with which key, and which processes' CPU counts."""

    name: str
    port: int
    key: str | None = None
    path: str = "/v1/chat/completions"
    pids: list[int] = field(default_factory=list)

    @property
    def url(self) -> str:
        """The chat completions URL."""
        return f"http://127.0.0.1:{self.port}{self.path}"


def pinned(core: int, command: list[str]) -> list[str]:
    """`command` under `taskset -c core` when this machine has that core and taskset."""
    if (os.cpu_count() or 1) > core and shutil.which("taskset"):
        return ["taskset", "-c", str(core), *command]
    return command


def load_core() -> int:
    """The load generator's core: 1, or 0 on a one-core machine."""
    return LOAD_CORE if (os.cpu_count() or 1) > LOAD_CORE else TARGET_CORE


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU seconds of the processes (all their threads), from /proc/<pid>/stat."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
        except FileNotFoundError:  # a helper process that has exited
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / ticks


def upstream_command(port: int) -> list[str]:
    """The fast canned upstream."""
    return [sys.executable, "-m", "bench.fast_upstream", "--port", str(port)]


async def start_upstream(started: list[subprocess.Popen[bytes]], work: Path) -> int:
    """The shared fast upstream on the load core; its port."""
    port = free_port()
    started.append(spawn(pinned(load_core(), upstream_command(port)), work / "upstream.log"))
    await wait_ready(f"http://127.0.0.1:{port}/metrics")
    return port


async def start_direct(started: list[subprocess.Popen[bytes]], work: Path) -> Target:
    """A second fast upstream, alone on the target core: the floor every proxy is compared to."""
    port = free_port()
    process = spawn(pinned(TARGET_CORE, upstream_command(port)), work / "direct.log")
    started.append(process)
    await wait_ready(f"http://127.0.0.1:{port}/metrics")
    return Target("direct", port, pids=[process.pid])


async def start_bare(started: list[subprocess.Popen[bytes]], work: Path, upstream: int) -> Target:
    """The 40-line aiohttp pass-through in bench/ on the target core."""
    port = free_port()
    command = [
        sys.executable, "-m", "bench.passthrough", "--port", str(port),
        "--upstream", f"http://127.0.0.1:{upstream}",
    ]  # fmt: skip
    process = spawn(pinned(TARGET_CORE, command), work / "bare.log")
    started.append(process)
    await wait_ready(f"http://127.0.0.1:{port}/")
    return Target("bare", port, pids=[process.pid])


async def start_gateway(
    started: list[subprocess.Popen[bytes]], work: Path, upstream: int
) -> Target:
    """One real `gateway serve` worker (embedded Postgres) on the target core.

    The embedded Postgres it starts is moved to the load core once up, so the target core runs
    the worker alone; only the worker's CPU is counted.
    """
    port = free_port()
    folder = work / "gateway"
    folder.mkdir()
    config = write_config(
        folder / "gateway.yaml",
        {
            "server": {"host": "127.0.0.1", "port": port, "workers": 1},
            "providers": [
                {"name": "fast", "url": f"http://127.0.0.1:{upstream}", "models": {MODEL: MODEL}}
            ],
            "keys": [{"id": "bench", "key_sha256": hash_key(GATEWAY_KEY)}],
        },
    )
    process = spawn(pinned(TARGET_CORE, gateway_command(config, port)), folder / "gateway.log")
    started.append(process)
    await wait_ready(f"http://127.0.0.1:{port}/healthz", limit_seconds=120)
    if (os.cpu_count() or 1) > LOAD_CORE:
        for child in psutil.Process(process.pid).children(recursive=True):
            os.sched_setaffinity(child.pid, {LOAD_CORE})
    return Target("gateway", port, key=GATEWAY_KEY, pids=[process.pid])


def install_litellm(cache: Path) -> tuple[Path | None, str]:
    """LiteLLM's proxy in its own virtual environment under `cache`, installed once with pip.

    Returns the `litellm` executable, or None and why it could not be installed (offline, say).
    """
    venv = cache / f"litellm-{LITELLM_VERSION}"
    executable = venv / "bin" / "litellm"
    stamp = venv / ".installed"
    if stamp.exists() and executable.exists():
        return executable, f"litellm {LITELLM_VERSION} (cached in {venv})"
    print(f"installing litellm[proxy]=={LITELLM_VERSION} into {venv} ...", flush=True)
    try:
        subprocess.run(
            [sys.executable, "-m", "venv", "--clear", str(venv)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        subprocess.run(
            [
                str(venv / "bin" / "python"),
                "-m",
                "pip",
                "install",
                "--quiet",
                f"litellm[proxy]=={LITELLM_VERSION}",
            ],
            check=True,
            capture_output=True,
            timeout=LITELLM_INSTALL_SECONDS,
        )
    except subprocess.CalledProcessError as error:
        lines = [line for line in error.stderr.decode(errors="replace").splitlines() if line]
        errors = [line for line in lines if "ERROR" in line] or lines
        return None, f"pip install failed: {errors[-1] if errors else error}"
    except subprocess.TimeoutExpired:
        return None, f"pip install took longer than {LITELLM_INSTALL_SECONDS} s"
    stamp.touch()
    return executable, f"litellm {LITELLM_VERSION} (installed into {venv})"


async def start_litellm(
    started: list[subprocess.Popen[bytes]], work: Path, upstream: int, executable: Path
) -> Target:
    """LiteLLM's proxy (one worker, no database, no auth) on the target core."""
    port = free_port()
    folder = work / "litellm"
    folder.mkdir()
    config = folder / "litellm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_list": [
                    {
                        "model_name": MODEL,
                        "litellm_params": {
                            "model": f"openai/{MODEL}",
                            "api_base": f"http://127.0.0.1:{upstream}/v1",
                            "api_key": "unused",
                        },
                    }
                ],
            }
        ),
        encoding="utf-8",
    )
    command = [
        str(executable), "--config", str(config), "--host", "127.0.0.1",
        "--port", str(port), "--num_workers", "1",
    ]  # fmt: skip
    # The bundled model cost map instead of fetching it; warnings only.
    quiet = {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_LOG": "ERROR"}
    process = spawn(pinned(TARGET_CORE, command), folder / "litellm.log", environment=quiet)
    started.append(process)
    await wait_ready(f"http://127.0.0.1:{port}/health/liveliness", limit_seconds=180)
    pids = [process.pid] + [
        child.pid for child in psutil.Process(process.pid).children(recursive=True)
    ]
    return Target("litellm", port, pids=pids)
