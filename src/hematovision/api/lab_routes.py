"""The service's routes for people: sign-in, the review queue, corrections, what the lab learns,
and promotion/rollback for engineers.

Who may do what is decided here, on every request: a browser proves itself with the session
cookie (HttpOnly, SameSite=Strict) *and*, for anything that changes state, the session's CSRF
token in the ``X-CSRF-Token`` header (or a ``csrf_token`` form field); a system sends
``Authorization: Bearer <token>`` (``hematovision users token``). Sign-in failures are limited per
user and address. Errors use the service's one shape ``{"error": code, "detail": message}``.
"""

from __future__ import annotations

import csv
import hmac
import io
import threading
import time
from collections import defaultdict, deque
from functools import lru_cache
from pathlib import Path

from fastapi import APIRouter, FastAPI, Request
from starlette.responses import JSONResponse, Response

from hematovision.lab.accounts import Accounts, Session, User
from hematovision.lab.corrections import CorrectionError, Corrections
from hematovision.serving.prediction_log import PredictionStore, default_store
from hematovision.settings import get_settings

COOKIE = "hv_session"
router = APIRouter()


class Refused(Exception):
    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}


def install(app: FastAPI) -> None:
    app.include_router(router)

    @app.exception_handler(Refused)
    async def refused(_request: Request, error: Refused) -> JSONResponse:
        return JSONResponse({"error": error.code, "detail": error.detail}, status_code=error.status,
                            headers={"x-hematovision-error": error.code, **error.headers})


@lru_cache
def accounts() -> Accounts:
    settings = get_settings()
    return Accounts(settings.path(settings.lab_db), settings.session_hours)


@lru_cache
def corrections() -> Corrections:
    settings = get_settings()
    return Corrections(settings.path(settings.lab_db), settings.path(settings.corrections_images_dir))


def predictions() -> PredictionStore:
    return default_store(get_settings())


# --- who is asking --------------------------------------------------------------------------------

def identify(request: Request) -> tuple[User | None, Session | None]:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return accounts().token_user(header[7:].strip()), None
    session = accounts().session(request.cookies.get(COOKIE))
    return (session.user if session else None), session


def may_predict(scope: dict) -> bool:
    """Whether a prediction request may be answered: anyone, unless ``predict_requires_token``
    is set; then a signed-in user or a valid API token, whatever the role."""
    if not get_settings().predict_requires_token:
        return True
    return identify(Request(scope))[0] is not None


def require(request: Request, *roles: str, form: dict | None = None) -> User:
    """The caller, if signed in with one of ``roles``; state-changing browser requests must also
    carry the session's CSRF token (a token-authenticated system has no cookie to be tricked with)."""
    user, session = identify(request)
    if user is None:
        raise Refused(401, "unauthorized", "sign in (POST /login) or send 'Authorization: Bearer <token>'")
    if roles and not any(user.has(r) for r in roles):
        raise Refused(403, "forbidden", f"{user.username} lacks the role {' or '.join(roles)}")
    if session is not None and request.method not in ("GET", "HEAD"):
        sent = request.headers.get("x-csrf-token") or (form or {}).get("csrf_token") or ""
        if not hmac.compare_digest(str(sent), session.csrf_token):
            raise Refused(403, "csrf", "missing or wrong CSRF token (header X-CSRF-Token)")
    return user


