"""The service's routes for operations: drift status, alerts, approval of retraining, reports.

    GET  /ops/status                 ops, engineer, admin   drifting or not, since when, signals, model
                                                            version, corrections, latest alerts, reports
    GET  /ops/alerts                 ops, engineer, admin   alerts, newest first
    POST /ops/alerts/{id}/approve    engineer               go-ahead for retraining (retrain_trigger=approval)
    GET  /ops/reports/{name}         ops, engineer, admin   a window's saved Evidently report (HTML)

The page for people is ``/ui/ops.html``. The data comes from the monitoring state
(``stores.monitor_state``), written by the monitoring flow; nothing here talks to MLflow. Who may
do what is ``auth.require`` (session cookie + CSRF token in the ``X-CSRF-Token`` header, or a
bearer token), decided before any body is read.
"""

from __future__ import annotations

import re

from fastapi import APIRouter, Request
from starlette.responses import FileResponse, RedirectResponse

from hematovision import stores
from hematovision.api.auth import require
from hematovision.api.errors import ApiError
from hematovision.monitoring.monitor import ops_status
from hematovision.settings import get_settings

READERS = ("ops", "engineer", "admin")
# Report names are made by monitoring.check_windows; anything else is refused before any path is built.
REPORT_NAME = re.compile(r"^window-\d{6,12}\.html$")
router = APIRouter()


@router.get("/ops")
def ops_page() -> RedirectResponse:
    return RedirectResponse("/ui/ops.html", status_code=307)


@router.get("/ops/status")
def status(request: Request) -> dict:
    """Drift status of the champion's predictions, corrections, latest alerts and report links."""
    require(request, *READERS)
    return ops_status(get_settings())


@router.get("/ops/alerts")
def alerts(request: Request, limit: int = 50) -> dict:
    require(request, *READERS)
    return {"alerts": stores.monitor_state(get_settings()).alerts(max(1, min(limit, 1000)))}


@router.post("/ops/alerts/{alert_id}/approve")
def approve(request: Request, alert_id: int) -> dict:
    """An engineer approves the retraining an alert asks for; the next monitoring run starts it.
    Who is asking is decided (CSRF token in ``X-CSRF-Token``) without reading any body: the route
    takes none (and, a plain route, FastAPI runs it in a worker thread, off the event loop)."""
    user = require(request, "engineer")
    settings = get_settings()
    try:
        alert = stores.monitor_state(settings).approve(alert_id, user.username)
    except KeyError:
        raise ApiError(404, "unknown_alert", f"no alert {alert_id}") from None
    except ValueError as error:
        raise ApiError(409, "not_awaiting_approval", str(error)) from None
    stores.corrections(settings).audit(user.username, "approve_retraining", str(alert_id), {"kind": alert["kind"]})
    return {"alert": alert, "next": "the next monitoring run (hematovision monitor run) starts the retraining"}


@router.get("/ops/reports/{name}")
def report(request: Request, name: str) -> FileResponse:
    """A saved Evidently report. Served sandboxed (its scripts run in an opaque origin, so they
    cannot read the session or call the API) and only by an exact file name in the reports folder."""
    require(request, *READERS)
    if not REPORT_NAME.fullmatch(name):
        raise ApiError(404, "unknown_report", "no such report")
    settings = get_settings()
    folder = settings.path(settings.monitoring.reports_dir).resolve()
    path = (folder / name).resolve()
    if path.parent != folder or not path.is_file():
        raise ApiError(404, "unknown_report", "no such report")
    return FileResponse(
        path,
        media_type="text/html; charset=utf-8",
        headers={
            "content-security-policy": "sandbox allow-scripts",
            "x-content-type-options": "nosniff",
            "cache-control": "private, max-age=300",
        },
    )
