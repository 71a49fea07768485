"""The review routes and cells the model does not know (issue 13), in-process without a trained
model: the queue offers what a pathologist may answer (the model's classes and the laboratory's
vocabulary, ``stores.answerable_types``), filters and marks answers of ``unknown``, and a correction
names any type of the vocabulary, never ``unknown``.

The queue's "unknown" prediction is written into the prediction log as the service logs one (a
real platelet image of the second laboratory, label ``unknown``): no model answers here."""

from __future__ import annotations

import hashlib

import pytest
from fastapi import FastAPI
from starlette.testclient import TestClient
from typer.testing import CliRunner

from hematovision import CLASSES, stores
from hematovision.api import errors, review_routes
from hematovision.cli import app as cli
from hematovision.model.open_set import UNKNOWN
from hematovision.serving.prediction_log import PredictionRecord
from hematovision.settings import get_settings

from conftest import BLOOD_CELLS, SHARED, add_user

PASSWORD = "review routes need a long one"
VERSION = "review-routes"  # a model version of this module's own predictions alone
PLATELET = sorted((SHARED / "pbc-other" / "platelet").glob("*.jpg"))[20]
MONOCYTE = sorted((BLOOD_CELLS / "TEST" / "MONOCYTE").glob("*.jpeg"))[20]
RESEMBLES = {"eosinophil": 0.1, "lymphocyte": 0.62, "monocyte": 0.2, "neutrophil": 0.08}


@pytest.fixture(scope="module")
def headers(project) -> dict[str, str]:
    add_user("routes-pat", "pathologist", password=PASSWORD)
    result = CliRunner().invoke(cli, ["users", "token", "routes-pat", "--name", "review routes"])
    assert result.exit_code == 0, result.output
    return {"Authorization": f"Bearer {result.output.strip().splitlines()[-1]}"}


@pytest.fixture(scope="module")
def client(project) -> TestClient:
    app = FastAPI()
    app.include_router(review_routes.router)
    errors.install(app)
    return TestClient(app)


@pytest.fixture(scope="module")
def logged(project) -> dict[str, PredictionRecord]:
    """An unknown answer and a known one, flagged for review with their images kept, as the service logs them."""
    store = stores.prediction_log(get_settings())
    out = {}
    for name, path, label in (("unknown", PLATELET, UNKNOWN), ("known", MONOCYTE, "monocyte")):
        image = path.read_bytes()
        record = PredictionRecord(
            VERSION, label, 0.62, RESEMBLES, True, hashlib.sha256(image).hexdigest(), 1.0, open_set_score=25000.0
        )
        store.log(record, image)
        out[name] = record
    return out


@pytest.fixture
def vocabulary(monkeypatch):
    """Sets the laboratory's vocabulary for one test; the settings as before afterwards."""

    def configure(types: str) -> None:
        monkeypatch.setenv("HEMATOVISION_CELL_TYPES", types)
        get_settings.cache_clear()

    yield configure
    monkeypatch.undo()
    get_settings.cache_clear()


def test_the_queue_offers_the_vocabulary_and_marks_and_filters_unknown_answers(client, headers, logged):
    body = client.get("/review/queue", params={"model_version": VERSION}, headers=headers).json()
    assert body["classes"] == list(stores.answerable_types(get_settings()))
    assert body["classes"][: len(CLASSES)] == list(CLASSES)
    assert {"basophil", "immature granulocyte", "smudge cell", "other"} <= set(body["classes"])
    assert UNKNOWN not in body["classes"]  # the model's answer, never a reviewer's
    items = {item["id"]: item for item in body["items"]}
    assert set(items) == {logged["unknown"].id, logged["known"].id}
    assert items[logged["unknown"].id]["unknown"] is True and items[logged["unknown"].id]["label"] == UNKNOWN
    assert items[logged["unknown"].id]["probabilities"] == RESEMBLES  # what it resembles, still there
    assert items[logged["known"].id]["unknown"] is False

    for asked in (UNKNOWN, "Unknown ", "UNKNOWN"):
        only = client.get("/review/queue", params={"model_version": VERSION, "label": asked}, headers=headers).json()
        assert [item["id"] for item in only["items"]] == [logged["unknown"].id], asked
    monocytes = client.get("/review/queue", params={"model_version": VERSION, "label": "monocyte"}, headers=headers)
    assert [item["id"] for item in monocytes.json()["items"]] == [logged["known"].id]
    assert client.get("/review/queue", params={"label": UNKNOWN}).status_code == 401


def test_an_unknown_cell_is_named_with_a_type_of_the_vocabulary(client, headers, logged):
    unknown = logged["unknown"].id
    for refused in (UNKNOWN, "band cell", ""):
        response = client.post("/feedback", data={"prediction_id": unknown, "true_class": refused}, headers=headers)
        assert response.status_code == 422 and response.json()["error"] == "bad_correction", refused
    named = client.post(
        "/feedback", data={"prediction_id": unknown, "true_class": "Immature Granulocyte"}, headers=headers
    )
    assert named.status_code == 201, named.text
    assert (named.json()["predicted_class"], named.json()["true_class"]) == (UNKNOWN, "immature granulocyte")
    queue = client.get("/review/queue", params={"model_version": VERSION}, headers=headers).json()
    assert unknown not in {item["id"] for item in queue["items"]}  # reviewed: out of the queue

    confusion = client.get("/feedback/stats", headers=headers).json()["confusion"]
    assert confusion["classes"] == list(stores.answerable_types(get_settings()))
    row = confusion["matrix"][confusion["predicted"].index(UNKNOWN)]
    assert row[confusion["classes"].index("immature granulocyte")] >= 1


def test_the_queue_and_feedback_follow_the_configured_vocabulary(client, headers, logged, vocabulary):
    vocabulary('["band cell", "Basophil", "unknown", " "]')
    body = client.get("/review/queue", params={"model_version": VERSION}, headers=headers).json()
    assert body["classes"] == [*CLASSES, "band cell", "basophil"]
    known = logged["known"].id
    refused = client.post("/feedback", data={"prediction_id": known, "true_class": "platelet"}, headers=headers)
    assert refused.status_code == 422  # not in this laboratory's vocabulary
    # (a correction stays in the session's lab database: one with a type the other tests' default
    # vocabulary lacks would be missing from their confusion matrix)
    named = client.post("/feedback", data={"prediction_id": known, "true_class": "basophil"}, headers=headers)
    assert named.status_code == 201 and named.json()["true_class"] == "basophil"