class LoginLimiter:
    """At most ``attempts`` failed sign-ins per (username, address) within ``window`` seconds."""

    def __init__(self, attempts: int, window: float) -> None:
        self.attempts, self.window = attempts, window
        self._failures: dict[tuple[str, str], deque] = defaultdict(deque)
        self._lock = threading.Lock()

    def retry_after(self, key: tuple[str, str]) -> float:
        with self._lock:
            failures = self._failures[key]
            while failures and failures[0] < time.monotonic() - self.window:
                failures.popleft()
            return 0.0 if len(failures) < self.attempts else failures[0] + self.window - time.monotonic()

    def failed(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures[key].append(time.monotonic())

    def succeeded(self, key: tuple[str, str]) -> None:
        with self._lock:
            self._failures.pop(key, None)


_limiter = LoginLimiter(get_settings().login_attempts, get_settings().login_window_seconds)


async def _form(request: Request) -> dict:
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise Refused(400, "bad_request", "body is not valid JSON") from None
        return body if isinstance(body, dict) else {}
    form = await request.form()
    out = {}
    for key, value in form.multi_items():
        out[key] = await value.read() if hasattr(value, "read") else value
    await form.close()
    return out


# --- signing in -------------------------------------------------------------------------------------

@router.post("/login")
async def login(request: Request) -> JSONResponse:
    """Sign in with ``username`` and ``password`` (form or JSON): sets the session cookie and
    returns the CSRF token the page must echo."""
    form = await _form(request)
    username, password = str(form.get("username", "")).strip().lower(), str(form.get("password", ""))
    key = (username, request.client.host if request.client else "")
    wait = _limiter.retry_after(key)
    if wait > 0:
        raise Refused(429, "too_many_attempts", f"too many failed sign-ins; try again in {wait:.0f} s",
                      {"retry-after": str(int(wait) + 1)})
    user = accounts().authenticate(username, password) if username and password else None
    if user is None:
        _limiter.failed(key)
        raise Refused(401, "bad_credentials", "unknown user, wrong password or disabled account")
    _limiter.succeeded(key)
    secret, session = accounts().start_session(user)
    corrections().audit(user.username, "login")
    response = JSONResponse({"username": user.username, "roles": sorted(user.roles), "csrf_token": session.csrf_token})
    response.set_cookie(COOKIE, secret, httponly=True, samesite="strict", secure=request.url.scheme == "https",
                        max_age=int(get_settings().session_hours * 3600), path="/")
    return response


@router.post("/logout")
async def logout(request: Request) -> JSONResponse:
    user = require(request, form=await _form(request))
    accounts().end_session(request.cookies.get(COOKIE))
    corrections().audit(user.username, "logout")
    response = JSONResponse({"signed_out": user.username})
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/me")
def me(request: Request) -> dict:
    """The signed-in user, roles and CSRF token (401 when not signed in)."""
    user, session = identify(request)
    if user is None:
        raise Refused(401, "unauthorized", "not signed in")
    return {"username": user.username, "roles": sorted(user.roles), "csrf_token": session.csrf_token if session else None}


# --- review -----------------------------------------------------------------------------------------

@router.get("/review/queue")
def review_queue(request: Request, limit: int = 50, label: str | None = None, model_version: str | None = None,
                 since: str | None = None, until: str | None = None) -> dict:
    """Predictions awaiting review, least certain first (filters: predicted label, model version,
    ISO time range)."""
    require(request, "pathologist")
    items = predictions().review_queue(corrections().reviewed_prediction_ids(), max(1, min(limit, 500)),
                                       label, model_version, since, until)
    return {"items": [{**item, "image_url": f"/review/image/{item['id']}"} for item in items],
            "classes": list(corrections().classes)}


@router.get("/review/image/{prediction_id}")
def review_image(request: Request, prediction_id: str) -> Response:
    require(request, "pathologist")
    record = predictions().get(prediction_id)
    if record is None or record["image_path"] is None:
        raise Refused(404, "image_not_retained", "no kept image for this prediction")
    return Response(Path(record["image_path"]).read_bytes(), media_type="application/octet-stream",
                    headers={"cache-control": "private, max-age=3600", "x-content-type-options": "nosniff"})


@router.post("/feedback", status_code=201)
async def feedback(request: Request) -> dict:
    """Confirm or correct a prediction: ``prediction_id`` (its kept image is used) and/or the
    ``image`` itself, ``true_class``, optional ``comment``. Written durably before the answer."""
    form = await _form(request)
    user = require(request, "pathologist", form=form)
    prediction, image = None, form.get("image")
    if form.get("prediction_id"):
        prediction = predictions().get(str(form["prediction_id"]))
        if prediction is None:
            raise Refused(404, "unknown_prediction", f"no prediction {form['prediction_id']!r}")
        if not image:
            if prediction["image_path"] is None:
                raise Refused(409, "image_not_retained", "this prediction's image was not kept; send it as 'image'")
            image = Path(prediction["image_path"]).read_bytes()
    if not isinstance(image, (bytes, bytearray)) or not image:
        raise Refused(400, "missing_image", "send 'prediction_id' of a kept prediction or the 'image' file")
    try:
        return corrections().submit(user.username, str(form.get("true_class", "")), bytes(image), prediction,
                                    str(form.get("comment", "")))
    except CorrectionError as error:
        raise Refused(422, "bad_correction", str(error)) from None


@router.get("/feedback/stats")
def feedback_stats(request: Request) -> dict:
    """Agreement between the model and reviewers: overall, per class, per model version, per day;
    predicted-vs-corrected confusion; images reviewers disagree on."""
    require(request, "pathologist", "engineer", "ops", "admin")
    return corrections().stats()


@router.get("/feedback/export.csv")
def feedback_csv(request: Request) -> Response:
    require(request, "pathologist", "engineer", "ops", "admin")
    buffer = io.StringIO()
    columns = ["created_at", "reviewer", "prediction_id", "model_version", "predicted_class", "true_class",
               "confirmed", "image_sha256", "comment"]
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore")
    writer.writeheader()
    for row in corrections().all():
        writer.writerow({**row, "confirmed": row["predicted_class"] == row["true_class"] if row["predicted_class"] else ""})
    return Response(buffer.getvalue(), media_type="text/csv",
                    headers={"content-disposition": 'attachment; filename="hematovision-reviews.csv"'})


@router.get("/feedback/report.pdf")
def feedback_pdf(request: Request) -> Response:
    """The reviewed results as a PDF report (agreement, confusion, disputed images)."""
    require(request, "pathologist", "engineer", "ops", "admin")
    from hematovision.lab.report import report_pdf

    return Response(report_pdf(corrections().stats()), media_type="application/pdf",
                    headers={"content-disposition": 'attachment; filename="hematovision-reviews.pdf"'})


@router.get("/audit")
def audit(request: Request, limit: int = 200) -> dict:
    require(request, "admin", "engineer")
    return {"entries": corrections().audit_log(max(1, min(limit, 5000)))}


# --- model lifecycle for engineers ---------------------------------------------------------------

@router.post("/models/{version}/promote")
async def promote(request: Request, version: str) -> dict:
    """Make ``version`` the champion through the gate (``force=true`` to override, recorded)."""
    form = await _form(request)
    user = require(request, "engineer", form=form)
    from hematovision.params import load_params
    from hematovision.training.steps import promote_step
    from hematovision.registry.registry import RegistryError

    settings = get_settings()
    force = str(form.get("force", "")).lower() in ("1", "true", "yes")
    try:
        decision = promote_step(settings, load_params(settings.path(Path("params.yaml")), None), version, force)
    except RegistryError as error:
        raise Refused(404, "unknown_version", str(error)) from None
    corrections().audit(user.username, "promote" if decision.passed else "promote_refused", version,
                        {"reasons": decision.reasons, "force": force})
    if not decision.passed:
        raise Refused(409, "gate_refused", "; ".join(decision.reasons))
    return {"champion": version, "reasons": decision.reasons}


@router.post("/models/rollback")
async def rollback(request: Request) -> dict:
    user = require(request, "engineer", form=await _form(request))
    from hematovision.registry.registry import Registry, RegistryError
    from hematovision.registry.tracking import configure_mlflow

    settings = get_settings()
    try:
        old, new = Registry(settings.registered_model, configure_mlflow(settings)).rollback()
    except RegistryError as error:
        raise Refused(409, "cannot_roll_back", str(error)) from None
    corrections().audit(user.username, "rollback", new, {"from": old})
    return {"champion": new, "was": old}
