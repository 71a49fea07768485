"""Lab mode's shared PostgreSQL, for real: two processes see each other's writes; the server stops
(every store raises DatabaseUnavailable, the service answers 503) and comes back (the same objects,
the same app, carry on); every acknowledged correction is there afterwards."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import threading

import numpy as np
import pytest
from fastapi import FastAPI
from PIL import Image
from starlette.testclient import TestClient

from hematovision.api import account_routes, errors, review_routes
from hematovision.database import DatabaseUnavailable
from hematovision.lab.accounts import Accounts
from hematovision.lab.corrections import Corrections
from hematovision.monitoring.state import MonitorState
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.settings import get_settings

PASSWORD = "a long enough password"
WAIT_SECONDS = 120  # a liveness bound for the writer thread, never a measured duration

# Another process on the same database: logs one prediction that needs review (its image kept in
# the folder given), or prints its review queue (minus reviewed predictions) and corrections.
OTHER_PROCESS = """
import json, sys
import numpy as np
from pathlib import Path
from hematovision.lab.corrections import Corrections
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore

url, folder, action = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
log = PredictionStore(url, folder / "kept", retain_review_images=True)
corrections = Corrections(url, folder / "corrected")
if action == "predict":
    record = PredictionRecord("3", "unknown", 0.4, {"unknown": 0.4}, True, sys.argv[4], 9.0, embedding=np.ones(8))
    log.log(record, bytes.fromhex(sys.argv[5]))
    print(json.dumps({"id": record.id}))
else:
    queue = log.review_queue(exclude=corrections.reviewed_prediction_ids())
    print(json.dumps({"queue": [row["id"] for row in queue], "corrections": [c["id"] for c in corrections.all()]}))
