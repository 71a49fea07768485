"""The service's one error shape, built in one place.

Every refusal answers ``{"error": code, "detail": message}`` with the code repeated in the
``x-hematovision-error`` header; the header tells the request guard (``guard.py``) that the answer
is already shaped, so it passes untouched. Routes raise :class:`ApiError` (the handler that
:func:`install` adds turns it into the response); the serving layer's domain errors, a refused
image or no model yet, become one through :func:`from_serving`, which is where their HTTP
statuses are decided. A database that cannot be reached (lab mode's PostgreSQL down) is a 503
``database_unavailable`` wherever a route meets it: the handler :func:`install` adds answers it, and
the routes that shape their own answers pass it through :func:`from_serving`.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from starlette.responses import Response

from hematovision.database import DatabaseUnavailable
from hematovision.serving.images import ImageRejected
from hematovision.serving.predictor import NotReady

logger = logging.getLogger("hematovision.api")
ERROR_HEADER = "x-hematovision-error"
DATABASE_RETRY_SECONDS = 5  # Retry-After while the database is down: a restart or failover takes seconds
# HTTP status per ImageRejected code; codes not listed are 422 (well-formed request, unusable image).
IMAGE_STATUS = {
    "too_large": 413,
    "decompression_bomb": 413,
    "too_many_pixels": 413,
    "unsupported_format": 415,
    "missing_image": 400,
    "unknown_prediction": 404,
    "image_not_retained": 404,
}


class ApiError(Exception):
    """A refusal: HTTP ``status``, a stable ``code``, a ``detail`` for people, extra ``headers``."""

    def __init__(self, status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.code, self.detail, self.headers = status, code, detail, headers or {}

    def response(self) -> Response:
        return error_response(self.status, self.code, self.detail, self.headers)


def error_body(code: str, detail: str) -> bytes:
    return json.dumps({"error": code, "detail": detail}).encode()


def error_response(status: int, code: str, detail: str, headers: dict[str, str] | None = None) -> Response:
    """The error shape as a response, marked with the ``x-hematovision-error`` header."""
    return Response(
        error_body(code, detail),
        status_code=status,
        media_type="application/json",
        headers={ERROR_HEADER: code, **(headers or {})},
    )


def from_serving(error: ImageRejected | NotReady | DatabaseUnavailable) -> ApiError:
    """A serving error as the HTTP refusal it means: an image's code decides 4xx, no model or no
    database is 503."""
    if isinstance(error, DatabaseUnavailable):
        logger.error("answering 503: %s", error)  # the server's address stays in the log, not the answer
        return ApiError(
            503,
            "database_unavailable",
            "the laboratory database cannot be reached right now; nothing was saved, try again shortly",
            {"retry-after": str(DATABASE_RETRY_SECONDS)},
        )
    if isinstance(error, NotReady):
        return ApiError(503, error.code, str(error))
    return ApiError(IMAGE_STATUS.get(error.code, 422), error.code, error.message)


def install(app: FastAPI) -> None:
    """Answer every :class:`ApiError` a route of ``app`` raises in the error shape, and a database
    that cannot be reached as a 503."""

    async def refused(_request: Request, error: ApiError) -> Response:
        return error.response()

    async def database_unavailable(_request: Request, error: DatabaseUnavailable) -> Response:
        return from_serving(error).response()

    app.add_exception_handler(ApiError, refused)
    app.add_exception_handler(DatabaseUnavailable, database_unavailable)
