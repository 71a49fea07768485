"""A content-addressed cache of backbone embeddings (sqlite, one row per image and backbone).

Keyed by the image's sha256 and the backbone fingerprint: the same picture under another name is
not recomputed, and a fine-tuned backbone never reads a stale vector. Embedding is the expensive
step, so a head-only retrain over mostly known images takes seconds. Each entry remembers when it was
last used (``used_at``, Unix time): :meth:`EmbeddingCache.purge` deletes those unused for a while
(``paths.embedding_cache_days``; they are recomputed if needed again).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from hematovision.database import open_sqlite, private_file
from hematovision.model.classifier import dihedral_view

if TYPE_CHECKING:
    from hematovision.model.classifier import Classifier


def file_sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


class EmbeddingCache:
    def __init__(self, path: Path) -> None:
        # Embeddings of patient images (corrections) among them: the file is the owner's alone.
        self.db = open_sqlite(Path(path))
        self.db.execute("PRAGMA journal_mode=WAL")
        private_file(Path(path))  # the -wal and -shm files WAL mode has made
        with self.db:
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS embedding "
                "(backbone TEXT, image TEXT, vector BLOB, used_at REAL, PRIMARY KEY (backbone, image))"
            )
            if "used_at" not in {row[1] for row in self.db.execute("PRAGMA table_info(embedding)")}:
                # A cache from before: its entries' age is counted from now.
                self.db.execute("ALTER TABLE embedding ADD COLUMN used_at REAL")
                self.db.execute("UPDATE embedding SET used_at = ?", (time.time(),))

    def lookup(self, backbone: str, image_keys: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(image_keys), 500):
            chunk = list(image_keys[start : start + 500])
            rows = self.db.execute(
                f"SELECT image, vector FROM embedding WHERE backbone = ? AND image IN ({','.join('?' * len(chunk))})",
                [backbone, *chunk],
            )
            hits = {key: np.frombuffer(blob, dtype=np.float32) for key, blob in rows}
            if hits:
                with self.db:
                    self.db.execute(
                        f"UPDATE embedding SET used_at = ? WHERE backbone = ? AND image IN ({','.join('?' * len(hits))})",
                        [time.time(), backbone, *hits],
                    )
            found.update(hits)
        return found

    def store(self, backbone: str, image_keys: Sequence[str], vectors: np.ndarray) -> None:
        with self.db:
            self.db.executemany(
                "INSERT OR REPLACE INTO embedding (backbone, image, vector, used_at) VALUES (?, ?, ?, ?)",
                [
                    (backbone, key, np.asarray(v, np.float32).tobytes(), time.time())
                    for key, v in zip(image_keys, vectors)
                ],
            )

    def purge(self, unused_days: float) -> int:
        """Delete the entries not used for ``unused_days`` (their pages overwritten: secure_delete);
        returns how many."""
        self.db.execute("PRAGMA secure_delete = ON")
        with self.db:
            cursor = self.db.execute("DELETE FROM embedding WHERE used_at < ?", (time.time() - unused_days * 86400,))
        return int(cursor.rowcount)

    def embed(
        self,
        backbone: str,
        image_keys: Sequence[str],
        compute: Callable[[list[int]], np.ndarray],
        chunk: int = 256,
        progress: Callable[[int], None] | None = None,
    ) -> np.ndarray:
        """Embeddings for every key: cached ones read back, the rest computed by ``compute(indices)``
        in chunks (stored as they come, so an interrupted run keeps its work)."""
        found = self.lookup(backbone, image_keys)
        missing = [i for i, key in enumerate(image_keys) if key not in found]
        if progress:
            progress(len(image_keys) - len(missing))
        for start in range(0, len(missing), chunk):
            indices = missing[start : start + chunk]
            vectors = compute(indices)
            keys = [image_keys[i] for i in indices]
            self.store(backbone, keys, vectors)
            found.update(zip(keys, np.asarray(vectors, np.float32)))
            if progress:
                progress(len(indices))
        if not image_keys:
            return np.zeros((0, 0), np.float32)
        return np.stack([found[key] for key in image_keys])

    def close(self) -> None:
        self.db.close()

    def __enter__(self) -> EmbeddingCache:
        return self

    def __exit__(self, *_exc) -> None:
        self.close()


def cached_embeddings(
    classifier: Classifier,
    paths: list[Path],
    cache: EmbeddingCache,
    crops: np.ndarray | None = None,
    progress: Callable[[int], None] | None = None,
    views: int = 1,
) -> np.ndarray:
    """Backbone embeddings of image files, read from the cache where the same backbone saw the same
    bytes before; crops are made only for the images that need computing unless given.

    With ``views`` > 1, the embeddings of the crop's first ``views`` dihedral views (the model's
    test-time views), view-major: rows ``v * len(paths) + i``. View 0 is the crop itself, cached
    under the image's sha256; view v under ``sha256#view<v>``. ``progress`` counts rows."""
    n = len(paths)
    shas = [file_sha256(p) for p in paths]
    keys = [sha if v == 0 else f"{sha}#view{v}" for v in range(views) for sha in shas]
    made: dict[int, np.ndarray] = {}  # crops made here: each image once, however many views miss

    def crop(i: int) -> np.ndarray:
        return crops[i] if crops is not None else made[i]

    def compute(indices: list[int]) -> np.ndarray:
        if crops is None:
            todo = sorted({i % n for i in indices} - made.keys())
            made.update(zip(todo, classifier.crops([paths[i] for i in todo])))
        return classifier.embed(np.stack([dihedral_view(crop(i % n)[None], i // n)[0] for i in indices]))

    return cache.embed(classifier.backbone_fingerprint(), keys, compute, progress=progress)