"""


def picture(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (40, 40, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def other_process(*args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", OTHER_PROCESS, *args], capture_output=True, text=True, env=os.environ.copy()
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_two_processes_share_the_log_the_review_queue_and_the_corrections(postgres_url, tmp_path):
    image = picture(1)
    sha = hashlib.sha256(image).hexdigest()
    logged = other_process(postgres_url, str(tmp_path), "predict", sha, image.hex())

    # This process sees the other's prediction in its queue, and corrects it.
    log = PredictionStore(postgres_url, tmp_path / "kept", retain_review_images=True)
    corrections = Corrections(postgres_url, tmp_path / "corrected")
    assert [row["id"] for row in log.review_queue(exclude=corrections.reviewed_prediction_ids())] == [logged["id"]]
    correction = corrections.submit("ann", "monocyte", image, log.get(logged["id"]))

    # ... and the other process sees the correction, and the prediction gone from its queue.
    seen = other_process(postgres_url, str(tmp_path), "queue")
    assert seen == {"queue": [], "corrections": [correction["id"]]}


def test_postgresql_down_then_back_nothing_acknowledged_is_lost(postgres_server, postgres_url, tmp_path):
    corrections = Corrections(postgres_url, tmp_path / "corrected")
    accounts = Accounts(postgres_url)
    log = PredictionStore(postgres_url, tmp_path / "kept")
    state = MonitorState(postgres_url)
    accounts.add_user("ann", PASSWORD, ["pathologist"])
    image = picture(2)

    acknowledged: list[str] = []
    refused: list[DatabaseUnavailable] = []
    enough_before, refused_once, enough_after, stop = (threading.Event() for _ in range(4))

    def pathologist_at_work() -> None:
        """Corrects cell after cell, as fast as the database answers, across the outage."""
        while not stop.is_set():
            try:
                acknowledged.append(corrections.submit("ann", "monocyte", image)["id"])
            except DatabaseUnavailable as error:
                refused.append(error)
                refused_once.set()
                continue
            if len(acknowledged) >= 5:
                enough_before.set()
            if refused_once.is_set() and len(acknowledged) >= 10:
                enough_after.set()

    writer = threading.Thread(target=pathologist_at_work)
    writer.start()
    try:
        assert enough_before.wait(WAIT_SECONDS)
        postgres_server.stop()
        assert refused_once.wait(WAIT_SECONDS)
        # Every store says so, with the one exception type, while the server is down.
        for call in (
            corrections.count,
            lambda: accounts.authenticate("ann", PASSWORD),
            log.count,
            lambda: log.log(PredictionRecord("3", "monocyte", 0.9, {"monocyte": 0.9}, False, "ab" * 32, 1.0)),
            lambda: state.put("checkpoint:3", 1),
        ):
            with pytest.raises(DatabaseUnavailable, match="unavailable"):
                call()
        postgres_server.start()
        assert enough_after.wait(WAIT_SECONDS)  # the same store, the same process: no restart
    finally:
        stop.set()
        writer.join()
        if not postgres_server.running():
            postgres_server.start()

    assert refused and len(acknowledged) >= 10
    assert set(acknowledged) <= {row["id"] for row in corrections.all()}  # every acknowledged correction is there
    assert accounts.authenticate("ann", PASSWORD) is not None
    state.put("checkpoint:3", 7)
    assert state.get("checkpoint:3") == 7 and log.count() == 0


def test_a_store_made_while_postgresql_is_down_migrates_and_works_once_it_is_back(
    postgres_server, postgres_url, tmp_path
):
    """A replica that starts during an outage starts (stores touch nothing when made); its first use
    after the server is back migrates the fresh database."""
    postgres_server.stop()
    try:
        corrections = Corrections(postgres_url, tmp_path / "corrected")
        with pytest.raises(DatabaseUnavailable):
            corrections.count()
    finally:
        postgres_server.start()
    assert corrections.count() == 0
    assert corrections.submit("ann", "monocyte", picture(4))["id"] in {row["id"] for row in corrections.all()}


def test_the_service_answers_503_while_postgresql_is_down_and_recovers(
    postgres_server, postgres_url, tmp_path, monkeypatch
):
    monkeypatch.setenv("HEMATOVISION_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("HEMATOVISION_DATABASE_URL", postgres_url)
    get_settings.cache_clear()
    accounts = Accounts(postgres_url)
    accounts.add_user("pat", PASSWORD, ["pathologist"])
    bearer = {"Authorization": f"Bearer {accounts.create_token('pat', 'test')}"}
    app = FastAPI()
    for routes in (account_routes, review_routes):
        app.include_router(routes.router)
    errors.install(app)
    client = TestClient(app, base_url="http://hv.test")

    def correct(seed: int):
        return client.post(
            "/feedback", files={"image": ("cell.png", picture(seed))}, data={"true_class": "monocyte"}, headers=bearer
        )

    try:
        first = correct(1)
        assert first.status_code == 201, first.text
        postgres_server.stop()
        for refused in (correct(2), client.post("/login", data={"username": "pat", "password": PASSWORD})):
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"] == "database_unavailable"
            assert refused.headers["retry-after"] == str(errors.DATABASE_RETRY_SECONDS)
            assert "127.0.0.1" not in refused.text  # where the database is stays in the server's log
        postgres_server.start()
        second = correct(3)
        assert second.status_code == 201, second.text
        assert client.post("/login", data={"username": "pat", "password": PASSWORD}).status_code == 200
    finally:
        if not postgres_server.running():
            postgres_server.start()
        get_settings.cache_clear()
    stored = {row["id"] for row in Corrections(postgres_url, tmp_path / "x").all()}
    assert stored == {first.json()["id"], second.json()["id"]}


FIRST_USE = """
import sys
from pathlib import Path
from hematovision.lab.accounts import Accounts
from hematovision.monitoring.state import MonitorState
from hematovision.serving.prediction_log import PredictionStore

lab, predictions, monitoring, folder = sys.argv[1:5]
Accounts(lab).sign_in_failed("someone", sys.argv[5], window=60)
PredictionStore(predictions, Path(folder))
MonitorState(monitoring).put("started:" + sys.argv[5], True)
"""


def test_processes_starting_together_migrate_one_after_the_other(backend, tmp_path):
    """Replicas of a new version start at once on a fresh database: each store's first use migrates,
    under a lock (sqlite's write lock, PostgreSQL's advisory lock), and none of them fails."""
    stores = [str(backend[store]) for store in ("lab", "predictions", "monitoring")]
    starting = [
        subprocess.Popen(
            [sys.executable, "-c", FIRST_USE, *stores, str(tmp_path / "kept"), f"replica-{n}"],
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(3)
    ]
    for process in starting:
        _, errors_seen = process.communicate()
        assert process.returncode == 0, errors_seen
    assert Accounts(backend["lab"]).sign_in_failures() == 3
    assert MonitorState(backend["monitoring"]).get("started:replica-2") is True
