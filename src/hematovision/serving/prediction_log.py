"""The prediction log: one row per served prediction, for drift monitoring, audits and review queues.

Why sqlite in WAL mode: it needs no server, and several serving workers (separate processes) append
to one file while a monitoring job reads it; WAL lets readers run during writes, and
``busy_timeout`` makes concurrent writers wait their turn instead of failing. The schema is plain
SQL, so moving to a server database later is a copy, not a rewrite.

What a row holds and why:

* the model version, label, confidence, all probabilities and the ``needs_review`` flag: enough
  to audit any answer and to build a review queue without re-running the model;
* the backbone embedding as **float16 bytes** (1280 values, 2.5 KB): embedding drift is the most
  sensitive signal that the input distribution moved, and float16 keeps ~3 significant digits, far
  more than distances or per-dimension distributions need, at half the size of float32. A random
  projection would be smaller but would tie the log to a projection matrix forever;
* cheap image statistics (brightness, hue, sharpness...) for drift dashboards people can read;
* latency and the image's sha256, so a complaint about an image can be matched to its prediction.

Images themselves are not stored (they may be patient material) unless a retention setting says
so: ``retain_images_days`` for every image, ``review_image_days`` for the images of predictions
flagged ``needs_review`` (the review queue shows them to pathologists). Kept images are
content-addressed under ``images_dir``; the row is written first and the image after it, and
:meth:`PredictionStore.purge_images` deletes an image only once it is older than its retention *and*
no row newer than that retention names it, checked after the file has been moved aside
(:func:`purge_files`), so an image whose row has just been written is never lost to a purge running
at the same moment. :meth:`PredictionStore.enforce_budget` caps the disk they take (oldest first) and
:meth:`PredictionStore.drop_embeddings` clears old rows' embeddings; ``serving/retention.py`` runs
them all. Image bytes never go to any log.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from hematovision.database import open_sqlite, private_dir, private_file

SCHEMA_VERSION = 2  # 2: open_set_score
_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id            TEXT PRIMARY KEY,      -- uuid4 hex, returned to the client as prediction_id
    created_at    TEXT NOT NULL,         -- UTC ISO 8601
    model_version TEXT NOT NULL,
    label         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    probabilities TEXT NOT NULL,         -- JSON {class: probability}
    needs_review  INTEGER NOT NULL,      -- 0/1
    embedding     BLOB,                  -- float16 little-endian, embedding_dim values
    embedding_dim INTEGER,
    image_stats   TEXT NOT NULL,         -- JSON, see imaging.image_stats
    latency_ms    REAL NOT NULL,
    image_sha256  TEXT NOT NULL,
    open_set_score REAL                  -- the model's open-set score (model/open_set.py); NULL without one
);
CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at);
CREATE INDEX IF NOT EXISTS predictions_model_version ON predictions (model_version);
"""
_COLUMNS = (
    "id",
    "created_at",
    "model_version",
    "label",
    "confidence",
    "probabilities",
    "needs_review",
    "embedding",
    "embedding_dim",
    "image_stats",
    "latency_ms",
    "image_sha256",
    "open_set_score",
)


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


@dataclass
class PredictionRecord:
    """One prediction as logged; ``id`` and ``created_at`` are filled in when not given."""

    model_version: str
    label: str
    confidence: float
    probabilities: dict[str, float]
    needs_review: bool
    image_sha256: str
    latency_ms: float
    image_stats: dict[str, float] = field(default_factory=dict)
    embedding: np.ndarray | None = None
    open_set_score: float | None = None  # label "unknown" when the model found it beyond its threshold
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created_at: str = field(default_factory=utc_now)

    def row(self) -> tuple:
        emb = None if self.embedding is None else np.asarray(self.embedding, dtype="<f2").ravel()
        return (
            self.id,
            self.created_at,
            str(self.model_version),
            self.label,
            float(self.confidence),
            json.dumps({k: float(v) for k, v in self.probabilities.items()}),
            int(bool(self.needs_review)),
            None if emb is None else emb.tobytes(),
            None if emb is None else int(emb.size),
            json.dumps(self.image_stats),
            float(self.latency_ms),
            self.image_sha256,
            None if self.open_set_score is None or not np.isfinite(self.open_set_score) else float(self.open_set_score),
        )


def decode_embedding(blob: bytes | None) -> np.ndarray | None:
    """The logged embedding back as float32."""
    return None if blob is None else np.frombuffer(blob, dtype="<f2").astype(np.float32)


