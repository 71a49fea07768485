"""The BentoML service: the champion over HTTP, hot-swapped when the registry alias moves.

    hematovision serve --port 3000     # = bentoml serve hematovision.api.service:HematoVision

POST /predict (file field ``image``), POST /predict_batch (file fields ``images``), POST /explain
(file field ``image``, or text field ``prediction_id`` for a signed-in pathologist; optional
``class_name``) -> PNG, GET /model, /healthz, /readyz (503 until a checked model is loaded), /metrics
(BentoML's Prometheus metrics, labelled by route template, plus the served version), the web page at /ui/ (``/`` leads there) and the
OpenAPI docs at /docs (spec at /docs.json).

Only web glue lives here. Each worker composes its own serving parts: a
:class:`~hematovision.serving.swap.ModelWatcher` that follows the registry alias and a
:class:`~hematovision.serving.predictor.Predictor` that answers with its model through the adaptive
batcher. In front of them sit the request guard (``guard.py``), the one error shape
(``errors.py``) and who is asking (``auth.py``); the routes for people are ``account_routes``
(sign-in), ``review_routes`` (pathologists), ``model_routes`` (engineers: promote, roll back) and
``ops_routes`` (drift, alerts).
"""

from __future__ import annotations

from pathlib import Path

from hematovision.settings import get_settings, quiet_environment

quiet_environment()  # telemetry off and Keras' home set before any tool is imported

import bentoml  # noqa: E402 - telemetry must be off before bentoml is imported
from bentoml._internal.server.http import instruments  # noqa: E402 - quiet_environment() first
from bentoml.exceptions import ServiceUnavailable  # noqa: E402 - quiet_environment() first
from fastapi import FastAPI, Request  # noqa: E402 - quiet_environment() first
from starlette.concurrency import run_in_threadpool  # noqa: E402 - quiet_environment() first
from starlette.responses import RedirectResponse, Response  # noqa: E402 - quiet_environment() first
from starlette.staticfiles import StaticFiles  # noqa: E402 - quiet_environment() first

from hematovision import stores  # noqa: E402 - quiet_environment() first
from hematovision.api import account_routes, errors, model_routes, ops_routes, review_routes  # noqa: E402 - quiet_environment() first
from hematovision.api.auth import may_predict, require  # noqa: E402 - quiet_environment() first
from hematovision.api.guard import RequestGuard, Upload, templated_metrics  # noqa: E402 - quiet_environment() first
from hematovision.serving.batcher import share_cores_between_model_calls  # noqa: E402 - quiet_environment() first
from hematovision.serving.images import ImageRejected  # noqa: E402 - quiet_environment() first
from hematovision.serving.predictor import NotReady, Predictor  # noqa: E402 - quiet_environment() first
from hematovision.serving.retention import RetentionScheduler  # noqa: E402 - quiet_environment() first
from hematovision.serving.swap import ModelWatcher  # noqa: E402 - quiet_environment() first

MAX_BATCH_FILES = 64
# BentoML (1.4) labels its HTTP metrics with the raw request path, read by a middleware outside any a
# service can add; the service's app factory looks the class up when it builds the app, after this
# module is imported, so the subclass that labels by route template takes its place (guard.py).
if not getattr(instruments.RunnerTrafficMetricsMiddleware, "templated", False):
    instruments.RunnerTrafficMetricsMiddleware = templated_metrics(instruments.RunnerTrafficMetricsMiddleware)
WEB_DIR = Path(__file__).parents[1] / "web"
app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)  # routes BentoML does not make itself
app.mount("/ui", StaticFiles(directory=WEB_DIR, html=True), name="ui")
for routes in (account_routes, review_routes, model_routes, ops_routes):
    app.include_router(routes.router)
errors.install(app)
_models: ModelWatcher | None = None  # this worker's (one service instance per worker process)


