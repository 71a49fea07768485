"""Retention: every copy of patient data is deleted when its setting says, without a person.

One function, :func:`retention_pass`, does a whole pass over every store that holds patient data or
something made from it:

=============================  ======================================  =====================================
what                           deleted when                            setting
=============================  ======================================  =====================================
retained request images        older than their retention, and no      ``serving.retain_images_days``,
                               newer prediction names them             ``serving.review_image_days``
(the same)                     beyond the disk budget, oldest first    ``serving.images_budget_mb``
prediction-log embeddings      row older than this (set to NULL)       ``serving.embedding_days``
correction images and their    last correction older than this         ``lab.correction_image_days``
exported copies                (the lab decides; default: kept)        (0: kept)
embedding cache entries        unused for this long                    ``paths.embedding_cache_days`` (0: kept)
=============================  ======================================  =====================================

Each serving worker runs it in a daemon thread (:class:`RetentionScheduler`, every
``serving.purge_interval_minutes``); ``hematovision predictions purge`` runs it by hand. Several
workers or replicas running it at once is harmless: deletes are idempotent and images already gone
are skipped (lab mode: every replica purges the one image table of the database, ``image_store.py``). A pass that deleted anything is recorded in the lab's audit log (actor ``retention``,
counts per kind). Not covered: DVC's cache keeps every exported corrections version it pinned until
``dvc gc``, and the retraining folders hold what a retraining run read.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

from hematovision import stores
from hematovision.settings import Settings, get_settings

logger = logging.getLogger("hematovision.serving.retention")
AUDIT_ACTOR = "retention"
FIRST_PASS_MAX_DELAY_SECONDS = 60.0  # a worker's first pass, at a random moment within this
BYTES_CACHE_SECONDS = 30.0  # /metrics measures the image store (folder or table) at most this often


def retention_pass(settings: Settings | None = None, images_older_than_days: float | None = None) -> dict[str, int]:
    """Delete what every retention setting says is due; returns the counts per kind (audited when
    any is above 0). ``images_older_than_days`` overrides both image retentions (the CLI's option)."""
    settings = settings or get_settings()
    serving, lab, paths = settings.serving, settings.lab, settings.paths
    log = stores.prediction_log(settings)
    counts: dict[str, int] = {}
    if images_older_than_days is not None:
        counts["images"] = log.purge_images(images_older_than_days)
    else:
        counts["images"] = log.purge_images(serving.retain_images_days, serving.review_image_days)
    if serving.images_budget_mb > 0:
        counts["images_over_budget"] = log.enforce_budget(int(serving.images_budget_mb * 1024 * 1024))
    if serving.embedding_days > 0:
        counts["embeddings"] = log.drop_embeddings(serving.embedding_days)
    corrections = stores.corrections(settings)
    if lab.correction_image_days > 0:
        purged = corrections.purge_images(lab.correction_image_days, settings.path(paths.corrections_dataset_dir))
        counts["correction_images"], counts["exported_corrections"] = purged["images"], purged["exported"]
    cache_file = settings.path(paths.cache_dir) / stores.EMBEDDINGS_FILE
    if paths.embedding_cache_days > 0 and cache_file.exists():  # never create a cache to purge it
        with stores.embedding_cache(settings) as cache:
            counts["embedding_cache"] = cache.purge(paths.embedding_cache_days)
    if any(counts.values()):
        corrections.audit(AUDIT_ACTOR, "retention_purge", "", counts)
        logger.info("retention pass deleted %s", counts)
    return counts


class RetentionScheduler:
    """A serving worker's retention: a daemon thread that runs :func:`retention_pass` every
    ``serving.purge_interval_minutes`` (0: never; the first pass at a random moment within
    ``FIRST_PASS_MAX_DELAY_SECONDS`` of the start, so replicas started together do not all purge at
    once), and the retained-image gauge for ``/metrics``."""

    def __init__(self, settings: Settings | None = None, run=retention_pass) -> None:
        self.settings = settings or get_settings()
        self.interval = self.settings.serving.purge_interval_minutes * 60
        self._run = run
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.last_pass: dict[str, Any] | None = None  # {"at": unix time, "counts": ...} of the last pass
        self._bytes: tuple[float, int] | None = None  # (when measured, bytes)

    def start(self, first_delay: float | None = None) -> RetentionScheduler:
        if self.interval > 0 and self._thread is None:
            delay = (
                random.uniform(0, min(FIRST_PASS_MAX_DELAY_SECONDS, self.interval))
                if first_delay is None
                else first_delay
            )
            self._thread = threading.Thread(target=self._loop, args=(delay,), name="retention", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _loop(self, delay: float) -> None:
        while not self._stop.wait(delay):
            self.run_once()
            delay = self.interval

    def run_once(self) -> dict[str, int] | None:
        """One pass; an error is logged, never raised (the next pass tries again)."""
        try:
            counts = self._run(self.settings)
        except Exception:
            logger.exception("retention pass failed; the next one runs in %.0f s", self.interval)
            return None
        self.last_pass = {"at": time.time(), "counts": counts}
        self._bytes = None
        return counts

    def retained_bytes(self) -> int:
        now = time.monotonic()
        if self._bytes is None or now - self._bytes[0] > BYTES_CACHE_SECONDS:
            self._bytes = (now, stores.prediction_log(self.settings).retained_bytes())
        return self._bytes[1]

    def prometheus(self) -> str:
        """Gauges appended to BentoML's /metrics."""
        last = self.last_pass["at"] if self.last_pass else 0
        return (
            "# HELP hematovision_retained_image_bytes Bytes the retained request images take in their store.\n"
            "# TYPE hematovision_retained_image_bytes gauge\n"
            f"hematovision_retained_image_bytes {self.retained_bytes()}\n"
            "# HELP hematovision_retention_last_pass_seconds Unix time of this worker's last retention pass (0: none yet).\n"
            "# TYPE hematovision_retention_last_pass_seconds gauge\n"
            f"hematovision_retention_last_pass_seconds {last:.0f}\n"
        )
