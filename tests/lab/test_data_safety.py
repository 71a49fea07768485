"""Corrections are images (or refused), an unreadable one never stops the export or retraining, and
the files that hold patient data are their owner's alone."""

from __future__ import annotations

import hashlib
import io
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.testclient import TestClient
from typer.testing import CliRunner

from hematovision import stores
from hematovision.api import errors, review_routes
from hematovision.cli import app as cli
from hematovision.lab.corrections import CorrectionError, Corrections
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.settings import get_settings
from hematovision.training.corrections_data import corrections_rows

from conftest import add_user

TEXT = b"Patient 17: smear looks fine, neutrophil.\n" * 20


def picture(seed: int, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def pathologist(project) -> dict[str, str]:
    add_user("safety-pat", "pathologist", password="correct horse battery")
    result = CliRunner().invoke(cli, ["users", "token", "safety-pat", "--name", "safety"])
    assert result.exit_code == 0, result.output
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


# --- 5. corrections pass the image guard; unreadable files are skipped, reported ---------------------


def test_a_correction_that_is_no_image_is_refused_and_nothing_is_stored(pathologist):
    app = FastAPI()
    app.include_router(review_routes.router)
    errors.install(app)
    client = TestClient(app)
    corrections = stores.corrections(get_settings())
    before = corrections.count()
    for data, code in ((TEXT, "not_an_image"), (b"GIF89a" + TEXT, "unsupported_format"), (b"\x89PNG\r\n\x1a\n", None)):
        response = client.post(
            "/feedback", files={"image": ("cell.jpeg", data)}, data={"true_class": "monocyte"}, headers=pathologist
        )
        assert 400 <= response.status_code < 500, response.text
        if code:
            assert response.json()["error"] == code
        assert corrections.image(hashlib.sha256(data).hexdigest()) is None
    assert corrections.count() == before
    good = client.post(
        "/feedback", files={"image": ("cell.png", picture(1))}, data={"true_class": "monocyte"}, headers=pathologist
    )
    assert good.status_code == 201, good.text


def test_the_store_itself_refuses_a_correction_that_is_no_image(tmp_path):
    corrections = Corrections(tmp_path / "lab.sqlite", tmp_path / "images")
    with pytest.raises(CorrectionError, match="not usable"):
        corrections.submit("someone", "monocyte", TEXT)
    assert corrections.count() == 0 and not any((tmp_path / "images").rglob("*"))


def test_export_and_retraining_skip_an_unreadable_correction_and_report_it(tmp_path, caplog):
    corrections = Corrections(tmp_path / "lab.sqlite", tmp_path / "images")
    rows = [corrections.submit("someone", cls, picture(seed)) for seed, cls in enumerate(CLASS_PER_IMAGE)]
    # Stored before the guard existed, or damaged since: one file is text, one is gone.
    corrections.images.path(rows[0]["image_sha256"]).write_bytes(TEXT)
    corrections.images.path(rows[1]["image_sha256"]).unlink()
    dest = tmp_path / "corrections"
    with caplog.at_level("WARNING"):
        result = corrections.export(dest)
    assert result["images"] == len(rows) - 2 and result["unreadable"] == 2
    assert sorted(result["unreadable_images"]) == sorted(r["image_sha256"] for r in rows[:2])
    assert rows[0]["image_sha256"] in caplog.text
    assert len([p for p in dest.rglob("*") if p.is_file()]) == len(rows) - 2

    # A bad file in the exported folder (put there by hand, or by an older export): left out, reported.
    (dest / "monocyte" / f"{'ab' * 32}.jpg").write_bytes(TEXT)
    (dest / "lymphocyte" / "truncated.png").write_bytes(picture(9)[:100])
    caplog.clear()
    with caplog.at_level("WARNING"):
        manifest = corrections_rows(dest, holdout_fraction=0.5)
    assert len(manifest) == len(rows) - 2
    assert set(manifest.attrs["unreadable"]) == {f"monocyte/{'ab' * 32}.jpg", "lymphocyte/truncated.png"}
    assert "2 of" in caplog.text and "unreadable" in caplog.text


CLASS_PER_IMAGE = ["monocyte", "lymphocyte", "eosinophil", "neutrophil", "monocyte"]


# --- 6. files with patient data are their owner's alone -------------------------------------------------


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def open_umask():
    previous = os.umask(0o022)  # the usual default: files 0644, folders 0755
    yield
    os.umask(previous)


def test_databases_and_patient_images_are_created_owner_only(tmp_path, open_umask):
    log = PredictionStore(tmp_path / "log" / "predictions.sqlite", tmp_path / "kept", retain_images=True)
    log.log(PredictionRecord("1", "monocyte", 0.9, {"monocyte": 0.9}, False, "cd" * 32, 1.0), b"image bytes")
    assert mode(tmp_path / "log" / "predictions.sqlite") == 0o600
    assert mode(tmp_path / "log" / "predictions.sqlite-wal") == 0o600
    assert mode(tmp_path / "kept") == 0o700 and mode(tmp_path / "kept" / "cd") == 0o700
    assert mode(log.images.path("cd" * 32)) == 0o600

    corrections = Corrections(tmp_path / "lab" / "lab.sqlite", tmp_path / "corrected")
    row = corrections.submit("someone", "monocyte", picture(3))
    assert mode(tmp_path / "lab" / "lab.sqlite") == 0o600
    assert mode(tmp_path / "lab" / "lab.sqlite-wal") == 0o600
    assert mode(tmp_path / "corrected") == 0o700
    assert mode(corrections.images.path(row["image_sha256"]).parent) == 0o700
    assert mode(corrections.images.path(row["image_sha256"])) == 0o600

    # A database made before (world-readable) is tightened when opened.
    old = tmp_path / "old.sqlite"
    old.touch(mode=0o644)
    os.chmod(old, 0o644)
    PredictionStore(old)
    assert mode(old) == 0o600
