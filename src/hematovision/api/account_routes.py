"""The service's routes for signing in and out.

    POST /login     username + password (form or JSON) -> session cookie and the CSRF token
    POST /logout    ends the session (CSRF token in the X-CSRF-Token header)
    GET  /me        the signed-in user, roles and CSRF token (401 when not signed in)

Who is asking, the client's address and the cross-site rule are ``auth.py``; the sign-in limit is
kept in the lab database (``Accounts.sign_in_*``). Sign-ins, failed ones included (with the
address, never the password), and sign-outs go to the audit log.

Argon2id is slow and takes 64 MiB on purpose, so a sign-in's checks run in worker threads, at most
``SIGN_IN_THREADS`` at once: a burst of sign-ins queues there (awaiting costs the event loop
nothing) instead of stalling /predict and /healthz, or taking every thread of the pool that the
service's other routes share, or the memory of forty hashes at once.
"""

from __future__ import annotations

import asyncio
import os
import weakref

import anyio
from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse

from hematovision import stores
from hematovision.api.auth import COOKIE, client_address, identify, read_form, refuse_cross_site, require
from hematovision.api.errors import ApiError
from hematovision.lab.accounts import MAX_USERNAME_LENGTH, Session
from hematovision.settings import Settings, get_settings

SIGN_IN_THREADS = max(1, min(4, (os.cpu_count() or 2) // 2))
router = APIRouter()
_sign_in_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # one per event loop


def _sign_in_threads() -> anyio.CapacityLimiter:
    loop = asyncio.get_running_loop()
    limiter = _sign_in_limiters.get(loop)
    if limiter is None:
        limiter = _sign_in_limiters[loop] = anyio.CapacityLimiter(SIGN_IN_THREADS)
    return limiter


def _audit_failure(settings: Settings, username: str, address: str, reason: str) -> None:
    """A failed sign-in in the audit log: who was tried, from where, why; never the password."""
    stores.corrections(settings).audit(
        username or "-", "login_failed", username, {"address": address, "reason": reason}
    )


def _sign_in(settings: Settings, username: str, password: str, address: str) -> tuple[str, Session]:
    """The limit, the password and the new session: blocking work, for a worker thread."""
    lab, accounts = settings.lab, stores.accounts(settings)
    wait = accounts.sign_in_retry_after(username, address, lab.login_attempts, lab.login_window_seconds)
    if wait > 0:
        _audit_failure(settings, username, address, "too_many_attempts")
        raise ApiError(
            429,
            "too_many_attempts",
            f"too many failed sign-ins; try again in {wait:.0f} s",
            {"retry-after": str(int(wait) + 1)},
        )
    user = accounts.authenticate(username, password) if username and password else None
    if user is None:
        accounts.sign_in_failed(username, address, lab.login_window_seconds)
        _audit_failure(settings, username, address, "bad_credentials")
        raise ApiError(401, "bad_credentials", "unknown user, wrong password or disabled account")
    accounts.sign_in_succeeded(username, address)
    secret, session = accounts.start_session(user)
    stores.corrections(settings).audit(user.username, "login", detail={"address": address})
    return secret, session


@router.post("/login")
async def login(request: Request) -> JSONResponse:
    """Sign in with ``username`` and ``password`` (form or JSON): sets the session cookie and
    returns the CSRF token the page must echo.

    Refused before anything is read: a sign-in another site's page sent (403 ``cross_site``; the
    rule is ``auth.refuse_cross_site``: ``Sec-Fetch-Site`` same-origin or none, ``Origin`` this
    service, when the browser sends them) and a body over ``lab.max_form_bytes`` (413). Refused
    before any lookup: a username over 64 characters (400). Then the sign-in limit per user and
    address (429), the password (401)."""
    settings = get_settings()
    address = client_address(request)
    try:
        refuse_cross_site(request)
    except ApiError:
        await run_in_threadpool(_audit_failure, settings, "", address, "cross_site")
        raise
    form = await read_form(request, settings.lab.max_form_bytes)
    username, password = str(form.get("username", "")).strip().lower(), str(form.get("password", ""))
    if len(username) > MAX_USERNAME_LENGTH:
        await run_in_threadpool(_audit_failure, settings, username[:MAX_USERNAME_LENGTH], address, "username_too_long")
        raise ApiError(400, "bad_request", f"a username has at most {MAX_USERNAME_LENGTH} characters")
    secret, session = await anyio.to_thread.run_sync(
        _sign_in, settings, username, password, address, limiter=_sign_in_threads()
    )
    response = JSONResponse(
        {"username": session.user.username, "roles": sorted(session.user.roles), "csrf_token": session.csrf_token}
    )
    response.set_cookie(
        COOKIE,
        secret,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        max_age=int(settings.lab.session_hours * 3600),
        path="/",
    )
    return response


@router.post("/logout")
def logout(request: Request) -> JSONResponse:
    """End the session (signed in, with the CSRF token in ``X-CSRF-Token``; no body is read)."""
    user = require(request)  # a plain (sync) route: FastAPI runs it in a worker thread
    settings = get_settings()
    stores.accounts(settings).end_session(request.cookies.get(COOKIE))
    stores.corrections(settings).audit(user.username, "logout")
    response = JSONResponse({"signed_out": user.username})
    response.delete_cookie(COOKIE, path="/")
    return response


@router.get("/me")
def me(request: Request) -> dict:
    """The signed-in user, roles and CSRF token (401 when not signed in)."""
    user, session = identify(request)
    if user is None:
        raise ApiError(401, "unauthorized", "not signed in")
    return {
        "username": user.username,
        "roles": sorted(user.roles),
        "csrf_token": session.csrf_token if session else None,
    }
