"""The service's one error shape, built in one place.

Every refusal answers ``{"error": code, "detail": message}`` with the code repeated in the
``x-hematovision-error`` header; the header tells the request guard (``guard.py``) that the answer
is already shaped, so it passes untouched. Routes raise :class:`ApiError` (the handler that
:func:`install` adds turns it into the response); the serving layer's domain errors, a refused
image or no model yet, become one through :func:`from_serving`, which is where their HTTP
statuses are decided.
"""

from __future__ import annotations

import json

from fastapi import FastAPI, Request
from starlette.responses import Response

from hematovision.serving.images import ImageRejected
from hematovision.serving.predictor import NotReady

ERROR_HEADER = "x-hematovision-error"
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


def from_serving(error: ImageRejected | NotReady) -> ApiError:
    """A serving error as the HTTP refusal it means: an image's code decides 4xx, no model is 503."""
    if isinstance(error, NotReady):
        return ApiError(503, error.code, str(error))
    return ApiError(IMAGE_STATUS.get(error.code, 422), error.code, error.message)


def install(app: FastAPI) -> None:
    """Answer every :class:`ApiError` a route of ``app`` raises in the error shape."""

    async def refused(_request: Request, error: ApiError) -> Response:
        return error.response()

    app.add_exception_handler(ApiError, refused)
