"""People and systems that use the platform: accounts, roles, browser sessions and API tokens.

Roles say what someone may do: ``pathologist`` reviews and corrects predictions, ``engineer``
promotes, rolls back and retrains, ``ops`` watches dashboards, ``admin`` manages accounts. A person
may hold several. Passwords are hashed with Argon2id (argon2-cffi, the reference implementation's
bindings; parameters upgraded transparently at the next sign-in). Session ids and API tokens are
random 256-bit secrets of which only a SHA-256 is stored, so a copy of the database signs nobody in.

Everything lives in one sqlite file (WAL) next to the prediction log: no server to run, and the
audit log (``audit.py``) shares its transactions.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import sqlite3
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from hematovision.database import connect, transaction, utc_now

ROLES = ("pathologist", "engineer", "ops", "admin")
MIN_PASSWORD_LENGTH = 10
_USERNAME = re.compile(r"^[a-z0-9][a-z0-9._-]{1,63}$")
_hasher = PasswordHasher()  # argon2id with the library's current recommended parameters
# Verifying against this when the user does not exist keeps the answer time the same, so response
# times do not reveal which usernames exist.
_DUMMY_HASH = _hasher.hash("not a real password, only for timing")

SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles         TEXT NOT NULL,          -- comma-separated, from ROLES
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256  TEXT PRIMARY KEY,
    username   TEXT NOT NULL REFERENCES users(username),
    csrf_token TEXT NOT NULL,             -- echoed by the page's forms (synchroniser token)
    created_at TEXT NOT NULL,
    expires_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS api_tokens (
    token_sha256 TEXT PRIMARY KEY,
    username     TEXT NOT NULL REFERENCES users(username),
    name         TEXT NOT NULL,
    created_at   TEXT NOT NULL
);
"""


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


class Accounts:
    def __init__(self, db_path: Path, session_hours: float = 12.0) -> None:
        self.db_path = Path(db_path)
        self.session_hours = session_hours
        self._db = connect(self.db_path, SCHEMA)

    def _one(self, sql: str, params: tuple = ()) -> tuple | None:
        rows = self._db.execute(sql, params)
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
            with transaction(self._db) as db:
                db.execute(
                    "INSERT INTO users VALUES (?, ?, ?, 0, ?)",
                    (username, _hasher.hash(password), ",".join(sorted(set(roles))), utc_now()),
                )
        except sqlite3.IntegrityError:
            raise AccountError(f"user {username!r} already exists") from None
        return User(username, frozenset(roles))

    def list_users(self) -> list[dict]:
        rows = self._db.execute("SELECT username, roles, disabled, created_at FROM users ORDER BY username")
        return [{"username": u, "roles": r.split(","), "disabled": bool(d), "created_at": c} for u, r, d, c in rows]

    def disable_user(self, username: str) -> None:
        """Disable an account and end its sessions and tokens at once (accounts are never deleted:
        the audit log and corrections keep naming them)."""
        with transaction(self._db) as db:
            if db.execute("UPDATE users SET disabled = 1 WHERE username = ?", (username,)).rowcount == 0:
                raise AccountError(f"no user {username!r}")
            db.execute("DELETE FROM sessions WHERE username = ?", (username,))
            db.execute("DELETE FROM api_tokens WHERE username = ?", (username,))

    # --- signing in -------------------------------------------------------------------------
    def authenticate(self, username: str, password: str) -> User | None:
        row = self._one(
            "SELECT password_hash, roles, disabled FROM users WHERE username = ?", (username.strip().lower(),)
        )
        try:
            _hasher.verify(row[0] if row else _DUMMY_HASH, password)
        except (VerificationError, InvalidHashError):
            return None
        if row is None or row[2]:
            return None
        if _hasher.check_needs_rehash(row[0]):
            with transaction(self._db) as db:
                db.execute("UPDATE users SET password_hash = ? WHERE username = ?", (_hasher.hash(password), username))
        return User(username.strip().lower(), frozenset(row[1].split(",")))

    def start_session(self, user: User) -> tuple[str, Session]:
        """A new session: returns the secret for the cookie and the session (with its CSRF token)."""
        secret, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = datetime.now(UTC)
        with transaction(self._db) as db:
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (now.isoformat(),))
            db.execute(
                "INSERT INTO sessions VALUES (?, ?, ?, ?, ?)",
                (
                    _sha256(secret),
                    user.username,
                    csrf,
                    now.isoformat(),
                    (now + timedelta(hours=self.session_hours)).isoformat(),
                ),
            )
        return secret, Session(user, csrf)

    def session(self, secret: str | None) -> Session | None:
        if not secret:
            return None
        row = self._one(
            "SELECT s.username, u.roles, s.csrf_token FROM sessions s JOIN users u USING (username) "
            "WHERE s.id_sha256 = ? AND s.expires_at > ? AND u.disabled = 0",
            (_sha256(secret), datetime.now(UTC).isoformat()),
        )
        return None if row is None else Session(User(row[0], frozenset(row[1].split(","))), row[2])

    def end_session(self, secret: str | None) -> None:
        if secret:
            with transaction(self._db) as db:
                db.execute("DELETE FROM sessions WHERE id_sha256 = ?", (_sha256(secret),))

    # --- API tokens -------------------------------------------------------------------------
    def create_token(self, username: str, name: str) -> str:
        """A new API token for ``username`` (shown once; only its hash is kept)."""
        row = self._one("SELECT disabled FROM users WHERE username = ?", (username,))
        if row is None or row[0]:
            raise AccountError(f"no active user {username!r}")
        token = "hv_" + secrets.token_urlsafe(32)
        with transaction(self._db) as db:
            db.execute("INSERT INTO api_tokens VALUES (?, ?, ?, ?)", (_sha256(token), username, name, utc_now()))
        return token

    def token_user(self, token: str | None) -> User | None:
        if not token:
            return None
        row = self._one(
            "SELECT u.username, u.roles FROM api_tokens t JOIN users u USING (username) "
            "WHERE t.token_sha256 = ? AND u.disabled = 0",
            (_sha256(token),),
        )
        return None if row is None else User(row[0], frozenset(row[1].split(",")))
