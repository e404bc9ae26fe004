"""A real nginx in front of gateway processes: keep-alive upstreams, as deploy/nginx.conf has."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from tests.support.gateway import free_port, wait_for_port

NGINX = "/usr/sbin/nginx"
# A replica that refused a connection is skipped this long (deploy/nginx.conf: the same).
FAIL_SECONDS = 2
INSTALL_HINT = "nginx is required: `apt-get install -y nginx` (scripts/test does this)"


def nginx_binary() -> str:
    """The nginx executable (the test fails, never skips, without it)."""
    found = shutil.which("nginx") or (NGINX if Path(NGINX).exists() else None)
    assert found is not None, INSTALL_HINT
    return found


def nginx_conf(work: Path, port: int, upstreams: Sequence[int], *, idle_seconds: float) -> str:
    """deploy/nginx.conf's proxying, on loopback: keep-alive upstreams idle `idle_seconds` at
    most, refused connections tried on the next replica (which is then skipped for
    FAIL_SECONDS), a sent POST never replayed."""
    servers = "\n".join(
        f"    server 127.0.0.1:{upstream} max_fails=1 fail_timeout={FAIL_SECONDS}s;"
        for upstream in upstreams
    )
    return f"""
worker_processes 1;
daemon off;
pid {work}/nginx.pid;
error_log {work}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log {work}/nginx-access.log;
  client_body_temp_path {work}/body;
  proxy_temp_path {work}/proxy;
  fastcgi_temp_path {work}/fastcgi;
  uwsgi_temp_path {work}/uwsgi;
  scgi_temp_path {work}/scgi;
  upstream gateways {{
{servers}
    keepalive 64;
    keepalive_requests 10000;
    keepalive_timeout {idle_seconds:g}s;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://gateways;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_connect_timeout 5s;
      proxy_read_timeout 120s;
      proxy_next_upstream error timeout;
      proxy_next_upstream_tries 3;
    }}
  }}
}}
"""


@contextmanager
def running_nginx(
    work: Path, upstreams: Sequence[int], *, idle_seconds: float = 1.0
) -> Iterator[str]:
    """nginx on a free loopback port in front of `upstreams`; yields its URL."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(nginx_conf(work, port, upstreams, idle_seconds=idle_seconds), "utf-8")
    with (work / "nginx.log").open("wb") as log:
        process = subprocess.Popen(
            [nginx_binary(), "-c", str(conf), "-p", str(work)], stdout=log, stderr=log
        )
    try:
        wait_for_port(port)
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
