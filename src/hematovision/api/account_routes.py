"""The service's routes for signing in and out.

    POST /login     username + password (form or JSON) -> session cookie and the CSRF token
    POST /logout    ends the session
    GET  /me        the signed-in user, roles and CSRF token (401 when not signed in)

Who is asking and the sign-in limit are ``auth.py``; sign-ins and sign-outs go to the audit log.
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from hematovision import stores
from hematovision.api.auth import COOKIE, identify, login_limiter, read_form, require
from hematovision.api.errors import ApiError
from hematovision.settings import get_settings

router = APIRouter()


@router.post("/login")
async def login(request: Request) -> JSONResponse:
    """Sign in with ``username`` and ``password`` (form or JSON): sets the session cookie and
    returns the CSRF token the page must echo."""
    form = await read_form(request)
    username, password = str(form.get("username", "")).strip().lower(), str(form.get("password", ""))
    key = (username, request.client.host if request.client else "")
    wait = login_limiter.retry_after(key)
    if wait > 0:
        raise ApiError(
            429,
            "too_many_attempts",
            f"too many failed sign-ins; try again in {wait:.0f} s",
            {"retry-after": str(int(wait) + 1)},
        )
    settings = get_settings()
    accounts = stores.accounts(settings)
    user = accounts.authenticate(username, password) if username and password else None
    if user is None:
        login_limiter.failed(key)
        raise ApiError(401, "bad_credentials", "unknown user, wrong password or disabled account")
    login_limiter.succeeded(key)
    secret, session = accounts.start_session(user)
    stores.corrections(settings).audit(user.username, "login")
    response = JSONResponse({"username": user.username, "roles": sorted(user.roles), "csrf_token": session.csrf_token})
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
async def logout(request: Request) -> JSONResponse:
    user = require(request, form=await read_form(request))
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
