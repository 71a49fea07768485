"""HTTP hygiene in front of the prediction service, as a plain ASGI middleware.

BentoML parses a request before the service's code runs, and its own answers to malformed
requests are not in the service's error format: a pydantic dump for a missing field, a 500 for a
text field where a file was expected (which it would even try to download as a URL), a plain-text
503. This middleware therefore

* checks every upload route before BentoML sees the request: method, multipart content type,
  body size (counted while reading, so a chunked upload cannot get around it), and that the
  expected field holds file uploads, not text; and
* rewrites any other error response (4xx or 5xx, from any route) into the one error shape of
  ``errors.py`` (5xx details stay in the server log).

Responses the service already shaped carry the ``x-hematovision-error`` header and pass untouched.

Also here: :func:`templated_metrics`, which makes BentoML's HTTP traffic metrics label a request by
its route template (``/review/image/{prediction_id}``) instead of the raw path, so that ``/metrics``
neither shows which records people open nor grows with every made-up path.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.routing import Mount, compile_path

from hematovision.api.errors import ERROR_HEADER, error_body

_ERROR_HEADER = ERROR_HEADER.encode()
_DRAIN_LIMIT = 1 << 30  # read and discard at most this much of a refused body, so the client sees the answer
_CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    408: "timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "unprocessable",
    429: "overloaded",
    500: "internal",
    503: "unavailable",
    504: "timeout",
}

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
UNMATCHED = "unmatched"  # the metrics label of every path no route serves
_RAW_PATH = "hematovision.raw_path"


@dataclass(frozen=True)
class Upload:
    """What an upload route expects: files in ``field``, at most ``max_files`` of them."""

    field: str
    max_files: int = 1
    required: bool = True  # False: the route also accepts a form without files (e.g. a prediction id)
    public: bool = True  # answered without signing in unless the service requires it (see authorize)


class RequestGuard:
    def __init__(
        self,
        app,
        routes: dict[str, Upload],
        max_bytes: int,
        ready: Callable[[], bool] | None = None,
        authorize: Callable[[Scope], bool] | None = None,
    ) -> None:
        self.app, self.routes, self.max_bytes, self.ready, self.authorize = app, routes, max_bytes, ready, authorize

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = _enveloping(send)
        upload = self.routes.get(scope["path"].rstrip("/") or "/")
        if upload is None:
            return await self.app(scope, receive, send)
        if scope["method"] != "POST":
            await _drain(receive)
            return await _respond(send, 405, "method_not_allowed", "use POST", [(b"allow", b"POST")])
        if upload.public and self.authorize is not None and not self.authorize(scope):
            await _drain(receive)
            return await _respond(
                send,
                401,
                "unauthorized",
                "this service requires signing in or an API token ('Authorization: Bearer <token>')",
            )
        if self.ready is not None and not self.ready():
            await _drain(receive)
            return await _respond(send, 503, "not_ready", "no model loaded yet; retry shortly (see /readyz)")
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        how = f"send multipart/form-data with the image(s) as file field '{upload.field}'"
        content_type = headers.get(b"content-type", b"").lower()
        # A route whose file is optional also takes a plain form (e.g. just a prediction id).
        plain_form = not upload.required and content_type.startswith(b"application/x-www-form-urlencoded")
        if not content_type.startswith(b"multipart/form-data") and not plain_form:
            await _drain(receive)
            return await _respond(send, 415, "unsupported_media_type", how)
        body = await _read_body(receive, self.max_bytes, headers.get(b"content-length"))
        if body is None:
            return await _respond(send, 413, "too_large", f"request body exceeds {self.max_bytes} bytes")
        problem = await _check_form(scope, body, upload, how)
        if problem is not None:
            return await _respond(send, *problem)
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive, limit: int, declared: bytes | None) -> bytes | None:
    """The whole body, or None (after draining it) when it is larger than ``limit``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        await _drain(receive)
        return None
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            if message.get("more_body"):
                await _drain(receive)
            return None
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(chunks)


async def _drain(receive: Receive) -> None:
    seen = 0
    while seen <= _DRAIN_LIMIT:
        message = await receive()
        seen += len(message.get("body", b""))
        if message["type"] == "http.disconnect" or not message.get("more_body"):
            return


async def _check_form(scope: Scope, body: bytes, upload: Upload, how: str) -> tuple[int, str, str] | None:
    async def disconnected() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    request = Request(scope, _replay(body, disconnected))
    try:
        form = await request.form(max_files=upload.max_files + 8, max_fields=32)
    except MultiPartException as error:
        return 400, "malformed_multipart", f"{error.message}; {how}"
    except Exception as error:  # noqa: BLE001 - python-multipart raises several types for garbage
        return 400, "malformed_multipart", f"{type(error).__name__}; {how}"
    try:
        values = form.getlist(upload.field)
        if not values and not upload.required:
            return None
        if not values:
            return 400, "missing_field", f"no field '{upload.field}' (got {sorted(set(form.keys())) or 'none'}); {how}"
        if not all(isinstance(v, UploadFile) for v in values):
            return 400, "not_a_file", f"field '{upload.field}' must be a file upload, not text; {how}"
        if len(values) > upload.max_files:
            return 413, "too_many_files", f"{len(values)} files; at most {upload.max_files} per request"
        return None
    finally:
        await form.close()


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the disconnect, as the server would

    return replay


