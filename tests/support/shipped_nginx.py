"""The shipped `deploy/nginx.conf` as a real nginx on loopback, in front of test gateways."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests.support.gateway import PROJECT_ROOT, free_port, wait_for_port
from tests.support.nginx import nginx_binary

SHIPPED_CONFIG = PROJECT_ROOT / "deploy" / "nginx.conf"
TEMP_PATHS = ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")


def render_config(gateway_ports: list[int], port: int, directory: Path) -> str:
    """The shipped config with its replicas, listener and writable paths pointed at the test's
    own; every other directive as shipped."""
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
    text = text.replace("pid /tmp/nginx.pid;", f"pid {directory / 'nginx.pid'};")
    text = text.replace("worker_processes auto;", "worker_processes 1;")
    text = text.replace("error_log /dev/stderr warn;", f"error_log {directory / 'error.log'} warn;")
    text = text.replace("access_log /dev/stdout gateway;", "access_log off;")
    temp = "".join(f"    {name}_temp_path {directory / name};\n" for name in TEMP_PATHS)
    return text.replace("http {\n", "http {\n" + temp, 1)


class NginxProcess:
    """nginx in the foreground with the rendered shipped config, on a free loopback port."""

    def __init__(self, gateway_ports: list[int], directory: Path) -> None:
        binary = nginx_binary()
        assert binary is not None, "nginx is not installed"
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        directory.chmod(0o777)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = directory / "nginx.conf"
        self.config_path.write_text(
            render_config(gateway_ports, self.port, directory), encoding="utf-8"
        )
        self._command = [binary, "-p", str(directory), "-c", str(self.config_path)]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start nginx (checked first) and wait until it listens."""
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
