"""The shipped `deploy/nginx.conf` as a real nginx on loopback, in front of gateway processes.

Tests and benchmarks run nginx with the config the project ships: only the replicas, the
listener, the pid, logs and temp paths are pointed at the run's own, and optionally the idle
time of upstream keep-alive connections.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.support.gateway import PROJECT_ROOT, free_port, wait_for_port

NGINX = "/usr/sbin/nginx"
SHIPPED_CONFIG = PROJECT_ROOT / "deploy" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
INSTALL_HINT = "nginx is required: `apt-get install -y nginx` (scripts/test does this)"


def nginx_binary() -> str:
    """The nginx executable (the test fails, never skips, without it)."""
    found = shutil.which("nginx") or (NGINX if Path(NGINX).exists() else None)
    assert found is not None, INSTALL_HINT
    return found


def render_config(
    gateway_ports: Sequence[int],
    port: int,
    directory: Path,
    *,
    upstream_idle_seconds: float | None = None,
) -> str:
    """The shipped config with its replicas, listener and writable paths pointed at the run's
    own; every other directive as shipped, except the upstream keep-alive idle time if given."""
    text = SHIPPED_CONFIG.read_text(encoding="utf-8")
    # Each replica keeps the parameters the shipped config gives it (max_fails, fail_timeout).
    shipped = re.search(r"server gateway-\d+:\d+([^;]*);", text)
    assert shipped is not None, "the shipped config names no gateway replicas"
    servers = "".join(
        f"server 127.0.0.1:{gateway_port}{shipped.group(1)};\n" for gateway_port in gateway_ports
    )
    text, replaced = re.subn(r"(\s*server gateway-\d+:\d+[^;]*;)+", "\n" + servers, text, count=1)
    assert replaced == 1, "the shipped config names no gateway replicas"
    text, replaced = re.subn(r"listen 80;", f"listen 127.0.0.1:{port};", text, count=1)
    assert replaced == 1, "the shipped config has no `listen 80;`"
    if upstream_idle_seconds is not None:
        text, replaced = re.subn(
            r"(keepalive_requests \d+;\s*keepalive_timeout )\d+s;",
            rf"\g<1>{upstream_idle_seconds:g}s;",
            text,
            count=1,
        )
        assert replaced == 1, "the shipped config sets no upstream keepalive_timeout"
    text = text.replace("pid /tmp/nginx.pid;", f"pid {directory / 'nginx.pid'};")
    text = text.replace("worker_processes auto;", "worker_processes 1;")
    text = text.replace("error_log /dev/stderr warn;", f"error_log {directory / 'error.log'} warn;")
    text = text.replace("access_log /dev/stdout gateway;", "access_log off;")
    temp = "".join(f"    {name}_temp_path {directory / name};\n" for name in TEMP_PATHS)
    return text.replace("http {\n", "http {\n" + temp, 1)


class NginxProcess:
    """nginx in the foreground with the rendered shipped config, on a free loopback port."""

    def __init__(
        self,
        gateway_ports: Sequence[int],
        directory: Path,
        *,
        upstream_idle_seconds: float | None = None,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = directory / "nginx.conf"
        self.config_path.write_text(
            render_config(
                gateway_ports, self.port, directory, upstream_idle_seconds=upstream_idle_seconds
            ),
            encoding="utf-8",
        )
        self._command = [nginx_binary(), "-p", str(directory), "-c", str(self.config_path)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start nginx (its config checked first) and wait until it listens."""
        subprocess.run([*self._command, "-t", "-q"], check=True, capture_output=True)
        self.process = subprocess.Popen(
            [*self._command, "-g", "daemon off;"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for_port(self.port)

    def stop(self) -> None:
        """Stop nginx and its workers."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=5)


@contextmanager
def running_nginx(
    directory: Path, gateway_ports: Sequence[int], *, upstream_idle_seconds: float | None = None
) -> Iterator[str]:
    """The shipped nginx in front of `gateway_ports` while the block runs; yields its URL."""
    nginx = NginxProcess(gateway_ports, directory, upstream_idle_seconds=upstream_idle_seconds)
    nginx.start()
    try:
        yield nginx.url
    finally:
        nginx.stop()