async def _respond(send: Send, status: int, code: str, detail: str, extra: list | None = None) -> None:
    body = error_body(code, detail)
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (_ERROR_HEADER, code.encode()),
                *(extra or []),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _enveloping(send: Send) -> Send:
    """Wrap ``send`` so that error responses not shaped by the service are rewritten."""
    held: dict[str, Any] | None = None
    chunks: list[bytes] = []

    async def wrapped(message: dict[str, Any]) -> None:
        nonlocal held
        if message["type"] == "http.response.start":
            headers = message.get("headers", [])
            if message["status"] >= 400 and not any(k.lower() == _ERROR_HEADER for k, _ in headers):
                held = message
                return
        elif message["type"] == "http.response.body" and held is not None:
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            status = held["status"]
            code, detail = _describe(status, b"".join(chunks))
            keep = [(k, v) for k, v in held.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
            held = None
            await _respond(send, status, code, detail, keep)
            return
        await send(message)

    return wrapped


def _describe(status: int, body: bytes) -> tuple[str, str]:
    code = _CODES.get(status, f"http_{status}")
    if status >= 500 and status != 503:
        return code, "internal error; the server log has the details"
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, list) and data and isinstance(data[0], dict):
        data = data[0]  # BentoML wraps some 4xx bodies in a list
    if isinstance(data, dict):
        detail = data.get("detail") or data.get("error") or text
        if isinstance(detail, list):  # pydantic errors
            detail = "; ".join(
                f"{'.'.join(map(str, e.get('loc', [])))}: {e.get('msg')}" for e in detail if isinstance(e, dict)
            )
        text = str(detail)
    return code, (text or HTTPStatus(status).phrase)[:500]


# --- metrics labelled by route template -------------------------------------------------------------


def route_templates(routes: list, prefix: str = "") -> list[tuple[re.Pattern, str]]:
    """Every route of ``routes`` as (path pattern, template), in matching order, looking into
    mounted apps and FastAPI's included routers; a mounted folder's files are ``<folder>/{path}``."""
    out: list[tuple[re.Pattern, str]] = []
    for context in iter_route_contexts(routes):
        route = context.original_route
        if isinstance(route, Mount):
            mount = prefix + route.path.rstrip("/")
            inner = getattr(route.app, "routes", None)
            if inner is not None:
                out += route_templates(inner, mount)
            else:
                out.append((compile_path(mount + "/{path:path}")[0], mount + "/{path}"))
            continue
        template = getattr(context, "path_format", None) or getattr(route, "path_format", None)
        if template:
            out.append((compile_path(prefix + template)[0], prefix + template))
    return out


def route_template(templates: list[tuple[re.Pattern, str]], path: str) -> str:
    """The template of the first route whose pattern matches ``path``; :data:`UNMATCHED` if none."""
    return next((template for pattern, template in templates if pattern.match(path)), UNMATCHED)


def templated_metrics(base: type) -> type:
    """A subclass of BentoML's traffic-metrics middleware (``base``) that records each request under
    its route template instead of ``scope["path"]``: BentoML reads the raw path, so every
    ``/review/image/<id>`` a pathologist opens would be a public label value, and every made-up path
    a new one. The middleware sits outside any middleware a service may add, so the template is put
    into the scope it reads and the raw path restored for the app inside it."""

    class TemplatedTrafficMetrics(base):
        def __init__(self, app, *args: Any, **kwargs: Any) -> None:
            super().__init__(_restoring_path(app), *args, **kwargs)
            self._templates: dict[int, list[tuple[re.Pattern, str]]] = {}  # per application, made once

        async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] not in ("http", "websocket"):
                return await super().__call__(scope, receive, send)
            app = scope.get("app")  # the application this middleware serves (Starlette sets it)
            templates = self._templates.get(id(app))
            if templates is None:
                templates = self._templates[id(app)] = route_templates(getattr(app, "routes", []))
            labelled = {**scope, "path": route_template(templates, scope["path"]), _RAW_PATH: scope["path"]}
            return await super().__call__(labelled, receive, send)

    TemplatedTrafficMetrics.__name__ = TemplatedTrafficMetrics.__qualname__ = f"Templated{base.__name__}"
    TemplatedTrafficMetrics.templated = True
    return TemplatedTrafficMetrics


def _restoring_path(app):
    async def restored(scope: Scope, receive: Receive, send: Send) -> None:
        if _RAW_PATH in scope:
            scope = {**scope}
            scope["path"] = scope.pop(_RAW_PATH)
        await app(scope, receive, send)

    return restored
