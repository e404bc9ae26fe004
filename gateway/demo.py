"""`gateway demo`: three simulated nodes and a gateway on a generated config, ready for curl."""

from __future__ import annotations

import re
import selectors
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from gateway.config import hash_key
from gateway.config_loading import load_config
from gateway.serve import serve

DEMO_KEY = "sk-demo-affinity-gateway"
DEMO_MODEL = "demo-llama"
DEMO_DIR = Path(".gateway/demo")
LISTENING = re.compile(r"listening on (http://\S+)")
START_TIMEOUT_SECONDS = 20.0


def run_demo(*, port: int, workers: int) -> int:
    """Start the simulators and the gateway; stop everything on Ctrl-C."""
    DEMO_DIR.mkdir(parents=True, exist_ok=True)
    with simulators(("node-a", "node-b", "node-c")) as urls:
        config_path = write_demo_config(DEMO_DIR / "config.yaml", urls, port=port, workers=workers)
        loaded = load_config(config_path)
        print(instructions(port), flush=True)
        return serve(loaded.settings, "127.0.0.1", port, workers)


def write_demo_config(path: Path, urls: list[str], *, port: int, workers: int) -> Path:
    """Write a config for the demo: the simulators as providers and one demo key."""
    config = {
        "server": {"host": "127.0.0.1", "port": port, "workers": workers},
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
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def instructions(port: int) -> str:
    """What to paste into a terminal to try the demo."""
    base = f"http://127.0.0.1:{port}/v1"
    return f"""
affinity-gateway demo: three simulated nodes behind a gateway on {base}

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