class PredictionStore:
    """Appends predictions to the sqlite log; safe to share between threads and processes."""

    def __init__(
        self,
        db_path: Path,
        images_dir: Path | None = None,
        retain_images: bool = False,
        retain_review_images: bool = False,
    ) -> None:
        self.db_path = Path(db_path)
        self.images_dir = Path(images_dir) if images_dir is not None else self.db_path.parent / "images"
        self.retain_images = retain_images
        self.retain_review_images = retain_review_images
        self._lock = threading.Lock()  # one connection per store, used by one thread at a time
        self._conn = open_sqlite(self.db_path, timeout=30, isolation_level=None, check_same_thread=False)
        self._conn.row_factory = sqlite3.Row
        with self._lock:
            self._conn.execute("PRAGMA busy_timeout = 30000")
            _retry_locked(lambda: self._conn.execute("PRAGMA journal_mode = WAL"))
            # NORMAL is durable across application crashes in WAL mode; only an OS crash or power
            # cut can lose the last few transactions, an acceptable risk for a monitoring log.
            self._conn.execute("PRAGMA synchronous = NORMAL")
            _retry_locked(lambda: self._conn.executescript(_SCHEMA))
            _retry_locked(self._upgrade)
            self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        private_file(self.db_path)  # the -wal and -shm files WAL mode has made

    def _upgrade(self) -> None:
        """Bring a log written by an older version up to this schema (columns only ever added)."""
        columns = {row[1] for row in self._conn.execute("PRAGMA table_info(predictions)")}
        if "open_set_score" not in columns:
            self._conn.execute("ALTER TABLE predictions ADD COLUMN open_set_score REAL")

    def log(self, record: PredictionRecord, image: bytes | None = None) -> str:
        return self.log_many([record], None if image is None else [image])[0]

    def log_many(self, records: Sequence[PredictionRecord], images: Sequence[bytes] | None = None) -> list[str]:
        """Append records in one transaction (one fsync per batch, not per image), then keep the
        images the retention asks for; returns the ids. Row first: a purge that runs meanwhile sees
        the row and keeps the image (or the image is written after the purge took the old copy)."""
        self._insert(records)
        if images is not None:
            for record, data in zip(records, images):
                if self.retain_images or (self.retain_review_images and record.needs_review):
                    self._store_image(record.image_sha256, data)
        return [r.id for r in records]

    def _insert(self, records: Sequence[PredictionRecord]) -> None:
        placeholders = ", ".join("?" * len(_COLUMNS))
        sql = f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES ({placeholders})"
        rows = [r.row() for r in records]
        with self._lock:

            def write() -> None:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    self._conn.executemany(sql, rows)
                    self._conn.execute("COMMIT")
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise

            _retry_locked(write)

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        with self._lock:
            row = self._conn.execute("SELECT * FROM predictions WHERE id = ?", (prediction_id,)).fetchone()
        if row is None:
            return None
        out = dict(row)
        out["probabilities"] = json.loads(out["probabilities"])
        out["image_stats"] = json.loads(out["image_stats"])
        out["needs_review"] = bool(out["needs_review"])
        out["embedding"] = decode_embedding(out["embedding"])
        image = self.image_path(out["image_sha256"])
        out["image_path"] = str(image) if image.exists() else None
        return out

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])

    def image_path(self, sha256: str) -> Path:
        return self.images_dir / sha256[:2] / sha256

    def _store_image(self, sha256: str, data: bytes) -> None:
        """Write once per content (atomic rename); a repeat sighting refreshes the retention clock."""
        target = self.image_path(sha256)
        try:
            os.utime(target)
            return
        except FileNotFoundError:  # new, or taken by a purge a moment ago: written afresh
            pass
        private_dir(self.images_dir)  # patient images: the owner's alone
        private_dir(target.parent)
        with tempfile.NamedTemporaryFile(dir=target.parent, delete=False) as tmp:
            os.fchmod(tmp.fileno(), 0o600)
            tmp.write(data)
        os.replace(tmp.name, target)

    def purge_images(self, older_than_days: float, review_older_than_days: float | None = None) -> int:
        """Delete retained images last seen more than ``older_than_days`` ago (images of predictions
        that needed review: ``review_older_than_days``, default the same) that no newer row names;
        returns how many. Safe to run in several processes at once."""
        review_days = older_than_days if review_older_than_days is None else review_older_than_days
        now = time.time()
        review = self.review_image_hashes() if review_days != older_than_days else set()
        candidates = [
            path
            for path, stat in image_files(self.images_dir)
            if stat.st_mtime <= now - (review_days if path.name in review else older_than_days) * 86400
        ]
        cutoff, review_cutoff = _iso(now - older_than_days * 86400), _iso(now - review_days * 86400)

        def named_by_a_newer_row(hashes: list[str]) -> set[str]:
            found: set[str] = set()
            for start in range(0, len(hashes), 500):
                chunk = hashes[start : start + 500]
                with self._lock:
                    rows = self._conn.execute(
                        "SELECT DISTINCT image_sha256 FROM predictions WHERE image_sha256 IN "
                        f"({', '.join('?' * len(chunk))}) AND (created_at > ? OR (needs_review = 1 AND created_at > ?))",
                        [*chunk, cutoff, review_cutoff],
                    ).fetchall()
                found.update(r[0] for r in rows)
            return found

        return purge_files(candidates, named_by_a_newer_row)

    def enforce_budget(self, max_bytes: int) -> int:
        """Delete the oldest retained images (last seen first) until they take at most ``max_bytes``;
        returns how many."""
        files = sorted(image_files(self.images_dir), key=lambda item: item[1].st_mtime)
        total = sum(stat.st_size for _, stat in files)
        over: list[Path] = []
        for path, stat in files:
            if total <= max_bytes:
                break
            over.append(path)
            total -= stat.st_size
        return purge_files(over, lambda _hashes: set())

    def retained_bytes(self) -> int:
        """Bytes the retained images take on disk."""
        return sum(stat.st_size for _, stat in image_files(self.images_dir))

    def drop_embeddings(self, older_than_days: float) -> int:
        """Clear the embedding of every row logged more than ``older_than_days`` ago (the rest of the
        row stays); returns how many rows. The freed pages are overwritten (``secure_delete``)."""
        cutoff = _iso(time.time() - older_than_days * 86400)
        with self._lock:
            self._conn.execute("PRAGMA secure_delete = ON")
            cursor = _retry_locked(
                lambda: self._conn.execute(
                    "UPDATE predictions SET embedding = NULL, embedding_dim = NULL "
                    "WHERE embedding IS NOT NULL AND created_at < ?",
                    (cutoff,),
                )
            )
            return int(cursor.rowcount)

    def logged_after(self, model_version: str, after_rowid: int) -> list[dict[str, Any]]:
        """A version's predictions with an embedding after a checkpoint (``rowid``), in log order:
        what the drift monitor reads window by window."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT rowid, created_at, label, confidence, embedding, image_stats FROM predictions "
                "WHERE model_version = ? AND rowid > ? AND embedding IS NOT NULL ORDER BY rowid",
                (str(model_version), int(after_rowid)),
            ).fetchall()
        return [
            dict(zip(("rowid", "created_at", "label", "confidence", "embedding", "image_stats"), row)) for row in rows
        ]

    def review_image_hashes(self) -> set[str]:
        with self._lock:
            rows = self._conn.execute("SELECT DISTINCT image_sha256 FROM predictions WHERE needs_review = 1").fetchall()
        return {r[0] for r in rows}

    def review_queue(
        self,
        exclude: set[str],
        limit: int = 50,
        label: str | None = None,
        model_version: str | None = None,
        since: str | None = None,
        until: str | None = None,
    ) -> list[dict[str, Any]]:
        """Predictions flagged needs_review whose image is kept and not yet reviewed (ids in
        ``exclude``): cells of a type the model does not know first (however confident it was about
        what they resemble), then the least certain; filterable by predicted class, version, time."""
        sql = (
            "SELECT id, created_at, model_version, label, confidence, probabilities, image_sha256, open_set_score "
            "FROM predictions WHERE needs_review = 1"
        )
        params: list[Any] = []
        for column, op, value in (
            ("label", "=", label),
            ("model_version", "=", model_version),
            ("created_at", ">=", since),
            ("created_at", "<", until),
        ):
            if value:
                sql += f" AND {column} {op} ?"
                params.append(value)
        sql += " ORDER BY label = 'unknown' DESC, confidence ASC, created_at ASC"
        out = []
        with self._lock:
            cursor = self._conn.execute(sql, params)
            for row in cursor:
                if row["id"] in exclude or not self.image_path(row["image_sha256"]).exists():
                    continue
                out.append({**dict(row), "probabilities": json.loads(row["probabilities"])})
                if len(out) >= limit:
                    break
        return out

    def close(self) -> None:
        with self._lock:
            self._conn.close()


_SHA256 = re.compile(r"[0-9a-f]{64}")
_ASIDE = ".purging-"  # <sha256>.purging-<unix time>-<pid>-<random>: a file a purge moved aside
STALE_ASIDE_SECONDS = 3600  # a file moved aside this long ago belongs to a purge that died


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")


def image_files(folder: Path) -> list[tuple[Path, os.stat_result]]:
    """The content-addressed files under ``folder`` (``<xx>/<sha256>``) with their stat; files a
    purge that died left aside are deleted on the way."""
    if not folder.exists():
        return []
    out = []
    for path in folder.rglob("*"):
        try:
            if _SHA256.fullmatch(path.name) and path.is_file():
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


def _retry_locked(action, attempts: int = 20) -> Any:
    """Run ``action``, retrying while another process holds the database (beyond busy_timeout,
    e.g. while it switches the journal mode at start-up)."""
    for attempt in range(attempts):
        try:
            return action()
        except sqlite3.OperationalError as error:
            if "locked" not in str(error) and "busy" not in str(error) or attempt == attempts - 1:
                raise
            time.sleep(0.05 * (attempt + 1))
    return None
