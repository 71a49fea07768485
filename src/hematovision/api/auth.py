"""Who is asking, decided on every request, for every route module.

A browser proves itself with the session cookie (HttpOnly, SameSite=Strict) *and*, for anything
that changes state, the session's CSRF token in the ``X-CSRF-Token`` header; a system sends
``Authorization: Bearer <token>`` (``hematovision users token``). Sessions end after
``session_hours`` or ``session_idle_minutes`` unused; tokens after ``token_days``.

Routes that change state decide who is asking *before* they read a body
(:func:`authenticated`, in a worker thread: it reads the lab database), and then read at most
``lab.max_form_bytes`` (:func:`read_form`); nobody unknown makes the service read or parse anything.

Also here: the sign-in's own rules. The client's address (:func:`client_address`) is the peer's,
unless the peer is one of ``lab.trusted_proxies``; a sign-in from another site is refused
(:func:`refuse_cross_site`); the sign-in limit per user and address is kept in the lab database
(``Accounts.sign_in_*``), so every worker and replica shares it.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from functools import lru_cache
from urllib.parse import urlsplit

from fastapi import Request
from starlette.concurrency import run_in_threadpool
from starlette.formparsers import MultiPartException

from hematovision import stores
from hematovision.api.errors import ApiError
from hematovision.lab.accounts import Session, User
from hematovision.settings import get_settings

COOKIE = "hv_session"
# Browsers' Sec-Fetch-Site values of a request a page of this service made itself ("none": typed
# in or bookmarked by the user).
SAME_SITE_FETCH = ("same-origin", "none")


def identify(request: Request) -> tuple[User | None, Session | None]:
    """The user behind a bearer token or a session cookie, with the session (None for a token).
    Reads (and now and then writes) the lab database: from async code, use :func:`authenticated`."""
    settings = get_settings()
    accounts = stores.accounts(settings)
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return accounts.token_user(header[7:].strip()), None
    session = accounts.session(request.cookies.get(COOKIE), settings.lab.session_idle_minutes)
    return (session.user if session else None), session


def may_predict(scope: dict) -> bool:
    """Whether a prediction request may be answered: a signed-in user or a valid API token,
    whatever the role (no CSRF token: a prediction changes nothing of the lab's); anyone only where
    ``predict_requires_token`` is set false (a public demo)."""
    if not get_settings().lab.predict_requires_token:
        return True
    return identify(Request(scope))[0] is not None


def require(request: Request, *roles: str, form: dict | None = None) -> User:
    """The caller, if signed in with one of ``roles``; state-changing browser requests must also
    carry the session's CSRF token (a token-authenticated system has no cookie to be tricked with).
    The token is read from the ``X-CSRF-Token`` header, or from ``form`` where a route passes the
    fields it has already read (routes that authenticate before reading pass none)."""
    user, session = identify(request)
    if user is None:
        raise ApiError(401, "unauthorized", "sign in (POST /login) or send 'Authorization: Bearer <token>'")
    if roles and not any(user.has(r) for r in roles):
        raise ApiError(403, "forbidden", f"{user.username} lacks the role {' or '.join(roles)}")
    if session is not None and request.method not in ("GET", "HEAD"):
        sent = request.headers.get("x-csrf-token") or (form or {}).get("csrf_token") or ""
        if not hmac.compare_digest(str(sent), session.csrf_token):
            raise ApiError(403, "csrf", "missing or wrong CSRF token (header X-CSRF-Token)")
    return user


async def authenticated(request: Request, *roles: str) -> User:
    """:func:`require` from async code, off the event loop, before any body is read (so the CSRF
    token must come in the ``X-CSRF-Token`` header)."""
    return await run_in_threadpool(require, request, *roles)


async def read_form(request: Request, limit: int | None = None) -> dict:
    """The request's fields, from a JSON object or a (multipart or urlencoded) form; file fields
    come back as bytes. At most ``limit`` bytes are read (default ``serving.max_request_bytes``,
    which the request guard already enforces on the upload routes): a larger declared
    Content-Length is refused unread, a longer (e.g. chunked) body as soon as it passes the limit,
    both 413 ``too_large``."""
    limit = get_settings().serving.max_request_bytes if limit is None else limit
    body = await read_body(request, limit)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        try:
            fields = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, "bad_request", "body is not valid JSON") from None
        return fields if isinstance(fields, dict) else {}

    async def replay() -> dict:
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form()
    except MultiPartException as error:
        raise ApiError(400, "malformed_multipart", error.message) from None
    out = {}
    for key, value in form.multi_items():
        out[key] = await value.read() if hasattr(value, "read") else value
    await form.close()
    return out


async def read_body(request: Request, limit: int) -> bytes:
    """The whole body, if it is at most ``limit`` bytes (413 ``too_large`` otherwise, read no further)."""
    too_large = ApiError(413, "too_large", f"request body exceeds {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


@lru_cache(maxsize=8)
def _networks(proxies: tuple[str, ...]) -> tuple:
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies if p.strip())


def _trusted(address: str, networks: tuple) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(request: Request) -> str:
    """The client's address: the peer's, unless the peer is one of ``lab.trusted_proxies``
    (addresses or networks); then X-Forwarded-For is read from the right, each hop believed only
    while the one that reported it is trusted. A client cannot name itself by sending the header."""
    networks = _networks(tuple(get_settings().lab.trusted_proxies))
    client = request.client.host if request.client else ""
    hops = [hop.strip() for header in request.headers.getlist("x-forwarded-for") for hop in header.split(",")]
    for hop in reversed(hops):
        if not _trusted(client, networks):
            break
        try:
            client = str(ipaddress.ip_address(hop))
        except ValueError:
            break  # garbage in the chain: the last hop a trusted proxy vouched for is the client
    return client


def refuse_cross_site(request: Request) -> None:
    """Login CSRF: refuse a sign-in that another site's page makes a browser send (it would sign
    the victim into the attacker's account). The rule, from the headers browsers set themselves:

    * ``Sec-Fetch-Site``, when present, must be ``same-origin`` or ``none`` (typed in);
    * ``Origin``, when present, must name this service: its host (and port) equal to the request's
      ``Host`` (or ``X-Forwarded-Host`` when a trusted proxy forwarded it); ``null`` is refused.

    A client that sends neither header (curl, a script, an older browser's same-origin form) is
    not a browser led by another site, and signs in."""
    site = request.headers.get("sec-fetch-site")
    if site is not None and site.strip().lower() not in SAME_SITE_FETCH:
        raise ApiError(403, "cross_site", "sign-ins are accepted only from this service's own pages")
    origin = request.headers.get("origin")
    if origin is None:
        return
    hosts = {request.headers.get("host", "").lower()}
    peer = request.client.host if request.client else ""
    if _trusted(peer, _networks(tuple(get_settings().lab.trusted_proxies))):
        hosts.add(request.headers.get("x-forwarded-host", "").split(",")[0].strip().lower())
    netloc = urlsplit(origin.strip()).netloc.lower() if origin.strip() != "null" else ""
    if not netloc or netloc not in hosts:
        raise ApiError(403, "cross_site", "sign-ins are accepted only from this service's own pages")
