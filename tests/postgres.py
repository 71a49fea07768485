"""A throwaway PostgreSQL server for tests: Debian's ``postgresql`` binaries (``.ci/run`` installs
them), a cluster in a temporary folder on a free port of 127.0.0.1, stopped and deleted afterwards.
Its fixtures are a plugin of ``tests/conftest.py`` (``pytest_plugins``), so every test folder has
them: a second ``conftest.py`` would shadow the top one, which test modules import as ``conftest``.

``initdb`` and ``postgres`` refuse to run as root; as root (CI containers, this machine) the cluster
belongs to the unprivileged ``postgres`` user the package creates (``nobody`` without it) and every
server command runs as that user (``runuser``). Tests that need a server skip only when no
PostgreSQL binaries exist at all.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from hematovision.api.process import free_port


def postgres_bindir() -> Path | None:
    """The folder of ``initdb`` and ``pg_ctl``: on PATH, or Debian's versioned folder (newest)."""
    on_path = shutil.which("pg_ctl")
    if on_path and shutil.which("initdb"):
        return Path(on_path).parent
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    return Path(found[-1]).parent if found else None


class PostgresServer:
    """One cluster: :meth:`start`, :meth:`stop` (and start again: same data, same port), :meth:`url`."""

    def __init__(self, bindir: Path) -> None:
        self.bindir = bindir
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="hv-postgres-"))  # under /tmp: reachable by the server's user
        self.data = self.dir / "data"
        self.owner = None
        if os.geteuid() == 0:
            name = "postgres" if _user_exists("postgres") else "nobody"
            self.owner = pwd.getpwnam(name)
            os.chown(self.dir, self.owner.pw_uid, self.owner.pw_gid)
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--no-sync")

    def _run(self, program: str, *args: str) -> None:
        command = [str(self.bindir / program), *args]
        if self.owner is not None:
            command = ["runuser", "-u", self.owner.pw_name, "--", *command]
        subprocess.run(command, check=True, capture_output=True, text=True, cwd=self.dir)

    def start(self) -> None:
        options = f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-o", options, "-l", str(self.dir / "server.log"), "-w", "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def running(self) -> bool:
        try:
            with psycopg.connect(self.libpq_url(), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def libpq_url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def url(self, database: str = "postgres") -> str:
        """The SQLAlchemy URL (what ``HEMATOVISION_DATABASE_URL`` takes)."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self, name: str | None = None) -> str:
        """A fresh, empty database (named ``name``, else at random); returns its SQLAlchemy URL."""
        name = name or f"hv_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.libpq_url(), autocommit=True) as connection:
            connection.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


@contextlib.contextmanager
def running_server() -> Iterator[PostgresServer]:
    """A started server of its own, destroyed afterwards; the test skips without PostgreSQL binaries."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (apt-get install postgresql; .ci/run installs them)")
    server = PostgresServer(bindir)
    server.start()
    try:
        yield server
    finally:
        server.destroy()


@pytest.fixture(scope="session")
def postgres_server():
    """The session's PostgreSQL server, running at the start of every test that asks for it."""
    with running_server() as server:
        yield server


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh database in the running server (a test that stopped the server gets it back)."""
    if not postgres_server.running():
        postgres_server.start()
    return postgres_server.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> dict[str, str | Path]:
    """Where each store lives for this run: its own sqlite file, or one fresh PostgreSQL database."""
    if request.param == "sqlite":
        return {
            "lab": tmp_path / "lab.sqlite",
            "predictions": tmp_path / "predictions.sqlite",
            "monitoring": tmp_path / "monitor.sqlite",
        }
    url = request.getfixturevalue("postgres_url")
    return dict.fromkeys(("lab", "predictions", "monitoring"), url)
