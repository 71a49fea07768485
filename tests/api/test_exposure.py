"""What the service must not give away, checked without a trained model: kept patient images only to
pathologists (``/explain`` by prediction id), no record ids or unbounded labels on ``/metrics``,
bounded memory per request, patient images without metadata or caching, safe CSV exports, and
corrections that are images."""

from __future__ import annotations

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient
from typer.testing import CliRunner

from hematovision import stores
from hematovision.api import service
from hematovision.api.guard import UNMATCHED, templated_metrics
from hematovision.cli import app as cli
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
