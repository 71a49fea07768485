"""The BentoML service, for real: `bentoml serve` on 127.0.0.1 serving the session's champion from
the session's MLflow registry. Predictions, the prediction log, Grad-CAM, a corpus of bad inputs
built here, hot swap under load (promote, a broken version, rollback), the CLI's local predict,
and `bentoml build`."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import requests
from PIL import Image
from typer.testing import CliRunner

from hematovision import CLASSES, stores
from hematovision.cli import app
from hematovision.model.open_set import UNKNOWN
from hematovision.params import PromoteParams
from hematovision.registry.gate import promote
from hematovision.registry.registry import CHAMPION, Registry
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.settings import get_settings

from conftest import BLOOD_CELLS, REPO, SERVICE_MAX_REQUEST_BYTES, SERVICE_REVIEW_THRESHOLD, add_user

CELL_IMAGES = {c: sorted((BLOOD_CELLS / "TEST" / c.upper()).glob("*.jpeg"))[:3] for c in CLASSES}
A_CELL = CELL_IMAGES["neutrophil"][0]
ANSWERS = (*CLASSES, UNKNOWN)  # a cell beyond the model's open-set threshold is answered "unknown"


def post_image(
    url: str, data: bytes, name: str = "cell.jpeg", route: str = "/predict", field: str = "image", **extra
) -> requests.Response:
    return requests.post(f"{url}{route}", files={field: (name, data)}, timeout=120, **extra)


def registry() -> Registry:
    settings = get_settings()
    return stores.registry(settings)


def champion_version() -> str:
    return str(registry().version_by_alias(CHAMPION).version)


@pytest.fixture(scope="module")
def pathologist_token(project) -> str:
    """An API token of a pathologist made for this module."""
    add_user("service-pat", "pathologist", password="correct horse battery")
    result = CliRunner().invoke(app, ["users", "token", "service-pat", "--name", "tests"])
    assert result.exit_code == 0, result.output
    return result.output.strip().splitlines()[-1]


def wait_for_version(url: str, version: str, timeout: float = 90) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if requests.get(f"{url}/model", timeout=10).json()["version"] == version:
            return time.monotonic() - started
        time.sleep(0.5)
    raise AssertionError(f"the service did not swap to version {version}: {requests.get(f'{url}/model').json()}")


# --- predictions ---------------------------------------------------------------------------------


@pytest.mark.e2e
def test_predict_answers_with_every_field_and_logs_the_prediction(project, service_url):
    # Earlier modules may have moved the champion and back: the service follows within a poll and a load.
    wait_for_version(service_url, champion_version())
    response = post_image(service_url, A_CELL.read_bytes())
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["label"] in ANSWERS and body["unknown"] == (body["label"] == UNKNOWN)
    assert set(body["probabilities"]) == set(CLASSES)
    assert sum(body["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert body["confidence"] == pytest.approx(max(body["probabilities"].values()))
    assert body["model_version"] == champion_version()
    assert body["cell_in_view"] in {"whole", "cut"}  # a TEST picture: the localiser finds its cell
    assert body["needs_review"] == (body["confidence"] < SERVICE_REVIEW_THRESHOLD)

    logged = PredictionStore(project / "monitoring" / "predictions.sqlite").get(body["prediction_id"])
    assert logged is not None and logged["label"] == body["label"] and logged["model_version"] == body["model_version"]
    assert logged["embedding"].shape == (1280,) and np.isfinite(logged["embedding"]).all()
    assert {"brightness", "hue", "saturation", "sharpness", "width", "height"} <= set(logged["image_stats"])
    assert logged["latency_ms"] > 0
    # Images are not kept by default (patient privacy), except those the review queue must show.
    assert (logged["image_path"] is not None) == body["needs_review"]


@pytest.mark.e2e
def test_a_picture_without_a_white_cell_is_sent_for_review_however_confident(project, service_url):
    """No nucleus found: the model classified the frame's centre, a guess (on TEST such answers
    are nearly all wrong). The answer says so and a person gets to look, whatever the confidence."""
    smear = Image.new("RGB", (320, 240), (215, 205, 200))  # background and a red cell, no stain
    smear.paste((205, 150, 150), (140, 100, 180, 140))
    buffer = io.BytesIO()
    smear.save(buffer, "JPEG")
    body = post_image(service_url, buffer.getvalue()).json()
    assert body["cell_in_view"] == "none" and body["needs_review"] is True
    logged = PredictionStore(project / "monitoring" / "predictions.sqlite").get(body["prediction_id"])
    assert logged["needs_review"] == 1 and logged["image_path"] is not None  # it is in the review queue


@pytest.mark.e2e
def test_predict_batch_answers_in_order_with_errors_in_place(service_url):
    files = [("images", (p.name, p.read_bytes())) for p in (CELL_IMAGES["eosinophil"][0], CELL_IMAGES["lymphocyte"][0])]
    files.insert(1, ("images", ("notes.txt", b"not an image at all")))
    response = requests.post(f"{service_url}/predict_batch", files=files, timeout=120)
    assert response.status_code == 200, response.text
    results = response.json()
    assert len(results) == 3
    assert results[0]["label"] in ANSWERS and results[2]["label"] in ANSWERS
    assert results[1]["error"] == "not_an_image"
    single = post_image(service_url, CELL_IMAGES["lymphocyte"][0].read_bytes()).json()
    assert results[2]["probabilities"] == pytest.approx(single["probabilities"], abs=1e-4)  # batching changes nothing


@pytest.mark.e2e
def test_concurrent_requests_all_succeed(service_url):
    data = [p.read_bytes() for paths in CELL_IMAGES.values() for p in paths]
    results: list[int] = []

    def client(i: int) -> None:
        for d in data[i::8]:
            results.append(post_image(service_url, d).status_code)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [200] * len(data)


@pytest.mark.e2e
def test_explain_returns_a_grad_cam_overlay_of_the_whole_image(service_url, pathologist_token):
    data = A_CELL.read_bytes()
    response = post_image(service_url, data, route="/explain")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    overlay = Image.open(io.BytesIO(response.content))
    assert overlay.size == Image.open(io.BytesIO(data)).size
    assert response.headers["x-hematovision-label"] in CLASSES

    other = requests.post(
        f"{service_url}/explain", files={"image": ("c.jpeg", data)}, data={"class_name": "Monocyte"}, timeout=120
    )
    assert other.status_code == 200 and other.headers["x-hematovision-class"] == "monocyte"
    assert other.content != response.content

    bad_class = requests.post(
        f"{service_url}/explain", files={"image": ("c.jpeg", data)}, data={"class_name": "basophil"}, timeout=60
    )
    assert bad_class.status_code == 422 and bad_class.json()["error"] == "unknown_class"
    # A kept image (by prediction id) is patient material: only a signed-in pathologist gets its overlay.
    pathologist = {"Authorization": f"Bearer {pathologist_token}"}
    unknown = requests.post(
        f"{service_url}/explain", data={"prediction_id": "nope"}, files={"unused": ("x", b"")}, timeout=60
    )
    assert unknown.status_code == 401 and unknown.json()["error"] == "unauthorized"
    unknown = requests.post(f"{service_url}/explain", data={"prediction_id": "nope"}, headers=pathologist, timeout=60)
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_prediction"
    prediction = post_image(service_url, data).json()
    by_id = requests.post(
        f"{service_url}/explain",
        data={"prediction_id": prediction["prediction_id"]},
        files={"unused": ("x", b"")},
        headers=pathologist,
        timeout=60,
    )
    if prediction["needs_review"]:  # its image is kept for the review queue
        assert by_id.status_code == 200 and by_id.content == response.content
        anonymous = requests.post(
            f"{service_url}/explain", data={"prediction_id": prediction["prediction_id"]}, timeout=60
        )
        assert anonymous.status_code == 401 and anonymous.content != response.content
    else:
        assert by_id.status_code == 404 and by_id.json()["error"] == "image_not_retained"


@pytest.mark.e2e
def test_model_health_metrics_docs_and_page(service_url):
    model = requests.get(f"{service_url}/model", timeout=10).json()
    assert model["ready"] and model["alias"] == "champion" and model["version"] == champion_version()
    assert model["data_hash"] and model["loaded_at"] and "val_macro_f1" in model["metrics"]
    assert requests.get(f"{service_url}/healthz", timeout=10).status_code == 200
    assert requests.get(f"{service_url}/readyz", timeout=10).status_code == 200
    post_image(service_url, b"garbage")  # one error, so the error counter exists
    metrics = requests.get(f"{service_url}/metrics", timeout=10).text
    assert f"hematovision_model_version {model['version']}" in metrics
    assert "hematovision_model_ready 1" in metrics
    assert 'bentoml_service_request_duration_seconds_bucket{endpoint="/predict"' in metrics
    assert 'endpoint="/predict",http_response_code="422"' in metrics
    spec = requests.get(f"{service_url}/docs.json", timeout=10).json()
    assert {"/predict", "/predict_batch", "/explain", "/model"} <= set(spec["paths"])
    docs = requests.get(f"{service_url}/docs", timeout=10)
    assert docs.status_code == 200 and "swagger-ui" in docs.text and "googletagmanager" not in docs.text
    page = requests.get(f"{service_url}/", timeout=10)
    assert page.status_code == 200 and page.url.endswith("/ui/")


@pytest.mark.e2e
def test_metrics_name_route_templates_not_the_records_people_open(service_url, pathologist_token):
    record, made_up = uuid.uuid4().hex, f"/no-such-page-{uuid.uuid4().hex}"
    opened = requests.get(
        f"{service_url}/review/image/{record}", headers={"Authorization": f"Bearer {pathologist_token}"}, timeout=30
    )
    assert opened.status_code == 404  # no kept image by that id; the request is counted all the same
    assert requests.get(f"{service_url}{made_up}", timeout=30).status_code == 404
    metrics = requests.get(f"{service_url}/metrics", timeout=10).text
    assert record not in metrics and made_up not in metrics
    assert 'endpoint="/review/image/{prediction_id}"' in metrics and 'endpoint="unmatched"' in metrics


@pytest.mark.e2e
def test_metrics_show_the_bytes_of_retained_images(project, service_url):
    """The serving worker's retention scheduler appends the gauge; an image kept for review (the
    session's service flags nearly every answer) is counted within the gauge's 30 s cache."""
    body = post_image(service_url, CELL_IMAGES["monocyte"][1].read_bytes()).json()
    logged = PredictionStore(project / "monitoring" / "predictions.sqlite").get(body["prediction_id"])
    assert logged["image_path"] is not None, "the test needs a kept image"
    deadline = time.monotonic() + 60
    while True:
        metrics = requests.get(f"{service_url}/metrics", timeout=10).text
        line = next(x for x in metrics.splitlines() if x.startswith("hematovision_retained_image_bytes "))
        if int(line.split()[1]) >= Path(logged["image_path"]).stat().st_size:
            break
        assert time.monotonic() < deadline, line
        time.sleep(2)
    assert "hematovision_retention_last_pass_seconds" in metrics


# --- bad input ----------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def convertible_inputs() -> dict[str, bytes]:
    """Unusual but legitimate images: converted to RGB and classified."""
    cell = Image.open(A_CELL).convert("RGB")
    sixteen = Image.fromarray((np.asarray(cell.convert("L"), np.uint16) * 257).astype(np.uint16))
    return {
        "16-bit grey PNG": encode(sixteen, "PNG"),
        "CMYK JPEG": encode(cell.convert("CMYK"), "JPEG"),
        "palette PNG": encode(cell.convert("P", palette=Image.Palette.ADAPTIVE), "PNG"),
        "RGBA PNG": encode(cell.convert("RGBA"), "PNG"),
        "TIFF": encode(cell, "TIFF"),
        "BMP": encode(cell, "BMP"),
    }


def bad_inputs() -> dict[str, tuple[bytes, int, str]]:
    """(bytes, expected status, expected error code) for each kind of bad file."""
    cell = Image.open(A_CELL).convert("RGB")
    jpeg = A_CELL.read_bytes()
    frames = [cell, cell.rotate(90)]
    return {
        "text": (b"Patient 17: smear looks fine.\n" * 20, 422, "not_an_image"),
        "zero bytes": (b"", 422, "empty"),
        "truncated JPEG": (jpeg[: len(jpeg) // 2], 422, "truncated"),
        "corrupt JPEG": (jpeg[:20] + bytes(range(256)) * 8, 422, None),
        "1x1 PNG": (encode(Image.new("RGB", (1, 1), "white"), "PNG"), 422, "too_small"),
        "animated PNG": (encode(frames[0], "PNG", save_all=True, append_images=frames[1:]), 422, "animated"),
        "multi-page TIFF": (encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]), 422, "animated"),
        "animated GIF": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), 415, "unsupported_format"),
        "decompression bomb": (encode(Image.new("1", (9000, 9000)), "PNG"), 413, "decompression_bomb"),
        "oversized upload": (os.urandom(SERVICE_MAX_REQUEST_BYTES + 1024), 413, "too_large"),
    }


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(convertible_inputs()))
def test_unusual_but_valid_images_are_converted_and_classified(service_url, name):
    response = post_image(service_url, convertible_inputs()[name], name="cell.img")
    assert response.status_code == 200, f"{name}: {response.text}"
    assert response.json()["label"] in ANSWERS


@pytest.mark.e2e
def test_every_bad_input_gets_a_clear_4xx_and_the_service_keeps_serving(service_url):
    for name, (data, status, code) in bad_inputs().items():
        response = post_image(service_url, data, name="upload.bin")
        assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
        body = response.json()
        assert set(body) == {"error", "detail"} and body["detail"], name
        if code:
            assert body["error"] == code, f"{name}: {body}"

    jpeg = A_CELL.read_bytes()
    requests_ = {
        "wrong field name": (
            lambda: requests.post(f"{service_url}/predict", files={"file": ("c.jpeg", jpeg)}, timeout=30),
            400,
            "missing_field",
        ),
        "text instead of a file": (
            lambda: requests.post(f"{service_url}/predict", files={"image": (None, "hello")}, timeout=30),
            400,
            "not_a_file",
        ),
        "JSON body": (
            lambda: requests.post(f"{service_url}/predict", json={"image": "x"}, timeout=30),
            415,
            "unsupported_media_type",
        ),
        "raw JPEG body": (
            lambda: requests.post(
                f"{service_url}/predict", data=jpeg, headers={"content-type": "image/jpeg"}, timeout=30
            ),
            415,
            "unsupported_media_type",
        ),
        "GET": (lambda: requests.get(f"{service_url}/predict", timeout=30), 405, "method_not_allowed"),
        "too many files": (
            lambda: requests.post(
                f"{service_url}/predict_batch", files=[("images", ("c.jpeg", b"x"))] * 65, timeout=30
            ),
            413,
            "too_many_files",
        ),
        "broken multipart": (
            lambda: requests.post(
                f"{service_url}/predict",
                data=b"--xx\r\ngarbage",
                headers={"content-type": "multipart/form-data; boundary=xx"},
                timeout=30,
            ),
            400,
            None,
        ),
    }
    for name, (send, status, code) in requests_.items():
        response = send()
        assert response.status_code == status, f"{name}: {response.status_code} {response.text[:300]}"
        body = response.json()
        assert body["detail"], name
        if code:
            assert body["error"] == code, f"{name}: {body}"

    assert requests.get(f"{service_url}/healthz", timeout=10).status_code == 200
    assert post_image(service_url, jpeg).status_code == 200


# --- hot swap -----------------------------------------------------------------------------------


def register_copy_of_champion(reg: Registry) -> str:
    source = reg.version_by_alias(CHAMPION).source
    return str(mlflow.register_model(source, reg.name, tags={"data_hash": "copy"}).version)


def register_broken_version(reg: Registry, tmp_path: Path) -> str:
    from hematovision.registry.packaging import log_classifier

    champion_dir = (
        Path(mlflow.artifacts.download_artifacts(f"models:/{reg.name}@{CHAMPION}", dst_path=str(tmp_path)))
        / "artifacts"
    )
    broken = tmp_path / "broken"
    shutil.copytree(next(champion_dir.iterdir()), broken)
    (broken / "classifier.keras").write_bytes(b"this is not a keras archive")
    with mlflow.start_run(run_name="broken model (test)"):
        uri = log_classifier(broken)
    return str(mlflow.register_model(uri, reg.name).version)


@pytest.mark.e2e
def test_hot_swap_under_load_promote_refuse_and_rollback(service_url, tmp_path):
    reg = registry()
    before = champion_version()
    copy = register_copy_of_champion(reg)
    broken = register_broken_version(reg, tmp_path)

    stop = threading.Event()
    outcomes: list[tuple[int, str | None]] = []
    data = A_CELL.read_bytes()

    def client() -> None:
        while not stop.is_set():
            response = post_image(service_url, data)
            outcomes.append((response.status_code, response.json().get("model_version")))

    clients = [threading.Thread(target=client) for _ in range(4)]
    for t in clients:
        t.start()
    try:
        time.sleep(1)
        decision = promote(reg, copy, PromoteParams(), force=True)
        assert decision.passed
        wait_for_version(service_url, copy)
        time.sleep(1)  # answers from the new version under load

        reg.client.set_registered_model_alias(reg.name, CHAMPION, broken)  # e.g. a bad artifact upload
        deadline = time.monotonic() + 90
        while broken not in requests.get(f"{service_url}/model", timeout=10).json()["refused"]:
            assert time.monotonic() < deadline, "the broken version was not refused"
            time.sleep(0.5)
        status = requests.get(f"{service_url}/model", timeout=10).json()
        assert status["version"] == copy  # the old one keeps serving
        assert "hematovision_model_refused 1" in requests.get(f"{service_url}/metrics", timeout=10).text

        # Rollback, as a person would (`hematovision rollback`): past the refused version to the one
        # before the copy, leaving the champion history as the next test expects to find it.
        assert reg.rollback()[1] == before
        wait_for_version(service_url, before)
        time.sleep(1)
    finally:
        stop.set()
        for t in clients:
            t.join()

    assert outcomes and all(code == 200 for code, _ in outcomes), [o for o in outcomes if o[0] != 200][:5]
    versions = [v for _, v in outcomes]
    assert copy in versions and before in versions and broken not in versions


@pytest.mark.e2e
def test_unreachable_registry_keeps_the_loaded_model_serving(project, trained):
    from hematovision.serving.predictor import Predictor
    from hematovision.serving.swap import ModelWatcher, RegistrySource

    class FlakyRegistry(RegistrySource):
        down = False

        def resolve(self, alias):
            if self.down:
                raise ConnectionError("registry at mlflow.lab.local:5000 unreachable")
            return super().resolve(alias)

    settings = get_settings()
    source = FlakyRegistry(settings)
    models = ModelWatcher(settings, source=source)
    predictor = Predictor(settings, models, store=PredictionStore(project / "monitoring" / "holder-test.sqlite"))
    assert models.poll() == champion_version()
    source.down = True
    assert models.poll() == champion_version()
    assert "unreachable" in models.status()["last_error"]["message"]
    assert predictor.predict([A_CELL.read_bytes()])[0]["label"] in ANSWERS


def test_a_version_refused_for_a_passing_reason_is_retried_one_that_fails_its_check_is_not(tmp_path):
    """Out of memory while loading passes: the version is tried again after its back-off. A version
    that loads but answers nonsense stays refused. ``/model`` (status) says which is which."""
    from hematovision.serving.swap import ModelWatcher, RegistrySource

    class FakeRegistry(RegistrySource):
        alias_at = "3"

        def resolve(self, alias):
            return self.alias_at

        def describe(self, version):
            return {"version": version}

        def download(self, version, into):
            return f"{into}/v{version}"

    loads: list[str] = []
    out_of_memory = {"3": 2}  # version 3 fails twice for want of memory, then loads

    def load(local: str) -> SimpleNamespace:
        version = local.rsplit("v", 1)[1]
        loads.append(version)
        if out_of_memory.get(version, 0) > 0:
            out_of_memory[version] -= 1
            raise MemoryError("cannot allocate 300 MB")
        return SimpleNamespace(version=version, classes=list(CLASSES))

    def check(classifier) -> None:
        if classifier.version == "4":
            raise ValueError("probabilities do not sum to 1")

    source = FakeRegistry(get_settings())
    models = ModelWatcher(get_settings(), source=source, load=load, retry_seconds=1.0, check=check)
    assert models.poll() is None
    refused = models.status()["refused"]["3"]
    assert refused["passing"] is True and refused["retry_at"] and "MemoryError" in refused["reason"]
    assert models.poll() is None and loads == ["3"]  # within the back-off: not tried again
    time.sleep(1.1)
    assert models.poll() is None and loads == ["3", "3"]  # tried again, failed again: back-off doubled (2 s)
    assert models.status()["refused"]["3"]["attempts"] == 2
    time.sleep(1.0)
    assert models.poll() is None and loads == ["3", "3"]
    time.sleep(1.1)
    assert models.poll() == "3" and "3" not in models.status()["refused"]  # the memory came back

    source.alias_at = "4"
    assert models.poll() == "3"
    refused = models.status()["refused"]["4"]
    assert refused["passing"] is False and refused["retry_at"] is None and "sum to 1" in refused["reason"]
    time.sleep(1.1)
    assert models.poll() == "3" and loads.count("4") == 1  # refused for good: never loaded again
    assert "hematovision_model_refused 1" in models.prometheus()


# --- prediction log retention, CLI, packaging -----------------------------------------------------


def test_images_are_kept_only_with_retention_and_purged_after_it(tmp_path):
    def record() -> PredictionRecord:
        return PredictionRecord("1", "monocyte", 0.9, {"monocyte": 0.9}, False, "ab" * 32, 1.0)

    private = PredictionStore(tmp_path / "private.sqlite")
    private.log(record(), b"image bytes")
    assert not private.images_dir.exists()

    kept = PredictionStore(tmp_path / "kept.sqlite", tmp_path / "images", retain_images=True)
    prediction_id = kept.log(record(), b"image bytes")
    assert Path(kept.get(prediction_id)["image_path"]).read_bytes() == b"image bytes"
    assert kept.purge_images(older_than_days=30) == 0  # still within retention
    assert kept.purge_images(older_than_days=0) == 1
    assert kept.get(prediction_id)["image_path"] is None
    assert kept.get(prediction_id)["label"] == "monocyte"  # the prediction itself stays

    # Only the images of predictions that need review, kept longer than the others.
    review_only = PredictionStore(tmp_path / "review.sqlite", tmp_path / "review-images", retain_review_images=True)
    sure = review_only.log(PredictionRecord("1", "monocyte", 0.99, {"monocyte": 0.99}, False, "cd" * 32, 1.0), b"sure")
    unsure = review_only.log(PredictionRecord("1", "monocyte", 0.4, {"monocyte": 0.4}, True, "ef" * 32, 1.0), b"unsure")
    assert review_only.get(sure)["image_path"] is None and review_only.get(unsure)["image_path"] is not None
    assert [r["id"] for r in review_only.review_queue(exclude=set())] == [unsure]
    assert review_only.review_queue(exclude={unsure}) == []
    assert review_only.purge_images(older_than_days=0, review_older_than_days=30) == 0
    assert review_only.purge_images(older_than_days=0, review_older_than_days=0) == 1


@pytest.mark.e2e
def test_predict_command_writes_csv_for_files_and_folders(project, trained, tmp_path):
    folder = tmp_path / "slides"
    folder.mkdir()
    for path in CELL_IMAGES["monocyte"][:2]:
        shutil.copy(path, folder / path.name)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    out = tmp_path / "out" / "predictions.csv"
    result = CliRunner().invoke(app, ["predict", str(folder), str(CELL_IMAGES["eosinophil"][0]), "--out", str(out)])
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(out)
    assert len(table) == 4
    assert set(table.columns) >= {
        "file",
        "label",
        "confidence",
        "needs_review",
        "cell_in_view",
        "error",
        *(f"p_{c}" for c in CLASSES),
    }
    assert set(table.cell_in_view.dropna()) <= {"whole", "cut", "none"}
    assert table.error.notna().sum() == 1 and "broken.jpg" in table[table.error.notna()].file.iloc[0]
    assert set(table.label.dropna()) <= set(ANSWERS)

    missing = CliRunner().invoke(app, ["predict", str(tmp_path / "nowhere")])
    assert missing.exit_code == 1


@pytest.mark.e2e
def test_bento_builds_with_the_locked_requirements(tmp_path):
    uv = shutil.which("uv")
    assert uv, "uv is needed to export the lock (CI installs it)"
    exported = subprocess.run(
        [uv, "export", "--frozen", "--no-dev", "--no-hashes", "--no-emit-project", "--no-header"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert exported == (REPO / "requirements-serving.txt").read_text(), (
        "requirements-serving.txt is stale: re-run the uv export command in bentofile.yaml"
    )
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml")}
    build = subprocess.run(
        [str(Path(sys.executable).parent / "bentoml"), "build", str(REPO), "--output", "tag"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=env,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    bento = next((tmp_path / "bentoml" / "bentos" / "hematovision").glob("*/bento.yaml"))
    included = {
        p.relative_to(bento.parent / "src").as_posix() for p in (bento.parent / "src").rglob("*") if p.is_file()
    }
    assert "src/hematovision/api/service.py" in included and "src/hematovision/web/docs.html" in included
