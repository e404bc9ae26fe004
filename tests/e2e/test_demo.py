"""`gateway demo` brings up simulators and a gateway that answers a curl, and stops cleanly."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from bench.launcher import free_port
from gateway.operations.demo import DEMO_KEY, DEMO_MODEL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]
PROJECT_ROOT = Path(__file__).resolve().parents[2]


def curl_chat(port: int) -> subprocess.CompletedProcess[str]:
    """The README's curl against the demo."""
    curl = shutil.which("curl")
    assert curl is not None, "curl is needed for this test (apt-get install curl)"
    body = json.dumps({"model": DEMO_MODEL, "messages": [{"role": "user", "content": "Hello!"}]})
    return subprocess.run(
        [
            curl,
            "-s",
            "--max-time",
            "10",
            f"http://127.0.0.1:{port}/v1/chat/completions",
            "-H",
            f"Authorization: Bearer {DEMO_KEY}",
            "-H",
            "Content-Type: application/json",
            "-d",
            body,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_demo_answers_curl_and_stops_everything_on_ctrl_c(tmp_path: Path) -> None:
    """The demo serves a chat completion to curl and its printed status-page URL (with a generated
    admin token) opens; SIGINT stops the gateway and the simulators."""
    port = free_port()
    log = (tmp_path / "demo.log").open("w")
    demo = subprocess.Popen(
        [sys.executable, "-m", "gateway", "demo", "--port", str(port), "--workers", "2"],
        cwd=tmp_path,
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)},
    )
    try:
        deadline = time.monotonic() + 60
        result = curl_chat(port)
        while result.returncode != 0 and time.monotonic() < deadline:
            time.sleep(0.2)
            result = curl_chat(port)
        assert result.returncode == 0, (tmp_path / "demo.log").read_text()
        reply = json.loads(result.stdout)
        assert reply["choices"][0]["message"]["content"]
        printed = (tmp_path / "demo.log").read_text()
        status_url = re.search(r"(http://admin:\S+@127\.0\.0\.1:\d+/admin/status)", printed)
        assert status_url is not None, printed
        page = subprocess.run(
            ["curl", "-s", "--max-time", "10", "-w", "\n%{http_code}", status_url.group(1)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert page.stdout.rstrip().endswith("200"), page.stdout[-300:]
        assert 'id="config-digest"' in page.stdout
        children = psutil.Process(demo.pid).children(recursive=True)
        assert len(children) >= 5  # three simulators and two workers
        demo.send_signal(signal.SIGINT)
        assert demo.wait(timeout=30) == 0
        _, alive = psutil.wait_procs(children, timeout=10)
        assert alive == []
        assert "sk-demo" not in (tmp_path / "demo.log").read_text().split("Press Ctrl-C")[-1]
    finally:
        if demo.poll() is None:
            demo.kill()
        log.close()
