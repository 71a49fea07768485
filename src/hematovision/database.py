"""The platform's databases: the lab database (accounts, corrections, audit), the prediction log and
the monitoring state, on sqlite files (the embedded default) or on one PostgreSQL server (lab mode).

Which one is a setting (``lab.database_url``): empty, each store keeps its own sqlite file; a
``postgresql+psycopg://`` URL puts every store in that database, shared by every host and process.
The stores speak SQL through SQLAlchemy (plain ``text()`` statements both engines understand) and
their schemas are Alembic migrations (``hematovision.migrations``), applied on first use.

sqlite, as before lab mode: WAL mode with ``synchronous=FULL`` (the prediction log: ``NORMAL``),
so a correction acknowledged to a pathologist has reached the disk, readers never block the
writer, and several server processes can share the file (``busy_timeout`` makes writers queue
instead of failing). A write transaction starts with ``BEGIN IMMEDIATE``: it takes the write lock
up front, so two upgrading readers cannot deadlock.

PostgreSQL: a commit returns once the server has flushed it (the server's default
``synchronous_commit``), the same promise. Connections are checked before use
(``pool_pre_ping``), so after the server restarts the same process carries on; while it is down
every store raises :class:`DatabaseUnavailable`, which the service answers with a 503.

The databases hold patient-linked records and password hashes: sqlite files are the owner's alone
(0600, folders of patient images 0700), whatever the process' umask (:func:`private_file`,
:func:`private_dir`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, exc, text
from sqlalchemy.engine import make_url

from hematovision import migrations

_databases: dict[str, Database] = {}
_registry_lock = threading.Lock()
BUSY_TIMEOUT_SECONDS = 30
CONNECT_TIMEOUT_SECONDS = 5  # PostgreSQL: how long a connection attempt to a silent host may take
# sqlite errors that mean "cannot be used now", not "this statement is wrong" ("no such table" is
# an OperationalError too, and a bug, not an outage).
_SQLITE_UNAVAILABLE = ("locked", "busy", "unable to open", "disk i/o", "readonly", "disk is full")


class DatabaseUnavailable(RuntimeError):
    """The database cannot be reached or used right now (PostgreSQL down or unreachable, a sqlite
    file locked beyond the busy timeout). Nothing was written by the call that raised it; the same
    store works again once the database is back."""


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def private_file(path: Path) -> None:
    """Create ``path`` if missing and make it (and an sqlite database's ``-wal``/``-shm`` files,
    which sqlite creates with the database's mode) readable and writable by its owner only.

    An existing file is never opened: closing any descriptor of a database file drops every POSIX
    lock this process holds on it, the sqlite connections' included, and a write of theirs can then
    be lost to another process's checkpoint (sqlite's "how to corrupt" note, section 2.2)."""
    if not path.exists():
        with contextlib.suppress(FileExistsError):  # another thread or process made it meanwhile
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    for file in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        with contextlib.suppress(FileNotFoundError):
            os.chmod(file, 0o600)  # not the umask's choice: set, not asked for


def private_dir(path: Path) -> None:
    """Create the folder ``path`` (with its parents) and make it its owner's alone (0700)."""
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)


