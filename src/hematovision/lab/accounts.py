"""People and systems that use the platform: accounts, roles, browser sessions and API tokens.

Roles say what someone may do: ``pathologist`` reviews and corrects predictions, ``engineer``
promotes, rolls back and retrains, ``ops`` watches dashboards, ``admin`` manages accounts. A person
may hold several. Passwords are hashed with Argon2id (argon2-cffi, the reference implementation's
bindings; parameters upgraded transparently at the next sign-in). Session ids and API tokens are
random 256-bit secrets of which only a SHA-256 is stored, so a copy of the database signs nobody in.
A session ends ``session_hours`` after the sign-in, or earlier when unused for ``idle_minutes``; an
API token expires ``days`` after it was made and can be listed (by a short id, never the secret) and
revoked one by one.

Failed sign-ins are kept here too (``login_failures``), so the sign-in limit is shared by every
serving worker and replica that opens this database; each record is deleted once it is older than
the limit's window, so the table holds at most the window's failed attempts, whatever names they use.

Everything lives in the lab database (``database.py``: a sqlite file next to the prediction log, or
lab mode's PostgreSQL), whose schema is the ``lab`` migrations'; the audit log shares it.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import text
from sqlalchemy.exc import IntegrityError

from hematovision.database import connect, utc_now

ROLES = ("pathologist", "engineer", "ops", "admin")
MIN_PASSWORD_LENGTH = 10
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verifying against this when the user does not exist keeps the answer time the same, so response
# times do not reveal which usernames exist.
_DUMMY_HASH = _hasher.hash("not a real password, only for timing")

DEFAULT_IDLE_MINUTES = 30.0
DEFAULT_TOKEN_DAYS = 90.0  # also the lifetime given to tokens made before tokens expired
TOUCH_SECONDS = 60.0  # a session's or token's last use is written at most this often (a write is an fsync)
TOKEN_ID_LENGTH = 12  # hex digits of the token's SHA-256 shown as its id (the secret is never shown)
MAX_USERNAME_LENGTH = 64


class AccountError(ValueError):
    """A request about accounts that cannot be honoured (unknown user, weak password, bad role)."""


@dataclass(frozen=True)
class User:
    username: str
    roles: frozenset[str]

    def has(self, role: str) -> bool:
        return role in self.roles


@dataclass(frozen=True)
class Session:
    user: User
    csrf_token: str


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def _iso(moment: datetime) -> str:
    """One fixed-width ISO form for every time stored here, so text comparisons order them."""
    return moment.astimezone(UTC).isoformat(timespec="microseconds")


def _touch_due(last: str | None, now: datetime, idle_seconds: float = TOUCH_SECONDS * 4) -> bool:
    """Whether a last use noted at ``last`` is worth writing again (often enough for an idle timeout
    of ``idle_seconds``, rarely enough not to write on every request)."""
    if not last:
        return True
    return (now - datetime.fromisoformat(last)).total_seconds() > min(TOUCH_SECONDS, idle_seconds / 4)


class Accounts:
    def __init__(self, database: str | Path, session_hours: float = 12.0) -> None:
        """``database``: the lab database's sqlite file, or lab mode's PostgreSQL URL."""
        self.session_hours = session_hours
        self._db = connect(database, "lab")

    def _one(self, sql: str, params: dict | None = None) -> tuple | None:
        rows = self._db.query(sql, params)
        return rows[0] if rows else None

    # --- administration ---------------------------------------------------------------------
    def add_user(self, username: str, password: str, roles: list[str]) -> User:
        username = username.strip().lower()
        if not _USERNAME.match(username):
            raise AccountError("username: 2-64 characters, lower-case letters, digits, '.', '_' or '-'")
        if len(password) < MIN_PASSWORD_LENGTH:
            raise AccountError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")
        unknown = set(roles) - set(ROLES)
        if unknown or not roles:
            raise AccountError(f"roles must be among {', '.join(ROLES)} (got {', '.join(roles) or 'none'})")
        try:
            with self._db.transaction() as db:
                db.execute(
                    text(
                        "INSERT INTO users (username, password_hash, roles, disabled, created_at) "
                        "VALUES (:username, :hash, :roles, 0, :now)"
                    ),
                    {
                        "username": username,
                        "hash": _hasher.hash(password),
                        "roles": ",".join(sorted(set(roles))),
                        "now": utc_now(),
                    },
                )
        except IntegrityError:
            raise AccountError(f"user {username!r} already exists") from None
        return User(username, frozenset(roles))

    def list_users(self) -> list[dict]:
        rows = self._db.query("SELECT username, roles, disabled, created_at FROM users ORDER BY username")
        return [{"username": u, "roles": r.split(","), "disabled": bool(d), "created_at": c} for u, r, d, c in rows]

    def disable_user(self, username: str) -> None:
        """Disable an account and end its sessions and tokens at once (accounts are never deleted:
        the audit log and corrections keep naming them)."""
        who = {"username": username}
        with self._db.transaction() as db:
            if db.execute(text("UPDATE users SET disabled = 1 WHERE username = :username"), who).rowcount == 0:
                raise AccountError(f"no user {username!r}")
            db.execute(text("DELETE FROM sessions WHERE username = :username"), who)
            db.execute(text("DELETE FROM api_tokens WHERE username = :username"), who)

    # --- signing in -------------------------------------------------------------------------
    def authenticate(self, username: str, password: str) -> User | None:
        """The user, if ``password`` is theirs and the account is active. Slow on purpose (Argon2id,
        64 MiB): call it from a worker thread, never from an event loop."""
        username = username.strip().lower()
        if len(username) > MAX_USERNAME_LENGTH:
            return None  # no account has such a name (add_user refuses it): nothing to look up
        row = self._one(
            "SELECT password_hash, roles, disabled FROM users WHERE username = :username", {"username": username}
        )
        try:
            _hasher.verify(row[0] if row else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None or row[2]:
            return None
        if _hasher.check_needs_rehash(row[0]):
            self._db.execute(
                "UPDATE users SET password_hash = :hash WHERE username = :username",
                {"hash": _hasher.hash(password), "username": username},
            )
        return User(username, frozenset(row[1].split(",")))

    def start_session(self, user: User) -> tuple[str, Session]:
        """A new session: returns the secret for the cookie and the session (with its CSRF token)."""
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with self._db.transaction() as db:
            db.execute(text("DELETE FROM sessions WHERE expires_at < :now"), {"now": _iso(now)})
            db.execute(
                text(
                    "INSERT INTO sessions (id_sha256, username, csrf_token, created_at, expires_at, last_seen_at) "
                    "VALUES (:id, :username, :csrf, :now, :expires, :now)"
                ),
                {
                    "id": _sha256(secret),
                    "username": user.username,
                    "csrf": csrf,
                    "now": _iso(now),
                    "expires": _iso(now + timedelta(hours=self.session_hours)),
                },
            )
        return secret, Session(user, csrf)

    def session(self, secret: str | None, idle_minutes: float = DEFAULT_IDLE_MINUTES) -> Session | None:
        """The live session behind a cookie: not past ``session_hours`` and used within the last
        ``idle_minutes`` (each use counts, written at most once a minute)."""
        if not secret:
            return None
        now = datetime.now(UTC)
        row = self._one(
            "SELECT s.username, u.roles, s.csrf_token, s.last_seen_at FROM sessions s JOIN users u USING (username) "
            "WHERE s.id_sha256 = :id AND s.expires_at > :now AND COALESCE(s.last_seen_at, s.created_at) > :idle_since "
            "AND u.disabled = 0",
            {"id": _sha256(secret), "now": _iso(now), "idle_since": _iso(now - timedelta(minutes=idle_minutes))},
        )
        if row is None:
            return None
        if _touch_due(row[3], now, idle_minutes * 60):
            self._db.execute(
                "UPDATE sessions SET last_seen_at = :now WHERE id_sha256 = :id",
                {"now": _iso(now), "id": _sha256(secret)},
            )
        return Session(User(row[0], frozenset(row[1].split(","))), row[2])

    def end_session(self, secret: str | None) -> None:
        if secret:
            self._db.execute("DELETE FROM sessions WHERE id_sha256 = :id", {"id": _sha256(secret)})

    # --- the sign-in limit ------------------------------------------------------------------
    def sign_in_retry_after(
        self, username: str, address: str, attempts: int, window: float, now: float | None = None
    ) -> float:
        """Seconds until ``username`` may try again from ``address`` (0: now): at most ``attempts``
        failures within ``window`` seconds."""
        now = time.time() if now is None else now
        row = self._one(
            "SELECT COUNT(*), MIN(at) FROM login_failures WHERE username = :username AND address = :address "
            "AND at > :since",
            {"username": username, "address": address, "since": now - window},
        )
        count, oldest = row if row else (0, None)
        return 0.0 if count < attempts or oldest is None else max(0.0, oldest + window - now)

    def sign_in_failed(self, username: str, address: str, window: float, now: float | None = None) -> None:
        """Record a failed sign-in, and forget every failure older than ``window``."""
        now = time.time() if now is None else now
        with self._db.transaction() as db:
            db.execute(text("DELETE FROM login_failures WHERE at <= :before"), {"before": now - window})
            db.execute(
                text("INSERT INTO login_failures (username, address, at) VALUES (:username, :address, :at)"),
                {"username": username, "address": address, "at": now},
            )

    def sign_in_succeeded(self, username: str, address: str) -> None:
        self._db.execute(
            "DELETE FROM login_failures WHERE username = :username AND address = :address",
            {"username": username, "address": address},
        )

    def sign_in_failures(self) -> int:
        """Failed sign-ins on record (all within the window, once the next failure has pruned)."""
        return int(self._db.query("SELECT COUNT(*) FROM login_failures")[0][0])

    # --- API tokens -------------------------------------------------------------------------
    def create_token(self, username: str, name: str, days: float = DEFAULT_TOKEN_DAYS) -> str:
        """A new API token for ``username``, valid for ``days`` (shown once; only its hash is kept)."""
        row = self._one("SELECT disabled FROM users WHERE username = :username", {"username": username})
        if row is None or row[0]:
            raise AccountError(f"no active user {username!r}")
        token = "hv_" + secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        self._db.execute(
            "INSERT INTO api_tokens (token_sha256, username, name, created_at, expires_at) "
            "VALUES (:sha, :username, :name, :now, :expires)",
            {
                "sha": _sha256(token),
                "username": username,
                "name": name,
                "now": _iso(now),
                "expires": _iso(now + timedelta(days=days)),
            },
        )
        return token

    def token_user(self, token: str | None) -> User | None:
        """The active user behind an unexpired, unrevoked token (its last use noted, once a minute)."""
        if not token:
            return None
        now = datetime.now(UTC)
        row = self._one(
            "SELECT u.username, u.roles, t.last_used_at FROM api_tokens t JOIN users u USING (username) "
            "WHERE t.token_sha256 = :sha AND t.expires_at > :now AND u.disabled = 0",
            {"sha": _sha256(token), "now": _iso(now)},
        )
        if row is None:
            return None
        if _touch_due(row[2], now):
            self._db.execute(
                "UPDATE api_tokens SET last_used_at = :now WHERE token_sha256 = :sha",
                {"now": _iso(now), "sha": _sha256(token)},
            )
        return User(row[0], frozenset(row[1].split(",")))

    def list_tokens(self, username: str) -> list[dict]:
        """``username``'s tokens, oldest first: id (a prefix of the secret's hash), name, created,
        expires, last used, expired. Never the secret."""
        now = _iso(datetime.now(UTC))
        rows = self._db.query(
            "SELECT token_sha256, name, created_at, expires_at, last_used_at FROM api_tokens "
            "WHERE username = :username ORDER BY created_at",
            {"username": username},
        )
        return [
            {
                "id": sha[:TOKEN_ID_LENGTH],
                "name": name,
                "created_at": created,
                "expires_at": expires,
                "last_used_at": used,
                "expired": expires <= now,
            }
            for sha, name, created, expires, used in rows
        ]

    def revoke_token(self, username: str, token_id: str) -> dict:
        """Revoke (delete) the one token of ``username`` whose id starts with ``token_id``."""
        token_id = token_id.strip().lower()
        if not re.fullmatch(r"[0-9a-f]{6,64}", token_id):
            raise AccountError("a token id is at least 6 hex digits, as `hematovision users tokens` shows it")
        with self._db.transaction() as db:
            rows = db.execute(
                # hex digits only (checked above): nothing in the prefix is a LIKE wildcard
                text(
                    "SELECT token_sha256, name FROM api_tokens WHERE username = :username AND token_sha256 LIKE :prefix"
                ),
                {"username": username, "prefix": token_id + "%"},
            ).all()
            if len(rows) != 1:
                raise AccountError(
                    f"no token {token_id!r} of {username!r}" if not rows else f"{token_id!r} names several tokens"
                )
            db.execute(text("DELETE FROM api_tokens WHERE token_sha256 = :sha"), {"sha": rows[0][0]})
        return {"id": rows[0][0][:TOKEN_ID_LENGTH], "name": rows[0][1]}
