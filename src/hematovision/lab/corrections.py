"""Pathologists' corrections: written durably, never lost, and exported as a DVC-tracked dataset.

A correction says "this image is a <class>", by whom, when, and which prediction (model version,
predicted class) it confirms or corrects. Durability, in order:

1. the image is written content-addressed *before* the row, so a row never points at a missing
   image: in the embedded mode a file under ``images_dir`` (temporary file, fsync, atomic rename,
   fsync of the folder); in lab mode a row of the ``correction_images`` table of the PostgreSQL
   database, committed on its own (``hematovision.image_store``), so the retraining run on any host
   exports an image a replica on another host received;
2. the row and its audit entry are one transaction in the laboratory database (sqlite: WAL,
   ``synchronous=FULL``; lab mode's PostgreSQL: a commit returns once flushed): ``submit`` returns
   after the COMMIT, so after the answer the correction is on disk; a crash before COMMIT leaves
   nothing but, at worst, an unreferenced image. A database that cannot be reached raises
   :class:`~hematovision.database.DatabaseUnavailable` and nothing is acknowledged.

Images are kept unless the lab sets ``lab.correction_image_days`` (a correction is training data):
:meth:`Corrections.purge_images` then deletes an image, and its copy in the exported folder, once its
last correction is older than that; the rows stay. A purge running while a correction is written
cannot take its image: ``submit`` writes the image again after the row if it is gone. Every reader
(:meth:`Corrections.image`, the export, the purge) asks the image store, never a path.

Two reviewers on one image are two rows: both kept, and the disagreement is reported (and the
image left out of an export until it is resolved).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import uuid
from collections import Counter, defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import bindparam, text

from hematovision import CLASSES
from hematovision.data.imaging import ImageError, load_rgb
from hematovision.database import connect, utc_now
from hematovision.image_store import ImageStore, for_database
from hematovision.model.open_set import UNKNOWN

logger = logging.getLogger("hematovision.lab.corrections")
# The formats a correction may be in (those the service accepts), and their file extensions.
EXTENSIONS = {"JPEG": "jpg", "PNG": "png", "TIFF": "tif", "BMP": "bmp"}


class CorrectionError(ValueError):
    """A correction that cannot be accepted (unknown class, no image, not an image)."""


def readable_image(source: bytes | Path) -> str:
    """The format of an image that decodes as training decodes it (``load_rgb``), or ImageError."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as im:
            fmt = im.format or ""
    except Image.DecompressionBombError as error:
        raise ImageError("decompression_bomb", str(error)) from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageError("not_an_image", f"not a readable image ({type(error).__name__})") from error
    if fmt not in EXTENSIONS:
        raise ImageError("unsupported_format", f"{fmt or 'unknown'} images are not accepted")
    load_rgb(source)
    return fmt


