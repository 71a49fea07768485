"""Retention without a person: one pass deletes every copy of patient data its settings say is due
(retained images, the disk budget, prediction embeddings, correction images and their exported
copies, the embedding cache) and audits it, with the images in folders (sqlite) or in the database
(lab mode's PostgreSQL); a purge never takes an image whose row is being written, in either store;
a review request for a purged image is a 404/409 in the one error shape; the serving worker's
scheduler runs the pass on its own."""

from __future__ import annotations

import hashlib
import io
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from hematovision import stores
from hematovision.api import errors, review_routes
from hematovision.cli import app as cli
from hematovision.image_store import FolderImageStore, ImageStore
from hematovision.lab.corrections import Corrections
from hematovision.serving.images import ImageRejected
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.serving.predictor import Predictor
from hematovision.serving.retention import RetentionScheduler, retention_pass
from hematovision.settings import get_settings

from conftest import add_user

DAY = 86400
WAIT_SECONDS = 60  # a liveness bound for the writer threads, never a measured duration


def picture(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def days_ago(days: float) -> str:
    return (datetime.now(UTC) - timedelta(days=days)).isoformat(timespec="milliseconds")


def age(images: ImageStore, sha256: str, days: float) -> None:
    """Make a kept image look stored ``days`` ago: its file's time, or its row's ``stored_at``."""
    then = time.time() - days * DAY
    if isinstance(images, FolderImageStore):
        os.utime(images.path(sha256), (then, then))
    else:
        images.db.execute(
            f"UPDATE {images.table} SET stored_at = :then WHERE sha256 = :sha", {"then": then, "sha": sha256}
        )


def record(seed: int, needs_review: bool = True, created_days_ago: float = 0) -> tuple[PredictionRecord, bytes]:
    image = picture(seed)
    return PredictionRecord(
        "1",
        "monocyte",
        0.4,
        {"monocyte": 0.4},
        needs_review,
        hashlib.sha256(image).hexdigest(),
        1.0,
        embedding=np.ones(8, np.float32),
        created_at=days_ago(created_days_ago),
    ), image


def settings_in(tmp_path: Path, database_url: str = "", **serving):
    return get_settings().with_changes(
        paths={"project_dir": tmp_path, "embedding_cache_days": 1},
        serving={
            "retain_images_days": 0,
            "review_image_days": 2,
            "embedding_days": 1,
            "images_budget_mb": 0,
            "predictions_db": Path("monitoring/predictions.sqlite"),
            "images_dir": Path("monitoring/images"),
            **serving,
        },
        lab={
            "lab_db": Path("monitoring/lab.sqlite"),
            "corrections_images_dir": Path("monitoring/corrections"),
            "correction_image_days": 1,
            "database_url": database_url,
        },
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request) -> str:
    """lab.database_url: empty (sqlite files, images in folders) or a fresh PostgreSQL database."""
    return "" if request.param == "sqlite" else request.getfixturevalue("postgres_url")


# --- one pass over every copy ------------------------------------------------------------------------


def test_a_retention_pass_deletes_every_kind_past_its_setting_and_audits_it(tmp_path, database_url):
    settings = settings_in(tmp_path, database_url)
    log = stores.prediction_log(settings)
    old, old_image = record(1, created_days_ago=3)
    new, new_image = record(2)
    log.log_many([old, new], [old_image, new_image])
    age(log.images, old.image_sha256, 3)

    corrections = stores.corrections(settings)
    stale = corrections.submit("pat", "monocyte", picture(3))
    fresh = corrections.submit("pat", "lymphocyte", picture(4))
    corrections.db.execute(
        "UPDATE corrections SET created_at = :at WHERE id = :id", {"at": days_ago(5), "id": stale["id"]}
    )
    age(corrections.images, stale["image_sha256"], 5)
    exported = settings.path(settings.paths.corrections_dataset_dir)
    corrections.export(exported)
    assert (exported / "monocyte" / f"{stale['image_sha256']}.png").exists()

    with stores.embedding_cache(settings) as cache:
        cache.store("bb", ["old", "recent"], np.ones((2, 4), np.float32))
        cache.db.execute("UPDATE embedding SET used_at = ? WHERE image = 'old'", (time.time() - 3 * DAY,))
        cache.db.commit()

    counts = retention_pass(settings)
    assert counts == {  # no budget step: images_budget_mb is 0
        "images": 1,
        "embeddings": 1,
        "correction_images": 1,
        "exported_corrections": 1,
        "embedding_cache": 1,
    }
    assert log.get(old.id)["image_kept"] is False and log.get(old.id)["label"] == "monocyte"  # the row stays
    assert log.get(old.id)["embedding"] is None and log.get(new.id)["embedding"] is not None
    assert log.get(new.id)["image_kept"] is True and log.image(new.image_sha256) == new_image
    assert corrections.image(stale["image_sha256"]) is None
    assert corrections.image(fresh["image_sha256"]) is not None
    assert not (exported / "monocyte" / f"{stale['image_sha256']}.png").exists()
    assert (exported / "lymphocyte" / f"{fresh['image_sha256']}.png").exists()
    assert corrections.count() == 2  # the corrections themselves stay
    with stores.embedding_cache(settings) as cache:
        assert set(cache.lookup("bb", ["old", "recent"])) == {"recent"}
    entry = corrections.audit_log(1)[0]
    assert (entry["actor"], entry["action"]) == ("retention", "retention_purge") and entry["detail"] == counts

    # Again (as another worker would, at the same time or later): nothing left to delete, nothing audited.
    assert not any(retention_pass(settings).values())
    assert corrections.audit_log(1)[0]["seq"] == entry["seq"]


def test_corrections_and_the_embedding_cache_are_kept_unless_the_lab_sets_a_retention(tmp_path):
    settings = settings_in(tmp_path).with_changes(paths={"embedding_cache_days": 0}, lab={"correction_image_days": 0})
    corrections = stores.corrections(settings)
    row = corrections.submit("pat", "monocyte", picture(5))
    age(corrections.images, row["image_sha256"], 400)
    assert "correction_images" not in retention_pass(settings)
    assert corrections.image(row["image_sha256"]) is not None
    assert not settings.path(settings.paths.cache_dir).exists()  # no cache was made to be purged


def test_the_oldest_retained_images_go_first_beyond_the_disk_budget(backend, tmp_path):
    store = PredictionStore(backend["predictions"], tmp_path / "images", retain_images=True)
    shas, sizes = [], []
    for seed, days in ((1, 3), (2, 1), (3, 2)):
        rec, image = record(seed)
        store.log(rec, image)
        age(store.images, rec.image_sha256, days)
        shas.append(rec.image_sha256)
        sizes.append(len(image))
    assert store.retained_bytes() == sum(sizes)
    assert store.enforce_budget(sum(sizes)) == 0
    assert store.enforce_budget(sizes[1] + 1) == 2  # the 3- and 2-day-old ones
    assert store.images.kept(shas) == {shas[1]}
    assert store.retained_bytes() == sizes[1]


# --- never racing a new image ------------------------------------------------------------------------


def test_an_image_seen_again_is_kept_by_its_new_row_whatever_its_age(backend, tmp_path):
    store = PredictionStore(backend["predictions"], tmp_path / "images", retain_review_images=True)
    first, image = record(7, created_days_ago=10)
    store.log(first, image)
    age(store.images, first.image_sha256, 10)
    # The same picture again, now: its row is written first; the image still has its old age.
    again = PredictionRecord("1", "monocyte", 0.4, {"monocyte": 0.4}, True, first.image_sha256, 1.0)
    store._insert([again])
    assert store.purge_images(0, review_older_than_days=2) == 0
    assert store.image(first.image_sha256) == image and store.get(again.id)["image_kept"] is True


@pytest.mark.parametrize("row_committed", ["before the purge asks", "after the purge asked"])
def test_a_row_written_while_a_purge_runs_keeps_its_image(backend, tmp_path, monkeypatch, row_committed):
    """The purge holds the old image (moved aside, or the image table locked) and asks which rows
    still want it: another request thread logs the same image now, its row committed before or
    after the question. Either way the new row ends up with its image."""
    store = PredictionStore(backend["predictions"], tmp_path / "images", retain_review_images=True)
    old, image = record(8, created_days_ago=10)
    store.log(old, image)
    age(store.images, old.image_sha256, 10)
    new = PredictionRecord("1", "monocyte", 0.4, {"monocyte": 0.4}, True, old.image_sha256, 1.0)
    writer = threading.Thread(target=store.log, args=(new, image))  # its row, then its image
    real_remove = store.images.remove

    def row_is_committed() -> None:
        deadline = time.monotonic() + WAIT_SECONDS
        while not store.db.query("SELECT 1 FROM predictions WHERE id = :id", {"id": new.id}):
            assert time.monotonic() < deadline, "the writer never committed its row"
            time.sleep(0.01)

    def remove_with_a_writer(hashes, still_wanted):
        def meanwhile(names):
            if row_committed == "before the purge asks":
                writer.start()
                row_is_committed()  # its image waits for the purge's lock in the database store
                return still_wanted(names)
            wanted = still_wanted(names)
            writer.start()
            row_is_committed()
            return wanted

        return real_remove(hashes, meanwhile)

    monkeypatch.setattr(store.images, "remove", remove_with_a_writer)
    removed = store.purge_images(0, review_older_than_days=2)
    writer.join(WAIT_SECONDS)
    assert removed == (0 if row_committed == "before the purge asks" else 1)  # the old copy, if it went...
    assert store.image(old.image_sha256) == image and store.get(new.id)["image_kept"] is True  # ...came back
    if isinstance(store.images, FolderImageStore):
        path = store.images.path(old.image_sha256)
        assert [p.name for p in path.parent.iterdir()] == [path.name]  # nothing left aside


def test_a_correction_written_while_a_purge_runs_keeps_its_image(backend, tmp_path, monkeypatch):
    """A correction's image is stored; a purge takes it, having asked before the correction's row
    was committed; then the row commits: ``submit`` stores the image again."""
    corrections = Corrections(backend["lab"], tmp_path / "corrected")
    image = picture(9)
    stored, asked = threading.Event(), threading.Event()
    real_put, real_remove = corrections.images.put, corrections.images.remove

    def put_then_wait_for_the_purge(sha256, data):
        real_put(sha256, data)
        if not stored.is_set():  # the first put, before the row
            stored.set()
            asked.wait(WAIT_SECONDS)

    def remove_then_let_the_writer_go(hashes, still_wanted):
        def meanwhile(names):
            wanted = still_wanted(names)  # the correction's row is not there yet
            asked.set()
            return wanted

        return real_remove(hashes, meanwhile)

    monkeypatch.setattr(corrections.images, "put", put_then_wait_for_the_purge)
    monkeypatch.setattr(corrections.images, "remove", remove_then_let_the_writer_go)
    written: list[dict] = []
    writer = threading.Thread(target=lambda: written.append(corrections.submit("pat", "monocyte", image)))
    writer.start()
    assert stored.wait(WAIT_SECONDS)
    assert corrections.purge_images(0)["images"] == 1  # the image went...
    writer.join(WAIT_SECONDS)
    assert written and asked.is_set()
    assert corrections.image(written[0]["image_sha256"]) == image  # ...and the correction stored it again


# --- a review request for a purged image: 404/409, never 500 ------------------------------------------


@pytest.fixture(scope="module")
def pathologist(project) -> dict[str, str]:
    add_user("retention-pat", "pathologist", password="correct horse battery")
    result = CliRunner().invoke(cli, ["users", "token", "retention-pat", "--name", "retention"])
    assert result.exit_code == 0, result.output
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


@pytest.mark.parametrize("when", ["before the request", "after the row was read"])
def test_review_requests_for_a_purged_image_are_404_or_409_in_the_error_shape(pathologist, monkeypatch, when):
    log = stores.prediction_log(get_settings())
    rec, image = record(int(time.time() * 1000) % 100000)
    log.log(rec, image)
    read_before = log.get(rec.id)
    assert read_before["image_kept"] is True  # flagged for review: kept
    log.images.remove([rec.image_sha256], lambda _hashes: set())  # a retention pass took it
    if when == "after the row was read":  # the row read says kept; the purge has just taken the image
        monkeypatch.setattr(PredictionStore, "get", lambda self, pid: dict(read_before))
    app = FastAPI()
    app.include_router(review_routes.router)
    errors.install(app)
    client = TestClient(app, raise_server_exceptions=False)

    shown = client.get(f"/review/image/{rec.id}", headers=pathologist)
    assert shown.status_code == 404 and shown.json()["error"] == "image_not_retained"
    corrected = client.post("/feedback", data={"prediction_id": rec.id, "true_class": "monocyte"}, headers=pathologist)
    assert corrected.status_code == 409 and corrected.json() == {
        "error": "image_not_retained",
        "detail": corrected.json()["detail"],
    }

    models = SimpleNamespace(current=SimpleNamespace(version="1"), loading=None)
    predictor = Predictor(get_settings(), models, batcher=object(), store=log)
    with pytest.raises(ImageRejected) as refused:
        predictor.explain(None, rec.id)
    assert refused.value.code == "image_not_retained"
    assert errors.from_serving(refused.value).status == 404


# --- the serving worker's scheduler ------------------------------------------------------------------


def test_the_scheduler_runs_passes_on_its_own_and_survives_a_failing_one(tmp_path):
    settings = settings_in(tmp_path, purge_interval_minutes=0.05 / 60)  # every 50 ms
    calls = []

    def run(_settings):
        calls.append(time.monotonic())
        if len(calls) == 1:
            raise OSError("disk went away")
        return {"images": 0}

    scheduler = RetentionScheduler(settings, run=run).start(first_delay=0)
    deadline = time.monotonic() + 10
    while len(calls) < 3:
        assert time.monotonic() < deadline, "the scheduler stopped after a failing pass"
        time.sleep(0.02)
    scheduler.stop()
    assert scheduler.last_pass["counts"] == {"images": 0}
    assert "hematovision_retained_image_bytes 0\n" in scheduler.prometheus()

    off = RetentionScheduler(settings_in(tmp_path, purge_interval_minutes=0), run=run).start(first_delay=0)
    assert off._thread is None


def test_the_gauge_counts_the_bytes_held(tmp_path):
    settings = settings_in(tmp_path, retain_images_days=1)
    rec, image = record(11)
    stores.prediction_log(settings).log(rec, image)
    assert f"hematovision_retained_image_bytes {len(image)}\n" in RetentionScheduler(settings).prometheus()


def test_the_purge_command_runs_a_whole_pass(project):
    settings = get_settings()
    log = stores.prediction_log(settings)
    rec, image = record(12, created_days_ago=400)
    log.log(rec, image)
    age(log.images, rec.image_sha256, 400)
    result = CliRunner().invoke(cli, ["predictions", "purge"])
    assert result.exit_code == 0, result.output
    assert "retained image" in result.output and "embeddings: " in result.output
    assert log.get(rec.id)["image_kept"] is False and log.get(rec.id)["embedding"] is None
