"""Where kept patient images live: content-addressed by their sha256, written whole or not at all,
deleted without racing a writer. The prediction log (request images kept for review) and the
corrections (corrected images, training data) each keep theirs in one :class:`ImageStore`:

* :class:`FolderImageStore`, the embedded default (the store's database is a sqlite file): files
  ``<folder>/<xx>/<sha256>``, the owner's alone (files 0600, folders 0700), written to a temporary
  file and renamed into place (with ``fsync`` of the file and the folder when asked), so a file is
  complete or absent; its modification time is when it was last stored.
* :class:`DatabaseImageStore`, lab mode (the store's database is a PostgreSQL server): a table of the
  store's database (``prediction_images``, ``correction_images``: sha256, the bytes, their size,
  ``stored_at`` in Unix time), so a replica, worker or CLI on any host reads an image another host
  kept, and nothing but the database server is shared. A row is committed whole or not at all.

:func:`for_database` picks one by the rule "a database server keeps the images, a sqlite file keeps
a folder"; there is no setting. The interface, the same for both:

``put(sha256, data)``
    store the bytes (again: nothing rewritten, ``stored_at`` refreshed: "last seen");
``get(sha256) -> bytes | None``
    the bytes, or None when not kept (never kept, or purged);
``kept(hashes) -> set``
    which of ``hashes`` are kept;
``entries() -> list[StoredImage]``
    every kept image's sha256, size and ``stored_at``, for retention to choose from;
``total_bytes() -> int``
    what they take;
``remove(hashes, still_wanted) -> int``
    delete ``hashes`` except those ``still_wanted(hashes)`` names, asked so that a row written
    meanwhile is never left without its image (below).

Race safety of :meth:`remove`, given that every writer commits its row *before* it puts its image
(the prediction log), or puts its image again after its row (corrections): the folder store moves
the files aside, then asks ``still_wanted``, then puts back those wanted (:func:`purge_files`); a
writer whose row comes after the question finds no file and writes one. The database store does it
in one transaction that first takes the table's write lock (``SHARE ROW EXCLUSIVE``: no ``put`` runs
until it commits), then asks ``still_wanted`` (a fresh snapshot, so every row committed before the
lock is seen), then deletes the rest; a writer whose row comes after the question puts its image
once the lock is gone, and its upsert inserts it afresh.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy import Connection, bindparam, text

from hematovision.database import Database, private_dir

SHA256 = re.compile(r"[0-9a-f]{64}")
_ASIDE = ".purging-"  # <sha256>.purging-<unix time>-<pid>-<random>: a file a purge moved aside
STALE_ASIDE_SECONDS = 3600  # a file moved aside this long ago belongs to a purge that died
_CHUNK = 500  # hashes per IN (...) list


@dataclass(frozen=True)
class StoredImage:
    sha256: str
    size: int
    stored_at: float  # Unix time it was last stored


class ImageStore(Protocol):
    def put(self, sha256: str, data: bytes) -> None: ...
    def get(self, sha256: str) -> bytes | None: ...
    def kept(self, hashes: Iterable[str]) -> set[str]: ...
    def entries(self) -> list[StoredImage]: ...
    def total_bytes(self) -> int: ...
    def remove(self, hashes: Sequence[str], still_wanted: Callable[[list[str]], set[str]]) -> int: ...


def for_database(database: Database, table: str, folder: Path | None, fsync: bool) -> ImageStore:
    """The image store of a store whose rows are in ``database``: its table ``table`` when that is a
    database server (every host shares it), else the folder ``folder`` (``fsync``: each file and its
    folder flushed to disk before ``put`` returns)."""
    if database.is_sqlite:
        if folder is None:
            raise ValueError("a store in a sqlite file keeps its images in a folder: give one")
        return FolderImageStore(folder, fsync)
    return DatabaseImageStore(database, table)


class FolderImageStore:
    """Images as files ``<folder>/<xx>/<sha256>`` on this host."""

    def __init__(self, folder: Path, fsync: bool = False) -> None:
        self.folder = Path(folder)
        self.fsync = fsync

    def path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / sha256

    def put(self, sha256: str, data: bytes) -> None:
        target = self.path(sha256)
        try:
            os.utime(target)  # content-addressed: already there, now "last seen"
            return
        except FileNotFoundError:  # new, or taken by a purge a moment ago: written afresh
            pass
        private_dir(self.folder)  # patient images: the owner's alone
        private_dir(target.parent)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            os.fchmod(tmp.fileno(), 0o600)
            tmp.write(data)
            if self.fsync:
                tmp.flush()
                os.fsync(tmp.fileno())
        os.replace(tmp.name, target)
        if self.fsync:  # the rename itself reaches the disk
            folder = os.open(target.parent, os.O_RDONLY)
            try:
                os.fsync(folder)
            finally:
                os.close(folder)

    def get(self, sha256: str) -> bytes | None:
        if not SHA256.fullmatch(sha256):
            return None
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError:
            return None

    def kept(self, hashes: Iterable[str]) -> set[str]:
        return {sha for sha in hashes if SHA256.fullmatch(sha) and self.path(sha).is_file()}

    def entries(self) -> list[StoredImage]:
        return [StoredImage(path.name, stat.st_size, stat.st_mtime) for path, stat in image_files(self.folder)]

    def total_bytes(self) -> int:
        return sum(stat.st_size for _, stat in image_files(self.folder))

    def remove(self, hashes: Sequence[str], still_wanted: Callable[[list[str]], set[str]]) -> int:
        return purge_files([self.path(sha) for sha in hashes if SHA256.fullmatch(sha)], still_wanted)


class DatabaseImageStore:
    """Images as rows of ``table`` (sha256, data, size, stored_at) in the store's own database."""

    def __init__(self, database: Database, table: str) -> None:
        if table not in ("prediction_images", "correction_images"):  # interpolated into SQL below
            raise ValueError(f"no image table {table!r}")
        self.db = database
        self.table = table

    def put(self, sha256: str, data: bytes) -> None:
        with self.db.transaction() as connection:
            self._upsert(connection, sha256, data, time.time())

    def _upsert(self, connection: Connection, sha256: str, data: bytes, stored_at: float) -> None:
        # The same bytes again keep the stored ones and move stored_at forward, never back (an
        # image carried from a folder keeps its file's age unless the table has seen it since).
        sql = text(
            f"INSERT INTO {self.table} (sha256, data, size, stored_at) VALUES (:sha256, :data, :size, :stored_at) "
            f"ON CONFLICT (sha256) DO UPDATE SET stored_at = CASE WHEN excluded.stored_at > {self.table}.stored_at "
            f"THEN excluded.stored_at ELSE {self.table}.stored_at END"
        )
        connection.execute(sql, {"sha256": sha256, "data": bytes(data), "size": len(data), "stored_at": stored_at})

    def get(self, sha256: str) -> bytes | None:
        rows = self.db.query(f"SELECT data FROM {self.table} WHERE sha256 = :sha", {"sha": sha256})
        return bytes(rows[0][0]) if rows else None

    def kept(self, hashes: Iterable[str]) -> set[str]:
        hashes = list(dict.fromkeys(hashes))
        found: set[str] = set()
        if not hashes:
            return found
        sql = text(f"SELECT sha256 FROM {self.table} WHERE sha256 IN :hashes").bindparams(
            bindparam("hashes", expanding=True)
        )
        with self.db.reading() as connection:
            for start in range(0, len(hashes), _CHUNK):
                found.update(r[0] for r in connection.execute(sql, {"hashes": hashes[start : start + _CHUNK]}))
        return found

    def entries(self) -> list[StoredImage]:
        rows = self.db.query(f"SELECT sha256, size, stored_at FROM {self.table}")
        return [StoredImage(sha, int(size), float(at)) for sha, size, at in rows]

    def total_bytes(self) -> int:
        return int(self.db.query(f"SELECT COALESCE(SUM(size), 0) FROM {self.table}")[0][0])

    def remove(self, hashes: Sequence[str], still_wanted: Callable[[list[str]], set[str]]) -> int:
        hashes = list(dict.fromkeys(hashes))
        if not hashes:
            return 0
        delete = text(f"DELETE FROM {self.table} WHERE sha256 IN :hashes").bindparams(
            bindparam("hashes", expanding=True)
        )
        with self.db.transaction() as connection:
            if not self.db.is_sqlite:  # sqlite: BEGIN IMMEDIATE already holds the only write lock
                connection.execute(text(f"LOCK TABLE {self.table} IN SHARE ROW EXCLUSIVE MODE"))
            wanted = still_wanted(hashes)
            doomed = [sha for sha in hashes if sha not in wanted]
            removed = 0
            for start in range(0, len(doomed), _CHUNK):
                removed += connection.execute(delete, {"hashes": doomed[start : start + _CHUNK]}).rowcount
        return int(removed)

    def take_folder(self, folder: Path) -> dict[str, int]:
        """Carry the images of a :class:`FolderImageStore` at ``folder`` (this host's, from before
        lab mode) into the table, each keeping its age, and delete each file once its row is
        committed. A file whose bytes do not hash to its name is left where it is and counted.
        Returns ``{"images": carried, "bytes": their size, "left": files left}``."""
        carried, size, left = 0, 0, 0
        for path, stat in image_files(folder):
            try:
                data = path.read_bytes()
            except FileNotFoundError:  # purged meanwhile
                continue
            if hashlib.sha256(data).hexdigest() != path.name:
                left += 1
                continue
            with self.db.transaction() as connection:
                self._upsert(connection, path.name, data, stat.st_mtime)
            path.unlink(missing_ok=True)  # committed: the database holds it now
            carried += 1
            size += len(data)
        return {"images": carried, "bytes": size, "left": left}


