"""nginx on loopback in front of gateway processes, started and stopped by `bench.launcher`.

By default nginx runs the config the project ships (`deploy/nginx.conf`): only the replicas, the
listener, the pid, logs and temp paths are pointed at the run's own, and optionally the idle time
of upstream keep-alive connections. The locality and agreement benchmarks ask for `plain`: a
minimal round robin with none of the shipped failover settings, as their figures were made.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from bench.launcher import PROJECT_ROOT, free_port, spawn, stop, wait_for_port

NGINX = "/usr/sbin/nginx"
SHIPPED_CONFIG = PROJECT_ROOT / "deploy" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
INSTALL_HINT = "nginx is required: `apt-get install -y nginx` (scripts/test does this)"


def nginx_binary() -> str:
    """The nginx executable (an AssertionError with the install command without it)."""
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


def plain_config(gateway_ports: Sequence[int], port: int, directory: Path) -> str:
    """A minimal round robin in front of the gateways (no failover settings), files in
    `directory`."""
    servers = "\n".join(f"    server 127.0.0.1:{upstream};" for upstream in gateway_ports)
    temp = "".join(f"  {name}_temp_path {directory / name};\n" for name in TEMP_PATHS)
    return f"""
worker_processes 1;
pid {directory}/nginx.pid;
error_log {directory}/error.log warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
{temp}  upstream gateways {{
{servers}
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 300s;
    }}
  }}
}}
"""


class NginxProcess:
    """nginx in the foreground with the rendered config, on a free loopback port; its config,
    error log and output in `directory`."""

    def __init__(
        self,
        gateway_ports: Sequence[int],
        directory: Path,
        *,
        upstream_idle_seconds: float | None = None,
        plain: bool = False,
    ) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = directory / "nginx.conf"
        self.log_path = directory / "nginx.log"
        if plain:
            text = plain_config(gateway_ports, self.port, directory)
        else:
            text = render_config(
                gateway_ports, self.port, directory, upstream_idle_seconds=upstream_idle_seconds
            )
        self.config_path.write_text(text, encoding="utf-8")
        self._command = [nginx_binary(), "-p", str(directory), "-c", str(self.config_path)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start nginx (its config checked first) and wait until it listens."""
        subprocess.run([*self._command, "-t", "-q"], check=True, capture_output=True)
        self.process = spawn([*self._command, "-g", "daemon off;"], self.log_path)
        wait_for_port(self.port)

    def stop(self) -> None:
        """Stop nginx and its workers (its whole process group)."""
        if self.process is not None:
            stop(self.process, timeout=10)


@contextmanager
def running_nginx(
    directory: Path,
    gateway_ports: Sequence[int],
    *,
    upstream_idle_seconds: float | None = None,
    plain: bool = False,
) -> Iterator[str]:
    """nginx in front of `gateway_ports` while the block runs; yields its URL."""
    nginx = NginxProcess(
        gateway_ports, directory, upstream_idle_seconds=upstream_idle_seconds, plain=plain
    )
    nginx.start()
    try:
        yield nginx.url
    finally:
        nginx.stop()
