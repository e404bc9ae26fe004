"""`gateway demo`: three simulated nodes and a gateway on a generated config, ready for curl."""

from __future__ import annotations

import re
import secrets
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from gateway.config_fleet import hash_key
from gateway.config_loading import load_config
from gateway.operations.serve import serve

DEMO_KEY = "sk-demo-affinity-gateway"
DEMO_MODEL = "demo-llama"
DEMO_DIR = Path(".gateway/demo")
# In a source checkout, the demo config points editors at the config's JSON Schema.
SCHEMA_FILE = Path(__file__).resolve().parents[1] / "docs" / "config.schema.json"
LISTENING = re.compile(r"listening on (http://\S+)")
START_TIMEOUT_SECONDS = 20.0


def run_demo(*, port: int, workers: int) -> int:
    """Start the simulators and the gateway; stop everything on Ctrl-C."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    admin_token = secrets.token_urlsafe(24)
    with simulators(("node-a", "node-b", "node-c")) as urls:
        config_path = write_demo_config(
            DEMO_DIR / "config.yaml", urls, port=port, workers=workers, admin_token=admin_token
        )
        loaded = load_config(config_path)
        pid_file = DEMO_DIR / "gateway.pid"
        print(instructions(port, admin_token, config_path, pid_file), flush=True)
        return serve(
            loaded.settings,
            "127.0.0.1",
            port,
            workers,
            config_path=str(config_path.resolve()),
            pid_file=str(pid_file),
        )


def write_demo_config(
    path: Path, urls: list[str], *, port: int, workers: int, admin_token: str
) -> Path:
    """Write a config for the demo: the simulators as providers, one demo key, an admin token."""
    config = {
        # Nothing balances load in front of the demo: no lame-duck delay on Ctrl-C.
        "server": {
            "host": "127.0.0.1",
            "port": port,
            "workers": workers,
            "admin_token": admin_token,
            "drain_delay_seconds": 0,
        },
        "providers": [
            {
                "name": f"node-{letter}",
                "url": url,
                "group": "demo-pool",
                "models": {DEMO_MODEL: "meta-llama/Llama-3.1-8B-Instruct"},
            }
            for letter, url in zip("abc", urls, strict=True)
        ],
        "models": [{"name": DEMO_MODEL, "stickiness": "shared"}],
        "orgs": [{"name": "demo-org"}],
        "keys": [
            {"id": "demo", "org": "demo-org", "key_sha256": hash_key(DEMO_KEY), "models": ["*"]}
        ],
    }
    text = yaml.safe_dump(config, sort_keys=False)
    if SCHEMA_FILE.exists():
        text = f"# yaml-language-server: $schema={SCHEMA_FILE}\n{text}"
    path.write_text(text, encoding="utf-8")
    return path


def instructions(port: int, admin_token: str, config_path: Path, pid_file: Path) -> str:
    """What to paste into a terminal to try the demo."""
    base = f"http://127.0.0.1:{port}/v1"
    return f"""
affinity-gateway demo: three simulated nodes behind a gateway on {base}

  Status page (this run's generated admin token as the password, any user name):
    http://admin:{admin_token}@127.0.0.1:{port}/admin/status
  or: curl -s -H 'Authorization: Bearer {admin_token}' http://127.0.0.1:{port}/admin/status

  Change the config live: edit {config_path}, then
    gateway reload --pid-file {pid_file}

  curl -s {base}/chat/completions \\
    -H 'Authorization: Bearer {DEMO_KEY}' -H 'Content-Type: application/json' \\
    -d '{{"model": "{DEMO_MODEL}", "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python - <<'EOF'
  from openai import OpenAI
  client = OpenAI(base_url="{base}", api_key="{DEMO_KEY}")
  reply = client.chat.completions.create(
      model="{DEMO_MODEL}", messages=[{{"role": "user", "content": "Hello!"}}])
  print(reply.choices[0].message.content)
  EOF

Press Ctrl-C to stop.
"""


@contextmanager
def simulators(names: tuple[str, ...]) -> Iterator[list[str]]:
    """Run one simulator process per name on free loopback ports; yield their base URLs."""
    processes: list[subprocess.Popen[str]] = []
    try:
        urls = []
        for name in names:
            process = subprocess.Popen(
                [sys.executable, "-m", "gateway.simulator", "--port", "0", "--name", name],
                stdout=subprocess.PIPE,
                text=True,
            )
            processes.append(process)
            urls.append(_wait_for_url(process, name))
        yield urls
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()


def _wait_for_url(process: subprocess.Popen[str], name: str) -> str:
    assert process.stdout is not None  # stdout=PIPE above
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        while time.monotonic() < deadline:
            if not selector.select(timeout=max(0.0, deadline - time.monotonic())):
                break
            line = process.stdout.readline()
            if not line:
                break
            match = LISTENING.search(line)
            if match:
                # Keep draining its output so a chatty simulator can never block on a full pipe.
                threading.Thread(target=process.stdout.read, daemon=True).start()
                return match.group(1)
    raise RuntimeError(f"simulator {name} did not start within {START_TIMEOUT_SECONDS:.0f} s")