class Corrections:
    def __init__(self, database: str | Path, images_dir: Path, classes: tuple[str, ...] = CLASSES) -> None:
        """``database``: the lab database's sqlite file, or lab mode's PostgreSQL URL. ``images_dir``:
        where a sqlite lab database keeps corrected images; in lab mode they are in the database and
        the folder is only where ``hematovision db upgrade`` finds images kept before, to carry them in."""
        self.db = connect(database, "lab")
        self.images_dir = Path(images_dir)
        self.images: ImageStore = for_database(self.db, "correction_images", self.images_dir, fsync=True)
        self.classes = tuple(classes)

    def image(self, sha256: str) -> bytes | None:
        """A corrected image's bytes (None: purged), from whichever host received it."""
        return self.images.get(sha256)

    # --- writing ----------------------------------------------------------------------------
    def submit(
        self, reviewer: str, true_class: str, image: bytes, prediction: dict[str, Any] | None = None, comment: str = ""
    ) -> dict[str, Any]:
        """Record one correction (or confirmation); returns it as stored."""
        true_class = true_class.strip().lower()
        if true_class not in self.classes:
            raise CorrectionError(f"true_class must be one of {', '.join(self.classes)}, not {true_class!r}")
        if not image:
            raise CorrectionError("a correction needs the image")
        try:
            readable_image(image)  # a file that is no image would break the export and retraining
        except ImageError as error:
            raise CorrectionError(f"the image is not usable: {error.message}") from error
        sha = hashlib.sha256(image).hexdigest()
        self.images.put(sha, image)
        row = {
            "id": uuid.uuid4().hex,
            "created_at": utc_now(),
            "reviewer": reviewer,
            "image_sha256": sha,
            "true_class": true_class,
            "predicted_class": (prediction or {}).get("label"),
            "model_version": (prediction or {}).get("model_version"),
            "prediction_id": (prediction or {}).get("id"),
            "comment": comment.strip()[:2000],
        }
        with self.db.transaction() as db:
            db.execute(
                text(f"INSERT INTO corrections ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)})"), row
            )
            _audit(
                db,
                reviewer,
                "confirm" if row["predicted_class"] == true_class else "correct",
                row["id"],
                {k: row[k] for k in ("true_class", "predicted_class", "model_version", "prediction_id")},
            )
        # A retention pass may have taken an old copy of this image between the write and the
        # COMMIT (it checks the rows after taking the image away): the row must have its image.
        self.images.put(sha, image)
        return row

    def audit(self, actor: str, action: str, target: str = "", detail: dict[str, Any] | None = None) -> None:
        with self.db.transaction() as db:
            _audit(db, actor, action, target, detail or {})

    # --- reading ----------------------------------------------------------------------------
    def count(self) -> int:
        return int(self.db.query("SELECT COUNT(*) FROM corrections")[0][0])

    def count_since(self, since: str) -> int:
        """Corrections recorded after ``since`` (ISO time)."""
        return int(self.db.query("SELECT COUNT(*) FROM corrections WHERE created_at > :since", {"since": since})[0][0])

    def all(self) -> list[dict[str, Any]]:
        return self.db.rows("SELECT * FROM corrections ORDER BY created_at, id")

    def reviewed_prediction_ids(self) -> set[str]:
        return {
            r[0]
            for r in self.db.query("SELECT DISTINCT prediction_id FROM corrections WHERE prediction_id IS NOT NULL")
        }

    def audit_log(self, limit: int = 200) -> list[dict[str, Any]]:
        rows = self.db.rows("SELECT * FROM audit ORDER BY seq DESC LIMIT :limit", {"limit": int(limit)})
        for row in rows:
            row["detail"] = json.loads(row["detail"])
        return rows

    def labels_by_image(self) -> dict[str, dict[str, Any]]:
        """Per image: the labels reviewers gave, the agreed label (None while they disagree)."""
        per_image: dict[str, dict[str, str]] = defaultdict(dict)
        for row in self.all():  # in time order: a reviewer's later answer replaces their earlier one
            per_image[row["image_sha256"]][row["reviewer"]] = row["true_class"]
        out = {}
        for sha, by_reviewer in per_image.items():
            labels = set(by_reviewer.values())
            out[sha] = {"labels": by_reviewer, "agreed": labels.pop() if len(labels) == 1 else None}
        return out

    def stats(self) -> dict[str, Any]:
        """How often reviewers confirm the model: overall, per predicted class, per model version,
        per day; the confusion between predicted and corrected classes; disputed images."""
        rows = [r for r in self.all() if r["predicted_class"]]

        def agreement(group: list[dict]) -> dict[str, Any]:
            confirmed = sum(r["predicted_class"] == r["true_class"] for r in group)
            return {
                "reviewed": len(group),
                "confirmed": confirmed,
                "agreement": round(confirmed / len(group), 4) if group else None,
            }

        def grouped(key) -> dict[str, Any]:
            groups: dict[str, list] = defaultdict(list)
            for r in rows:
                groups[key(r)].append(r)
            return {k: agreement(v) for k, v in sorted(groups.items())}

        confusion = Counter((r["predicted_class"], r["true_class"]) for r in rows)
        disputed = {sha: v["labels"] for sha, v in self.labels_by_image().items() if v["agreed"] is None}
        return {
            "corrections": self.count(),
            "overall": agreement(rows),
            "per_class": grouped(lambda r: r["predicted_class"]),
            "per_model_version": grouped(lambda r: str(r["model_version"])),
            "per_day": grouped(lambda r: r["created_at"][:10]),
            "confusion": {
                "classes": list(self.classes),  # the columns: what reviewers may answer
                # the rows: the model's answers, "unknown" and any class a past model had included
                "predicted": (predicted := _predicted_axis(self.classes, [r["predicted_class"] for r in rows])),
                "matrix": [[confusion[(p, t)] for t in self.classes] for p in predicted],
                "rows": "predicted",
                "columns": "corrected",
            },
            "disputed_images": disputed,
        }

    # --- retention --------------------------------------------------------------------------
    def purge_images(self, older_than_days: float, exported: Path | None = None) -> dict[str, int]:
        """Delete the images whose last correction is more than ``older_than_days`` old (and images
        no correction names, by their age), and their copies under the exported folder ``exported``;
        the corrections themselves stay. Returns ``{"images": n, "exported": m}``."""
        now = time.time()
        cutoff = datetime.fromtimestamp(now - older_than_days * 86400, UTC).isoformat(timespec="milliseconds")
        last = dict(self.db.query("SELECT image_sha256, MAX(created_at) FROM corrections GROUP BY image_sha256"))
        candidates = [
            image.sha256
            for image in self.images.entries()
            if image.stored_at <= now - older_than_days * 86400 and last.get(image.sha256, "") <= cutoff
        ]

        corrected = text(
            "SELECT DISTINCT image_sha256 FROM corrections WHERE image_sha256 IN :hashes AND created_at > :cutoff"
        ).bindparams(bindparam("hashes", expanding=True))

        def corrected_since(hashes: list[str]) -> set[str]:
            found: set[str] = set()
            with self.db.reading() as db:
                for start in range(0, len(hashes), 500):
                    rows = db.execute(corrected, {"hashes": hashes[start : start + 500], "cutoff": cutoff})
                    found.update(r[0] for r in rows)
            return found

        images = self.images.remove(candidates, corrected_since)
        copies = 0
        if exported is not None and exported.is_dir():
            files = [p for p in exported.rglob("*") if p.is_file()]
            due = [p for p in files if p.name.split(".")[0] in last and last[p.name.split(".")[0]] <= cutoff]
            kept = self.images.kept(p.name.split(".")[0] for p in due)
            for path in due:
                if path.name.split(".")[0] not in kept:
                    path.unlink(missing_ok=True)
                    copies += 1
        return {"images": images, "exported": copies}

    # --- export -----------------------------------------------------------------------------
    def export(self, dest: Path) -> dict[str, Any]:
        """Write the corrected images as ``dest/<class>/<sha256>.<ext>`` (the raw data's class-folder
        layout). Disputed images are left out until reviewers agree, and so is any image that
        cannot be read (missing, or not an image: counted and logged, never fatal). The folder is
        rewritten to match exactly, so exporting twice with nothing new changes nothing."""
        dest.mkdir(parents=True, exist_ok=True)
        existing = {p for p in dest.rglob("*") if p.is_file()}
        wanted: set[Path] = set()
        unreadable: dict[str, str] = {}
        added = 0
        for sha, labels in self.labels_by_image().items():
            if labels["agreed"] is None:
                continue
            try:
                data = self.images.get(sha)  # one read per image: lab mode fetches it from the database
                if data is None:
                    raise ImageError("missing", "the image is no longer kept")
                fmt = readable_image(data)
            except ImageError as error:
                unreadable[sha] = f"{error.code}: {error.message}"
                continue
            except Exception as error:  # noqa: BLE001 - one bad image must not stop the export
                unreadable[sha] = f"{type(error).__name__}: {error}"
                continue
            target = dest / labels["agreed"] / f"{sha}.{EXTENSIONS[fmt]}"
            wanted.add(target)
            if target not in existing:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
                added += 1
        for sha, why in unreadable.items():
            logger.warning("correction image %s left out of the export: %s", sha, why)
        for stale in existing - wanted:
            stale.unlink()
        for cls in self.classes:
            (dest / cls).mkdir(exist_ok=True)
        counts = Counter(p.parent.name for p in wanted)
        return {
            "images": len(wanted),
            "added": added,
            "removed": len(existing - set(wanted)),
            "per_class": {c: counts.get(c, 0) for c in self.classes},
            "disputed": sum(1 for v in self.labels_by_image().values() if v["agreed"] is None),
            "unreadable": len(unreadable),
            "unreadable_images": sorted(unreadable),
        }


def _predicted_axis(classes: tuple[str, ...], predicted: list[str]) -> list[str]:
    """The model's side of the confusion: the four classes, then ``unknown``, then any other class a
    model answered with (one the laboratory added), in a stable order."""
    base = [c for c in CLASSES if c in classes or c in predicted]
    return base + [UNKNOWN] + sorted(set(predicted) - set(base) - {UNKNOWN})


def _audit(db, actor: str, action: str, target: str, detail: dict[str, Any]) -> None:
    db.execute(
        text("INSERT INTO audit (at, actor, action, target, detail) VALUES (:at, :actor, :action, :target, :detail)"),
        {
            "at": utc_now(),
            "actor": actor,
            "action": action,
            "target": target,
            "detail": json.dumps(detail, sort_keys=True),
        },
    )