# threads: BentoML runs sync APIs on a pool of one thread by default, which would serialise requests
# and leave the adaptive batcher nothing to batch.
@bentoml.service(name="hematovision", workers=1, threads=get_settings().serving.threads, traffic={"timeout": 120})
@bentoml.asgi_app(app, path="/")
class HematoVision:
    def __init__(self) -> None:
        global _models
        settings = get_settings()
        share_cores_between_model_calls(settings.serving.model_calls)
        self.models = _models = ModelWatcher(settings).start()  # loads in the background
        self.predictor = Predictor(settings, self.models)
        # Retention without a person: every purge_interval_minutes (0: off), in this worker.
        self.retention = RetentionScheduler(settings).start()

    def __is_ready__(self) -> bool:
        return self.models.ready

    def __is_alive__(self) -> bool:
        return self.models.watching

    def __metrics__(self, content: str) -> str:
        return content + self.models.prometheus() + self.retention.prometheus()

    @bentoml.api(route="/predict")
    def predict(self, image: Path) -> dict:
        """One JPEG/PNG/TIFF/BMP image: label, confidence, probabilities, model_version,
        prediction_id, needs_review, cell_in_view (whole / cut / none)."""
        try:
            return self.predictor.predict([image.read_bytes()])[0]
        except (ImageRejected, NotReady) as error:
            return errors.from_serving(error).response()

    @bentoml.api(route="/predict_batch")
    def predict_batch(self, images: list[Path]) -> list[dict]:
        """One result per image, in order; a bad image gets ``{"error", "detail"}`` in its place.
        Concurrent requests share model calls (adaptive batching in ``serving.batcher``)."""
        try:
            return self.predictor.predict([p.read_bytes() for p in images], errors="return")
        except ImageRejected as error:  # the request as a whole (too many pixels together)
            return errors.from_serving(error).response()
        except NotReady as error:
            raise ServiceUnavailable(str(error)) from error

    @app.post("/explain", response_class=Response)
    async def explain(self, request: Request) -> Response:
        """Grad-CAM heat-map of the white cell, overlaid on the whole image (PNG). Send the image
        (field ``image``), or, signed in as a pathologist, the ``prediction_id`` of a prediction
        whose image was retained; ``class_name`` explains that class instead of the predicted one.
        The label, confidence and model version are in the ``x-hematovision-*`` headers."""
        return await explain_response(request, self.predictor)

    @app.get("/model")
    def model(self) -> dict:
        """The served version, its registry metrics and tags, data hash, loaded_at, refused versions."""
        return self.models.status()


async def explain_response(request: Request, predictor: Predictor) -> Response:
    """``POST /explain``: an uploaded image is explained as openly as ``/predict`` answers; a
    retained image (by ``prediction_id``) is patient material and the overlay shows all of it, so
    only a signed-in pathologist gets it, and each one is recorded in the audit log."""
    form = await request.form()
    try:
        upload = form.get("image")
        data = await upload.read() if upload is not None and hasattr(upload, "read") else None
        fields = {key: value for key, value in form.multi_items() if isinstance(value, str)}
    finally:
        await form.close()
    prediction_id, class_name = fields.get("prediction_id"), fields.get("class_name")
    try:
        user = None if data is not None else await run_in_threadpool(require, request, "pathologist", form=fields)
        result = await run_in_threadpool(predictor.explain, data, prediction_id, class_name)
        if user is not None:
            await run_in_threadpool(
                stores.corrections(get_settings()).audit,
                user.username,
                "view_explanation",
                str(prediction_id),
                {"class_name": result["explained_class"]},
            )
    except errors.ApiError as error:
        return error.response()
    except (ImageRejected, NotReady) as error:
        return errors.from_serving(error).response()
    return Response(
        result["png"],
        media_type="image/png",
        headers={
            "x-hematovision-label": result["label"],
            "x-hematovision-class": result["explained_class"],
            "x-hematovision-confidence": f"{result['confidence']:.4f}",
            "x-hematovision-model-version": str(result["model_version"]),
            "cache-control": "no-store",
        },
    )


class FrontDoor:
    """``/`` leads people to the web page, ``/docs`` to the API docs (BentoML's own page at ``/``
    would load a Google tag manager script; ours uses the same bundled Swagger UI without it)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["method"] in ("GET", "HEAD") and scope["path"] in ("/", "/docs"):
            target = "/ui/" if scope["path"] == "/" else "/ui/docs.html"
            return await RedirectResponse(target, status_code=307)(scope, receive, send)
        return await self.app(scope, receive, send)


HematoVision.add_asgi_middleware(FrontDoor)
HematoVision.add_asgi_middleware(
    RequestGuard,
    routes={
        "/predict": Upload("image"),
        "/predict_batch": Upload("images", MAX_BATCH_FILES),
        "/explain": Upload("image", required=False),
        "/feedback": Upload("image", required=False, public=False),
    },  # review_routes checks the role
    max_bytes=get_settings().serving.max_request_bytes,
    ready=lambda: _models is not None and _models.ready,
    authorize=may_predict,
)
