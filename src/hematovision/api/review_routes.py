"""The service's routes for pathologists: the review queue, corrections, and what the lab learns.

    GET  /review/queue                 pathologist             predictions awaiting review, least certain first
    GET  /review/image/{id}            pathologist             a kept request image (metadata stripped)
    POST /feedback                     pathologist             confirm or correct a prediction
    GET  /feedback/stats               pathologist, engineer,  agreement between the model and reviewers
                                       ops, admin
    GET  /feedback/export.csv          (the same)              every review as CSV
    GET  /feedback/report.pdf          (the same)              the reviewed results as a PDF report
    GET  /audit                        admin, engineer         the audit log, newest first

Predictions come from the prediction log, corrections and the audit log from the lab database
(both through ``stores``); who may do what is ``auth.require``. Every download of patient data or a
report about it (an image, the CSV, the PDF) is recorded in the audit log and sent ``no-store``.
"""

from __future__ import annotations

import csv
import io

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from hematovision import stores
from hematovision.api.auth import authenticated, read_form, require
from hematovision.api.errors import ApiError, from_serving
from hematovision.lab.corrections import CorrectionError
from hematovision.lab.report import report_pdf
from hematovision.model.open_set import UNKNOWN
from hematovision.serving.images import ImageRejected, prepare_image, strip_metadata
from hematovision.settings import get_settings

READERS = ("pathologist", "engineer", "ops", "admin")
# Patient data and reports about it: never stored by a browser or a proxy, never sniffed.
PATIENT_DATA_HEADERS = {"cache-control": "no-store", "x-content-type-options": "nosniff"}
CSV_COLUMNS = [
    "created_at",
    "reviewer",
    "prediction_id",
    "model_version",
    "predicted_class",
    "true_class",
    "confirmed",
    "image_sha256",
    "comment",
]
# A cell starting with one of these is a formula to a spreadsheet (OWASP: CSV injection).
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
router = APIRouter()


@router.get("/review/queue")
def review_queue(
    request: Request,
    limit: int = 50,
    label: str | None = None,
    model_version: str | None = None,
    since: str | None = None,
    until: str | None = None,
) -> dict:
    """Predictions awaiting review, those answered ``unknown`` first, then the least certain
    (filters: predicted label, ``unknown`` included, model version, ISO time range). ``classes`` is what a reviewer may answer: the
    model's classes and the laboratory's vocabulary (``stores.answerable_types``), the list the
    review page makes its answer buttons from. An item the model answered ``unknown`` (beyond its
    open-set threshold) says so; its probabilities still say what it resembles."""
    require(request, "pathologist")
    settings = get_settings()
    corrections = stores.corrections(settings)
    items = stores.prediction_log(settings).review_queue(
        corrections.reviewed_prediction_ids(),
        max(1, min(limit, 500)),
        label.strip().lower() if label else None,  # the log stores labels in lower case
        model_version,
        since,
        until,
    )
    return {
        "items": [
            {**item, "unknown": item["label"] == UNKNOWN, "image_url": f"/review/image/{item['id']}"} for item in items
        ],
        "classes": list(stores.answerable_types(settings)),
    }


@router.get("/review/image/{prediction_id}")
def review_image(request: Request, prediction_id: str) -> Response:
    """A kept request image: its pixels without the file's metadata (``strip_metadata``), never
    cached, each download in the audit log."""
    user = require(request, "pathologist")
    settings = get_settings()
    log = stores.prediction_log(settings)
    record = log.get(prediction_id)
    # The log's image store, not a path: in lab mode the image may have been kept by another replica.
    kept = None if record is None else log.image(record["image_sha256"])
    if kept is None:  # never kept, or purged (perhaps since the row was read)
        raise ApiError(404, "image_not_retained", "no kept image for this prediction")
    try:
        image, media_type = strip_metadata(kept)
    except (OSError, ValueError) as error:  # unreadable: nothing to show
        raise ApiError(404, "image_not_retained", f"the kept image cannot be read ({type(error).__name__})") from None
    stores.corrections(settings).audit(user.username, "download_image", prediction_id, {"bytes": len(image)})
    return Response(image, media_type=media_type, headers=PATIENT_DATA_HEADERS)


