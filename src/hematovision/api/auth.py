"""Who is asking, decided on every request, for every route module.

A browser proves itself with the session cookie (HttpOnly, SameSite=Strict) *and*, for anything
that changes state, the session's CSRF token in the ``X-CSRF-Token`` header (or a ``csrf_token``
form field); a system sends ``Authorization: Bearer <token>`` (``hematovision users token``).
Sign-in failures are limited per user and address (:class:`LoginLimiter`). Also here: the one
reader of form or JSON bodies, because the CSRF token may travel in the form.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections import defaultdict, deque

from fastapi import Request

from hematovision import stores
from hematovision.api.errors import ApiError
from hematovision.lab.accounts import Session, User
from hematovision.settings import get_settings

COOKIE = "hv_session"


def identify(request: Request) -> tuple[User | None, Session | None]:
    """The user behind a bearer token or a session cookie, with the session (None for a token)."""
    accounts = stores.accounts(get_settings())
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return accounts.token_user(header[7:].strip()), None
    session = accounts.session(request.cookies.get(COOKIE))
    return (session.user if session else None), session


def may_predict(scope: dict) -> bool:
    """Whether a prediction request may be answered: anyone, unless ``predict_requires_token``
    is set; then a signed-in user or a valid API token, whatever the role."""
    if not get_settings().lab.predict_requires_token:
        return True
    return identify(Request(scope))[0] is not None


def require(request: Request, *roles: str, form: dict | None = None) -> User:
    """The caller, if signed in with one of ``roles``; state-changing browser requests must also
    carry the session's CSRF token (a token-authenticated system has no cookie to be tricked with)."""
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


async def read_form(request: Request) -> dict:
    """The request's fields, from a JSON object or a (multipart or urlencoded) form; file fields
    come back as bytes."""
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            body = await request.json()
        except ValueError:
            raise ApiError(400, "bad_request", "body is not valid JSON") from None
        return body if isinstance(body, dict) else {}
    form = await request.form()
    out = {}
    for key, value in form.multi_items():
        out[key] = await value.read() if hasattr(value, "read") else value
    await form.close()
    return out


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


# This worker's limiter (each serving worker counts its own failures).
login_limiter = LoginLimiter(get_settings().lab.login_attempts, get_settings().lab.login_window_seconds)