def image_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """The content-addressed files under ``folder`` (``<xx>/<sha256>``) with their stat; files a
    purge that died left aside are deleted on the way."""
    if not folder.exists():
        return []
    out = []
    for path in folder.rglob("*"):
        try:
            if SHA256.fullmatch(path.name) and path.is_file():
                out.append((path, path.stat()))
            elif (
                _ASIDE in path.name
                and time.time() - float(path.name.split(_ASIDE)[1].split("-")[0]) > STALE_ASIDE_SECONDS
            ):
                path.unlink(missing_ok=True)
        except (FileNotFoundError, ValueError):  # purged meanwhile by another worker; a name not ours
            continue
    return out


def purge_files(paths: Sequence[Path], still_wanted: Callable[[list[str]], set[str]]) -> int:
    """Delete the content-addressed files ``paths``, except those whose name (the sha256) is in
    ``still_wanted(names)``, asked *after* every file has been moved aside: a row (or correction)
    written meanwhile either is seen then, and its file is put back, or comes after, and its writer
    finds no file and writes one. Files already gone (another worker's purge) are skipped. Returns
    how many were deleted."""
    aside: list[tuple[Path, Path]] = []
    for path in paths:
        moved = path.with_name(f"{path.name}{_ASIDE}{int(time.time())}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(path, moved)
        except FileNotFoundError:
            continue
        aside.append((path, moved))
    wanted = still_wanted([path.name for path, _ in aside]) if aside else set()
    removed = 0
    for path, moved in aside:
        if path.name in wanted:
            with contextlib.suppress(FileNotFoundError):
                os.replace(moved, path)
                os.utime(path)
        else:
            moved.unlink(missing_ok=True)
            removed += 1
    return removed