@router.post("/feedback", status_code=201)
async def feedback(request: Request) -> dict:
    """Confirm or correct a prediction: ``prediction_id`` (its kept image is used) and/or the
    ``image`` itself, ``true_class``, optional ``comment``. Written durably before the answer."""
    # Who asks first (CSRF token from the X-CSRF-Token header, as the pages send it), the body after:
    # an anonymous or wrong-role caller never has an upload read.
    user = await authenticated(request, "pathologist")
    form = await read_form(request)
    settings = get_settings()
    prediction, image = None, form.get("image")
    if form.get("prediction_id"):
        log = stores.prediction_log(settings)
        prediction = log.get(str(form["prediction_id"]))
        if prediction is None:
            raise ApiError(404, "unknown_prediction", f"no prediction {form['prediction_id']!r}")
        if not image:
            image = log.image(prediction["image_sha256"])  # from whichever replica kept it
            if image is None:  # never kept, or purged by a retention pass since the row was read
                raise ApiError(
                    409, "image_not_retained", "this prediction's image was not kept or was purged; send it as 'image'"
                )
    if not isinstance(image, (bytes, bytearray)) or not image:
        raise ApiError(400, "missing_image", "send 'prediction_id' of a kept prediction or the 'image' file")
    try:  # the guard predictions pass: a file that is no image would break the export and retraining
        await run_in_threadpool(prepare_image, bytes(image))
    except ImageRejected as error:
        raise from_serving(error) from None
    try:
        return await run_in_threadpool(
            stores.corrections(settings).submit,
            user.username,
            str(form.get("true_class", "")),
            bytes(image),
            prediction,
            str(form.get("comment", "")),
        )
    except CorrectionError as error:
        raise ApiError(422, "bad_correction", str(error)) from None


@router.get("/feedback/stats")
def feedback_stats(request: Request) -> dict:
    """Agreement between the model and reviewers: overall, per class, per model version, per day;
    predicted-vs-corrected confusion; images reviewers disagree on."""
    require(request, *READERS)
    return stores.corrections(get_settings()).stats()


@router.get("/feedback/export.csv")
def feedback_csv(request: Request) -> Response:
    """Every review as CSV; text that a spreadsheet would run as a formula is neutralised."""
    user = require(request, *READERS)
    corrections = stores.corrections(get_settings())
    rows = corrections.all()
    corrections.audit(user.username, "download_csv", "feedback/export.csv", {"rows": len(rows)})
    return Response(
        reviews_csv(rows),
        media_type="text/csv",
        headers={**PATIENT_DATA_HEADERS, "content-disposition": 'attachment; filename="hematovision-reviews.csv"'},
    )


def reviews_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        confirmed = row["predicted_class"] == row["true_class"] if row["predicted_class"] else ""
        writer.writerow({key: spreadsheet_safe(value) for key, value in {**row, "confirmed": confirmed}.items()})
    return buffer.getvalue()


def spreadsheet_safe(value):
    """A text cell a spreadsheet shows as text: one that would start a formula (``=``, ``+``,
    ``-``, ``@``, tab, carriage return) gets a leading single quote (OWASP's CSV injection advice)."""
    if isinstance(value, str) and value.startswith(_FORMULA_START):
        return "'" + value
    return value


@router.get("/feedback/report.pdf")
def feedback_pdf(request: Request) -> Response:
    """The reviewed results as a PDF report (agreement, confusion, disputed images)."""
    user = require(request, *READERS)
    corrections = stores.corrections(get_settings())
    pdf = report_pdf(corrections.stats())
    corrections.audit(user.username, "download_report", "feedback/report.pdf", {"bytes": len(pdf)})
    return Response(
        pdf,
        media_type="application/pdf",
        headers={**PATIENT_DATA_HEADERS, "content-disposition": 'attachment; filename="hematovision-reviews.pdf"'},
    )


@router.get("/audit")
def audit(request: Request, limit: int = 200) -> dict:
    require(request, "admin", "engineer")
    return {"entries": stores.corrections(get_settings()).audit_log(max(1, min(limit, 5000)))}
