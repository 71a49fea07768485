"""The service's routes for engineers: which registered version is the champion.

    POST /models/{version}/promote    engineer    start the promotion gate for ``version`` as a job
                                                  (``force=true`` overrides a refusal, recorded):
                                                  202 with the job's id at once
    GET  /models/jobs/{id}            engineer    the job: queued, running, done (the gate's decision
                                                  and reasons) or failed (the error)
    POST /models/rollback             engineer    move the champion back to the version before it

The gate scores the champion on the validation split, which takes minutes: it runs in a worker
thread (``jobs.py``: one job at a time per serving worker, kept in memory), never on the event
loop that answers /predict and /healthz. Every serving worker follows the alias by itself
(``serving/swap.py``), so these routes only move it in the registry; each outcome, refused and
failed ones included, goes to the audit log.

Who is asking is decided before any body is read; the CSRF token of a browser comes in the
``X-CSRF-Token`` header; promote then reads at most ``lab.max_form_bytes``.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from hematovision import stores
from hematovision.api.auth import authenticated, read_form, require
from hematovision.api.errors import ApiError
from hematovision.api.jobs import Busy, Job, JobFailed, JobTable
from hematovision.params import load_params
from hematovision.registry.registry import RegistryError
from hematovision.settings import Settings, get_settings
from hematovision.training.steps import promote_step

router = APIRouter()
jobs = JobTable()  # this worker's promotion jobs


def _promote(settings: Settings, version: str, force: bool) -> dict:
    """The gate's decision for ``version`` (a job's work, in a worker thread)."""
    try:
        params = load_params(settings.path(Path("params.yaml")), None)
        decision = promote_step(settings, params, version, force)
    except RegistryError as error:
        raise JobFailed(f"version {version}: {error}") from error
    except FileNotFoundError as error:
        raise JobFailed(f"the gate cannot score version {version} on the validation split: {error}") from error
    return {"version": version, "passed": decision.passed, "force": force, "reasons": decision.reasons}


@router.post("/models/{version}/promote", status_code=202)
async def promote(request: Request, version: str) -> JSONResponse:
    """Start the gate for ``version`` (``force=true`` to override a refusal, recorded): 202 with
    the job's id and where to ask (``GET /models/jobs/{id}``); 409 while another job runs."""
    user = await authenticated(request, "engineer")
    settings = get_settings()
    form = await read_form(request, settings.lab.max_form_bytes)
    force = str(form.get("force", "")).lower() in ("1", "true", "yes")
    audit = stores.corrections(settings).audit

    def done(job: Job) -> None:
        action = "promote" if job.result["passed"] else "promote_refused"
        audit(user.username, action, version, {"reasons": job.result["reasons"], "force": force, "job": job.id})

    def failed(job: Job) -> None:
        audit(user.username, "promote_failed", version, {"error": job.error, "force": force, "job": job.id})

    try:
        job = jobs.submit("promote", version, user.username, lambda: _promote(settings, version, force), done, failed)
    except Busy as busy:
        raise ApiError(409, "job_running", str(busy), {"location": f"/models/jobs/{busy.job.id}"}) from None
    url = f"/models/jobs/{job.id}"
    return JSONResponse({"job": job.id, "status": job.status, "url": url}, status_code=202, headers={"location": url})


@router.get("/models/jobs/{job_id}")
def job_status(request: Request, job_id: str) -> dict:
    """A promotion job: status (queued, running, done, failed), the decision when done (``result``:
    passed, reasons), the error when failed."""
    require(request, "engineer")
    job = jobs.get(job_id)
    if job is None:
        raise ApiError(404, "unknown_job", f"no job {job_id!r} in this worker (jobs live in the worker that took them)")
    return job.public()


@router.post("/models/rollback")
def rollback(request: Request) -> dict:
    """Move the champion back to the version before it (no body is read; FastAPI runs this plain
    route in a worker thread)."""
    user = require(request, "engineer")
    settings = get_settings()
    try:
        old, new = stores.registry(settings).rollback()
    except RegistryError as error:
        raise ApiError(409, "cannot_roll_back", str(error)) from None
    stores.corrections(settings).audit(user.username, "rollback", new, {"from": old})
    return {"champion": new, "was": old}
