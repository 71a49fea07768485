"""The laboratory database: accounts, corrections and the audit log, in one sqlite file.

sqlite in WAL mode with ``synchronous=FULL``: a correction acknowledged to a pathologist has
reached the disk (FULL syncs the WAL at every commit), readers never block the writer, and several
server processes can share the file (``busy_timeout`` makes writers queue instead of failing).
One connection per process and file, guarded by a lock, because the web server calls from a
thread pool.

The databases hold patient-linked records and password hashes: their files are the owner's alone
(0600, folders of patient images 0700), whatever the process' umask (:func:`private_file`,
:func:`private_dir`).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_databases: dict[Path, Database] = {}
_registry_lock = threading.Lock()


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
    """A connection to the sqlite file ``path``, created owner-only (:func:`private_file`)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    private_file(path)
    return sqlite3.connect(path, **kwargs)


class Database:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.RLock()
        self.conn = open_sqlite(path, timeout=30, isolation_level=None, check_same_thread=False)
        self.conn.execute("PRAGMA busy_timeout = 30000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        private_file(path)  # the -wal and -shm files WAL mode has made
        self.conn.execute("PRAGMA synchronous = FULL")
        self.conn.execute("PRAGMA foreign_keys = ON")
        self._schemas: set[str] = set()

    def ensure(self, schema: str) -> None:
        if schema not in self._schemas:
            with self.lock:
                self.conn.executescript(schema)
                self._schemas.add(schema)

    def execute(self, sql: str, params: tuple | dict = ()) -> list[tuple]:
        """A read (or a single self-contained write), fully fetched."""
        with self.lock:
            return self.conn.execute(sql, params).fetchall()


def connect(path: Path, schema: str) -> Database:
    """The process' database for ``path``, with ``schema`` created if missing."""
    path = Path(path).resolve()
    with _registry_lock:
        database = _databases.get(path)
        if database is None:
            database = _databases[path] = Database(path)
    database.ensure(schema)
    return database


@contextmanager
def transaction(database: Database) -> Iterator[sqlite3.Connection]:
    """All or nothing: BEGIN IMMEDIATE (take the write lock up front, so no deadlock between two
    upgrading readers), COMMIT on success, ROLLBACK on any exception."""
    with database.lock:
        database.conn.execute("BEGIN IMMEDIATE")
        try:
            yield database.conn
        except BaseException:
            database.conn.execute("ROLLBACK")
            raise
        database.conn.execute("COMMIT")


def rows_as_dicts(database: Database, sql: str, params: tuple | dict = ()) -> list[dict[str, Any]]:
    with database.lock:
        cursor = database.conn.execute(sql, params)
        names = [c[0] for c in cursor.description]
        return [dict(zip(names, row)) for row in cursor.fetchall()]
