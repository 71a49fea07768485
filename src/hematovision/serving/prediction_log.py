"""The prediction log: one row per served prediction, for drift monitoring, audits and review queues.

Where: a sqlite file in WAL mode by default (no server; several serving workers, separate processes,
append to one file while a monitoring job reads it; WAL lets readers run during writes, and
``busy_timeout`` makes concurrent writers wait their turn instead of failing), or lab mode's
PostgreSQL, which every replica on every host appends to (``database.py``; the schema is the
``predictions`` migrations'). Each row has a ``seq``, the order it was logged in: the drift monitor
reads the log window by window after a checkpoint ``seq``.

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
content-addressed in the log's image store (``hematovision.image_store``): files under
``images_dir`` next to a sqlite log, or, in lab mode, the ``prediction_images`` table of the
PostgreSQL database, so a pathologist on any replica sees the image a request to another replica
left. Readers ask the store (:meth:`PredictionStore.image`), never a path. The row is written first
and the image after it, and :meth:`PredictionStore.purge_images` deletes an image only once it is
older than its retention *and* no row newer than that retention names it, asked so that a row
written meanwhile keeps its image (``ImageStore.remove``: files moved aside first, or one
transaction holding the image table's lock), so an image whose row has just been written is never
lost to a purge running at the same moment. :meth:`PredictionStore.enforce_budget` caps the space
they take (oldest first) and :meth:`PredictionStore.drop_embeddings` clears old rows' embeddings;
``serving/retention.py`` runs them all. Image bytes never go to any log.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import bindparam, text

from hematovision.database import connect
from hematovision.image_store import FolderImageStore, ImageStore, for_database

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
    """Appends predictions to the log; safe to share between threads and processes."""

    def __init__(
        self,
        database: str | Path,
        images_dir: Path | None = None,
        retain_images: bool = False,
        retain_review_images: bool = False,
    ) -> None:
        """``database``: the log's sqlite file, or lab mode's PostgreSQL URL. ``images_dir``: where a
        sqlite log keeps images (default: ``images`` next to the file); in lab mode the images are
        in the database and the folder is only where ``hematovision db upgrade`` finds images kept
        before, to carry them in."""
        # NORMAL is durable across application crashes in WAL mode; only an OS crash or power cut
        # can lose the last few transactions, an acceptable risk for a monitoring log.
        self.db = connect(database, "predictions", synchronous="NORMAL")
        if images_dir is None and self.db.path is not None:
            images_dir = self.db.path.parent / "images"
        self.images_dir = None if images_dir is None else Path(images_dir)
        # No fsync per image: the log itself accepts losing its last moments to an OS crash.
        self.images: ImageStore = for_database(self.db, "prediction_images", self.images_dir, fsync=False)
        self.retain_images = retain_images
        self.retain_review_images = retain_review_images

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
                    self.images.put(record.image_sha256, data)
        return [r.id for r in records]

    def _insert(self, records: Sequence[PredictionRecord]) -> None:
        sql = text(f"INSERT INTO predictions ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})")
        rows = [dict(zip(_COLUMNS, r.row())) for r in records]
        with self.db.transaction() as db:
            if not self.db.is_sqlite:
                # One writer at a time, as on sqlite: seq values are drawn inside the lock and
                # committed before it is released, so a reader never sees seq 11 while 10 is still
                # uncommitted, and the monitor's checkpoint (the last seq read) skips no row.
                db.execute(text("LOCK TABLE predictions IN EXCLUSIVE MODE"))
            db.execute(sql, rows)

    def get(self, prediction_id: str) -> dict[str, Any] | None:
        rows = self.db.rows("SELECT * FROM predictions WHERE id = :id", {"id": prediction_id})
        if not rows:
            return None
        out = rows[0]
        out.pop("seq")
        out["probabilities"] = json.loads(out["probabilities"])
        out["image_stats"] = json.loads(out["image_stats"])
        out["needs_review"] = bool(out["needs_review"])
        out["embedding"] = decode_embedding(out["embedding"])
        out["image_kept"] = bool(self.images.kept([out["image_sha256"]]))
        if isinstance(self.images, FolderImageStore):  # a file only in the embedded mode, for scripts
            out["image_path"] = str(self.images.path(out["image_sha256"])) if out["image_kept"] else None
        return out

    def image(self, sha256: str) -> bytes | None:
        """A kept image's bytes (None: never kept, or purged), from whichever host kept it."""
        return self.images.get(sha256)

    def count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM predictions")[0][0])

    def purge_images(self, older_than_days: float, review_older_than_days: float | None = None) -> int:
        """Delete retained images last seen more than ``older_than_days`` ago (images of predictions
        that needed review: ``review_older_than_days``, default the same) that no newer row names;
        returns how many. Safe to run in several processes at once."""
        review_days = older_than_days if review_older_than_days is None else review_older_than_days
        now = time.time()
        review = self.review_image_hashes() if review_days != older_than_days else set()
        candidates = [
            image.sha256
            for image in self.images.entries()
            if image.stored_at <= now - (review_days if image.sha256 in review else older_than_days) * 86400
        ]
        cutoff, review_cutoff = _iso(now - older_than_days * 86400), _iso(now - review_days * 86400)

        newer = text(
            "SELECT DISTINCT image_sha256 FROM predictions WHERE image_sha256 IN :hashes "
            "AND (created_at > :cutoff OR (needs_review = 1 AND created_at > :review_cutoff))"
        ).bindparams(bindparam("hashes", expanding=True))

        def named_by_a_newer_row(hashes: list[str]) -> set[str]:
            found: set[str] = set()
            with self.db.reading() as db:
                for start in range(0, len(hashes), 500):
                    chunk = hashes[start : start + 500]
                    rows = db.execute(newer, {"hashes": chunk, "cutoff": cutoff, "review_cutoff": review_cutoff})
                    found.update(r[0] for r in rows)
            return found

        return self.images.remove(candidates, named_by_a_newer_row)

    def enforce_budget(self, max_bytes: int) -> int:
        """Delete the oldest retained images (last seen first) until they take at most ``max_bytes``;
        returns how many."""
        images = sorted(self.images.entries(), key=lambda image: image.stored_at)
        total = sum(image.size for image in images)
        over: list[str] = []
        for image in images:
            if total <= max_bytes:
                break
            over.append(image.sha256)
            total -= image.size
        return self.images.remove(over, lambda _hashes: set())

    def retained_bytes(self) -> int:
        """Bytes the retained images take (files on disk, or rows' image sizes in lab mode)."""
        return self.images.total_bytes()

    def drop_embeddings(self, older_than_days: float) -> int:
        """Clear the embedding of every row logged more than ``older_than_days`` ago (the rest of the
        row stays); returns how many rows. On sqlite the freed pages are overwritten
        (``secure_delete``); PostgreSQL reuses the space once vacuumed (autovacuum)."""
        cutoff = _iso(time.time() - older_than_days * 86400)
        with self.db.transaction() as db:
            if self.db.is_sqlite:
                db.exec_driver_sql("PRAGMA secure_delete = ON")
            return int(
                db.execute(
                    text(
                        "UPDATE predictions SET embedding = NULL, embedding_dim = NULL "
                        "WHERE embedding IS NOT NULL AND created_at < :cutoff"
                    ),
                    {"cutoff": cutoff},
                ).rowcount
            )

    def logged_after(self, model_version: str, after_rowid: int) -> list[dict[str, Any]]:
        """A version's predictions with an embedding after a checkpoint (a ``seq``, named ``rowid``
        here as the monitor knows it), in log order: what the drift monitor reads window by window."""
        rows = self.db.query(
            "SELECT seq, created_at, label, confidence, embedding, image_stats FROM predictions "
            "WHERE model_version = :version AND seq > :after AND embedding IS NOT NULL ORDER BY seq",
            {"version": str(model_version), "after": int(after_rowid)},
        )
        return [
            dict(zip(("rowid", "created_at", "label", "confidence", "embedding", "image_stats"), row)) for row in rows
        ]

    def review_image_hashes(self) -> set[str]:
        return {r[0] for r in self.db.query("SELECT DISTINCT image_sha256 FROM predictions WHERE needs_review = 1")}

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
        params: dict[str, Any] = {}
        for name, column, op, value in (
            ("label", "label", "=", label),
            ("model_version", "model_version", "=", model_version),
            ("since", "created_at", ">=", since),
            ("until", "created_at", "<", until),
        ):
            if value:
                sql += f" AND {column} {op} :{name}"
                params[name] = str(value)
        sql += " ORDER BY label = 'unknown' DESC, confidence ASC, created_at ASC"
        out: list[dict[str, Any]] = []
        with self.db.reading() as db:
            result = db.execute(text(sql), params).mappings()
            # In batches: one question to the image store per batch, not per row.
            while len(out) < limit and (batch := result.fetchmany(200)):
                kept = self.images.kept(row["image_sha256"] for row in batch if row["id"] not in exclude)
                for row in batch:
                    if row["id"] not in exclude and row["image_sha256"] in kept and len(out) < limit:
                        out.append({**dict(row), "probabilities": json.loads(row["probabilities"])})
        return out

    def close(self) -> None:
        """Close the pooled connections (the store opens new ones if used again)."""
        self.db.dispose()


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds")
