"""Lab mode's images live in the shared PostgreSQL, not on the host that received them: a request
image kept by one process (its own project folder and working directory, as a replica on another
machine) is in another process's review queue and served by its routes; a correction submitted in
one process is exported by another; ``hematovision db upgrade`` carries the images a host kept in
folders into the database, nothing lost."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
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
from hematovision.image_store import DatabaseImageStore, FolderImageStore
from hematovision.lab.accounts import Accounts
from hematovision.serving.images import strip_metadata
from hematovision.serving.predictor import Predictor
from hematovision.settings import get_settings

PASSWORD = "a long enough password"

# A host of its own: its project folder is its working directory, everything else comes from the
# settings (HEMATOVISION_DATABASE_URL); it keeps a prediction's image, or submits a correction, or
# exports the corrections as the retraining run's export step does.
HOST = """
import hashlib, json, sys
import numpy as np
from hematovision import stores
from hematovision.serving.prediction_log import PredictionRecord
from hematovision.settings import get_settings

action, image = sys.argv[1], bytes.fromhex(sys.argv[2]) if len(sys.argv) > 2 else b""
settings = get_settings()
if action == "predict":
    sha = hashlib.sha256(image).hexdigest()
    record = PredictionRecord("3", "unknown", 0.4, {"unknown": 0.4}, True, sha, 9.0, embedding=np.ones(8))
    stores.prediction_log(settings).log(record, image)
    print(json.dumps({"id": record.id}))
elif action == "correct":
    reviewer, true_class = sys.argv[3:5]
    print(json.dumps(stores.corrections(settings).submit(reviewer, true_class, image)))
else:
    dest = settings.path(settings.paths.corrections_dataset_dir)
    result = stores.corrections(settings).export(dest)
    files = {str(p.relative_to(dest)): p.read_bytes().hex() for p in dest.rglob("*") if p.is_file()}
    print(json.dumps({"images": result["images"], "unreadable": result["unreadable"], "files": files}))
"""


def picture(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def on_host(folder: Path, url: str, *args: str) -> dict:
    """Run ``HOST`` as another machine would: its own project folder, working there."""
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HEMATOVISION_PROJECT_DIR": str(folder), "HEMATOVISION_DATABASE_URL": url}
    done = subprocess.run([sys.executable, "-c", HOST, *args], capture_output=True, text=True, env=env, cwd=folder)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def files_under(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []


@pytest.fixture
def this_host(tmp_path, postgres_url, monkeypatch) -> Path:
    """This process as a second host: another project folder and working directory, the same database."""
    folder = tmp_path / "host-b"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("HEMATOVISION_PROJECT_DIR", str(folder))
    monkeypatch.setenv("HEMATOVISION_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    yield folder
    get_settings.cache_clear()


def test_an_image_kept_on_one_host_is_reviewed_on_another(tmp_path, postgres_url, this_host):
    image = picture(1)
    logged = on_host(tmp_path / "host-a", postgres_url, "predict", image.hex())
    assert files_under(tmp_path / "host-a") == []  # host A kept nothing on its disk

    accounts = Accounts(postgres_url)
    accounts.add_user("pat", PASSWORD, ["pathologist"])
    bearer = {"Authorization": f"Bearer {accounts.create_token('pat', 'test')}"}
    app = FastAPI()
    app.include_router(review_routes.router)
    errors.install(app)
    client = TestClient(app)

    queue = client.get("/review/queue", headers=bearer)
    assert queue.status_code == 200, queue.text
    assert [item["id"] for item in queue.json()["items"]] == [logged["id"]]
    shown = client.get(queue.json()["items"][0]["image_url"], headers=bearer)
    assert shown.status_code == 200, shown.text
    assert shown.content == strip_metadata(image)[0]

    log = stores.prediction_log(get_settings())
    assert isinstance(log.images, DatabaseImageStore) and log.get(logged["id"])["image_kept"] is True
    predictor = Predictor(get_settings(), SimpleNamespace(current=None), batcher=object(), store=log)
    assert predictor._retained_image(logged["id"]) == image  # Grad-CAM of a logged prediction, here

    corrected = client.post("/feedback", data={"prediction_id": logged["id"], "true_class": "monocyte"}, headers=bearer)
    assert corrected.status_code == 201, corrected.text
    assert corrected.json()["image_sha256"] == hashlib.sha256(image).hexdigest()
    assert client.get("/review/queue", headers=bearer).json()["items"] == []  # reviewed
    assert files_under(this_host) == []  # and host B kept nothing on its disk either


def test_a_correction_submitted_on_one_host_is_exported_on_another(tmp_path, postgres_url):
    monocyte, lymphocyte = picture(2), picture(3)
    on_host(tmp_path / "replica-a", postgres_url, "correct", monocyte.hex(), "ann", "monocyte")
    on_host(tmp_path / "replica-b", postgres_url, "correct", lymphocyte.hex(), "bob", "lymphocyte")
    assert files_under(tmp_path / "replica-a") == [] and files_under(tmp_path / "replica-b") == []

    exported = on_host(tmp_path / "worker", postgres_url, "export")  # the retraining run's export step
    assert exported == {
        "images": 2,
        "unreadable": 0,
        "files": {
            f"monocyte/{hashlib.sha256(monocyte).hexdigest()}.png": monocyte.hex(),
            f"lymphocyte/{hashlib.sha256(lymphocyte).hexdigest()}.png": lymphocyte.hex(),
        },
    }


def test_db_upgrade_carries_a_hosts_image_folders_into_the_database(tmp_path, postgres_url, this_host):
    # Images kept before lab mode: files in this host's folders, one a month old, one damaged.
    settings = get_settings()
    kept, corrected = picture(4), picture(5)
    month_ago = time.time() - 30 * 86400
    folders = {
        "prediction": FolderImageStore(settings.path(settings.serving.images_dir)),
        "correction": FolderImageStore(settings.path(settings.lab.corrections_images_dir)),
    }
    for store, data in ((folders["prediction"], kept), (folders["correction"], corrected)):
        store.put(hashlib.sha256(data).hexdigest(), data)
    os.utime(folders["prediction"].path(hashlib.sha256(kept).hexdigest()), (month_ago, month_ago))
    damaged = folders["prediction"].path("ab" * 32)
    damaged.parent.mkdir()
    damaged.write_bytes(b"not the bytes this name promises")

    upgraded = CliRunner().invoke(cli, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert "prediction images: 1 carried" in upgraded.output and "1 files left" in upgraded.output
    assert "corrected images: 1 carried" in upgraded.output

    log, corrections = stores.prediction_log(settings), stores.corrections(settings)
    assert log.image(hashlib.sha256(kept).hexdigest()) == kept
    assert corrections.image(hashlib.sha256(corrected).hexdigest()) == corrected
    (entry,) = log.images.entries()
    assert entry.stored_at == pytest.approx(month_ago, abs=1)  # its age carried: retention still applies
    assert files_under(this_host) == [damaged]  # carried files deleted; the damaged one left, reported
    again = CliRunner().invoke(cli, ["db", "upgrade"]).output  # nothing left to carry; the damaged file said again
    assert "prediction images: 0 carried" in again and "1 files left" in again and "corrected images" not in again
