"""Gateways for tests: settings built from upstream URLs, served in-process or as real processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from gateway.config import Settings, hash_key

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TEST_KEY = "sk-test-key-0123456789"
OTHER_KEY = "sk-other-key-9876543210"
TEST_MODEL = "test-model"
UPSTREAM_MODEL = "org/test-model-upstream"


def settings_dict(
    upstreams: Mapping[str, str],
    *,
    model: str = TEST_MODEL,
    upstream_model: str = UPSTREAM_MODEL,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A config mapping: one provider per upstream URL serving `model`, and two keys."""
    config: dict[str, Any] = {
        # A short lame duck keeps process tests quick; the lifecycle tests set their own.
        "server": {
            "max_body_bytes": 64 * 1024,
            "shutdown_timeout_seconds": 10,
            "drain_delay_seconds": 0.5,
        },
        "routing": {"connect_timeout_seconds": 2, "first_byte_timeout_seconds": 10},
        "providers": [
            {"name": name, "url": url, "models": {model: upstream_model, "other-model": "other"}}
            for name, url in upstreams.items()
        ],
        "keys": [
            {"id": "team-a", "key_sha256": hash_key(TEST_KEY), "models": ["*"]},
            {"id": "team-b", "key_sha256": hash_key(OTHER_KEY), "models": ["other-model"]},
        ],
    }
    for section, values in (extra or {}).items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    return config


def build_settings(upstreams: Mapping[str, str], **options: Any) -> Settings:
    """Validated settings for `settings_dict`."""
    return Settings.model_validate(settings_dict(upstreams, **options))


def free_port() -> int:
    """A TCP port on loopback that was free a moment ago."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class GatewayProcess:
    """`gateway serve` as a real process tree, on a free loopback port."""

    def __init__(
        self,
        config: Mapping[str, Any],
        directory: Path,
        *,
        workers: int = 1,
        environment: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = directory / "gateway.yaml"
        self.write_config(config)
        self.log_path = directory / "gateway.log"
        self.pid_file = directory / "gateway.pid"
        self._workers = workers
        self._environment = dict(environment or {})
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start the process; readiness is for the caller to poll."""
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "gateway",
                    "serve",
                    "--config",
                    str(self.config_path),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--workers",
                    str(self._workers),
                    "--pid-file",
                    str(self.pid_file),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.config_path.parent,  # where an embedded Postgres keeps its data
                env={
                    **os.environ,
                    "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": str(PROJECT_ROOT),
                    **self._environment,
                },
            )

    def write_config(self, config: Mapping[str, Any] | str) -> None:
        """Replace the config file (a mapping, or raw text); `reload()` applies it."""
        text = config if isinstance(config, str) else yaml.safe_dump(dict(config))
        self.config_path.write_text(text, encoding="utf-8")

    def reload(self) -> None:
        """Send SIGHUP (reload the config file)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGHUP)

    def events(self, name: str) -> list[dict[str, Any]]:
        """The JSON log lines so far whose event is `name`."""
        found = []
        for line in self.log().splitlines():
            if line.startswith("{"):
                record = json.loads(line)
                if record.get("event") == name:
                    found.append(record)
        return found

    def terminate(self) -> None:
        """Send SIGTERM (graceful drain)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)

    def wait(self, timeout: float) -> int:
        """Wait for exit; return the exit code."""
        assert self.process is not None
        return self.process.wait(timeout=timeout)

    def stop(self) -> None:
        """Stop it for good, whatever state it is in."""
        if self.process is None or self.process.poll() is not None:
            return
        self.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)

    def log(self) -> str:
        """Everything the process printed so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def wait_for_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on loopback:port (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as probe:
            probe.settimeout(0.2)
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise AssertionError(f"nothing listened on port {port} within {timeout} s")


async def answers(session: aiohttp.ClientSession, url: str) -> bool:
    """Whether the gateway at `url` answers /healthz yet."""
    try:
        async with session.get(url + "/healthz") as response:
            return response.status == 200
    except aiohttp.ClientConnectionError:
        return False


def chat_body(content: str = "Hello there", **fields: Any) -> dict[str, Any]:
    """A small chat-completions request body for TEST_MODEL."""
    return {"model": TEST_MODEL, "messages": [{"role": "user", "content": content}], **fields}


def provider_names(settings: Settings) -> Sequence[str]:
    """The configured provider names, in order."""
    return [provider.name for provider in settings.providers]