def open_sqlite(path: Path, **kwargs: Any) -> sqlite3.Connection:
    """A plain sqlite3 connection to ``path``, created owner-only (:func:`private_file`); for a
    per-host file that is no store of this module (the embedding cache)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    private_file(path)
    return sqlite3.connect(path, **kwargs)


def is_server_url(target: str | Path) -> bool:
    """Whether ``target`` names a database server (a URL) rather than a sqlite file."""
    return isinstance(target, str) and "://" in target


class Database:
    """One process' engine for one database: a sqlite file or a PostgreSQL URL (see :func:`connect`)."""

    def __init__(self, target: str | Path, synchronous: str = "FULL") -> None:
        if is_server_url(target):
            url = make_url(str(target))
            if not url.drivername.startswith("postgresql"):
                raise ValueError(f"lab.database_url must be a postgresql+psycopg:// URL, not {url.drivername}://")
            self.path: Path | None = None
            self.name = url.render_as_string(hide_password=True)
            self.engine: Engine = create_engine(
                url.set(drivername="postgresql+psycopg"),
                pool_pre_ping=True,  # a connection the server dropped (restart, failover) is replaced, not used
                connect_args={"connect_timeout": CONNECT_TIMEOUT_SECONDS},
            )
        else:
            self.path = Path(target).resolve()
            self.name = str(self.path)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            private_file(self.path)
            self.engine = create_engine(
                f"sqlite:///{self.path}",
                connect_args={"timeout": BUSY_TIMEOUT_SECONDS, "check_same_thread": False},
            )
            _sqlite_pragmas(self.engine, self.path, synchronous)
        self.dialect = self.engine.dialect.name
        self._writer = self.engine.execution_options(write=True)
        # The stores whose tables this process uses here, and those already at this version's schema.
        self._stores: set[str] = set()
        self._migrated: set[str] = set()
        self._migrating = threading.Lock()

    def require(self, store: str) -> None:
        """Note that ``store``'s tables are used here: the first use migrates them (not this call,
        so a store can be made while the database is down)."""
        self._stores.add(store)

    def _ensure_schema(self) -> None:
        if self._stores <= self._migrated:
            return
        with self._migrating:
            for store in sorted(self._stores - self._migrated):
                migrations.upgrade(self, store)
                self._migrated.add(store)

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @contextmanager
    def transaction(self, migrated: bool = True) -> Iterator[Connection]:
        """All or nothing: COMMIT on success (durable when this returns), ROLLBACK on any exception.
        ``migrated=False`` is for the migrations themselves: no schema check first."""
        with self._reachable():
            if migrated:
                self._ensure_schema()
            with self._writer.begin() as connection:
                yield connection

    @contextmanager
    def reading(self, migrated: bool = True) -> Iterator[Connection]:
        """A connection for reads (one consistent snapshot on sqlite; each statement its own on
        PostgreSQL's default READ COMMITTED)."""
        with self._reachable():
            if migrated:
                self._ensure_schema()
            with self.engine.connect() as connection:
                yield connection
                connection.rollback()

    def query(self, sql: str, params: Mapping[str, Any] | None = None) -> list[tuple]:
        """A read, fully fetched."""
        with self.reading() as connection:
            return [tuple(row) for row in connection.execute(text(sql), params or {})]

    def rows(self, sql: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        """A read, fully fetched, as one dict per row."""
        with self.reading() as connection:
            return [dict(row) for row in connection.execute(text(sql), params or {}).mappings()]

    def execute(self, sql: str, params: Mapping[str, Any] | None = None) -> int:
        """A single self-contained write, committed; returns how many rows it touched."""
        with self.transaction() as connection:
            return int(connection.execute(text(sql), params or {}).rowcount)

    @contextmanager
    def _reachable(self) -> Iterator[None]:
        try:
            yield
        except exc.DBAPIError as error:
            if self._means_unavailable(error):
                raise DatabaseUnavailable(f"the database {self.name} is unavailable: {_first_line(error)}") from error
            raise

    def _means_unavailable(self, error: exc.DBAPIError) -> bool:
        if error.connection_invalidated:
            return True
        if self.is_sqlite:
            return isinstance(error, exc.OperationalError) and any(
                word in str(error.orig).lower() for word in _SQLITE_UNAVAILABLE
            )
        # psycopg: OperationalError is the connection or the server (refused, shut down, timed out);
        # InterfaceError a connection already closed under us.
        return isinstance(error, exc.OperationalError | exc.InterfaceError)

    def dispose(self) -> None:
        self.engine.dispose()


def _first_line(error: exc.DBAPIError) -> str:
    return (str(error.orig).strip().splitlines() or [type(error.orig).__name__])[0]


def _sqlite_pragmas(engine: Engine, path: Path, synchronous: str) -> None:
    """Every connection to the file: WAL, the durability asked for, foreign keys, a busy timeout;
    transactions begun by this module (``BEGIN``, or ``BEGIN IMMEDIATE`` for writes) rather than by
    the sqlite3 module's implicit ones, which would not take the write lock up front."""

    @event.listens_for(engine, "connect")
    def configure(connection: sqlite3.Connection, _record: Any) -> None:
        connection.isolation_level = None
        connection.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_SECONDS * 1000}")
        _retry_locked(lambda: connection.execute("PRAGMA journal_mode = WAL"))
        private_file(path)  # the -wal and -shm files WAL mode has made
        connection.execute(f"PRAGMA synchronous = {synchronous}")
        connection.execute("PRAGMA foreign_keys = ON")

    @event.listens_for(engine, "begin")
    def begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE" if connection.get_execution_options().get("write") else "BEGIN")


def _retry_locked(action, attempts: int = 20) -> Any:
    """Run ``action``, retrying while another process holds the file beyond the busy timeout's
    reach (switching the journal mode needs a moment with nobody else in it)."""
    for attempt in range(attempts):
        try:
            return action()
        except sqlite3.OperationalError as error:
            if ("locked" not in str(error) and "busy" not in str(error)) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None


def _forget_connections_in_child() -> None:
    """A forked process (a serving worker) must not use its parent's connections: sqlite's locks
    and a PostgreSQL session belong to one process. Drop them (unclosed: they are the parent's);
    the child's pools open their own. No lock taken: another thread may have held it at the fork."""
    for database in list(_databases.values()):
        database.engine.dispose(close=False)


os.register_at_fork(after_in_child=_forget_connections_in_child)


def get(target: str | Path, synchronous: str = "FULL") -> Database:
    """The process' database for ``target`` (a sqlite file or a PostgreSQL URL), as it is (no
    migration); ``synchronous`` is a sqlite file's durability (FULL or NORMAL), set when first opened."""
    key = str(target) if is_server_url(target) else str(Path(target).resolve())
    with _registry_lock:
        database = _databases.get(key)
        if database is None:
            database = _databases[key] = Database(target, synchronous)
    return database


def connect(target: str | Path, store: str, synchronous: str = "FULL") -> Database:
    """The process' database for ``target``, with the tables of ``store`` (``lab``, ``predictions``,
    ``monitoring``: see :mod:`hematovision.migrations`) migrated to this version on first use.
    Nothing is opened yet: a store made while its database is down works once it is back."""
    database = get(target, synchronous)
    database.require(store)
    return database
