"""Signing in and the engineers' routes, hardened: bodies bounded and read only once the caller is
known, Argon2 and the promotion gate off the event loop, the sign-in limit in the lab database,
proxies believed only when trusted, login CSRF refused, tokens that expire and are revoked one by
one, sessions that idle out, failed sign-ins in the audit log.

Unit tests: the account, model and ops routes on a bare FastAPI app over a fresh lab database in
``tmp_path`` (no model, no server); the gate is a stand-in."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from fastapi import FastAPI
from starlette.requests import Request
from starlette.testclient import TestClient
from typer.testing import CliRunner

from hematovision import stores
from hematovision.api import account_routes, errors, model_routes, ops_routes, review_routes
from hematovision.api.auth import COOKIE, client_address
from hematovision.api.jobs import JobTable
from hematovision.cli import app as cli
from hematovision.lab.accounts import Accounts, User
from hematovision.registry.gate import GateDecision
from hematovision.settings import get_settings

from conftest import add_user

PASSWORD = "correct horse battery"
HOST = "hv.test"
MAX_FORM_BYTES = 2048
ATTEMPTS = 3


@pytest.fixture
def lab(tmp_path, monkeypatch):
    """A project of its own (lab database in tmp_path), with small limits."""
    monkeypatch.setenv("HEMATOVISION_PROJECT_DIR", str(tmp_path))
    monkeypatch.setenv("HEMATOVISION_MAX_FORM_BYTES", str(MAX_FORM_BYTES))
    monkeypatch.setenv("HEMATOVISION_LOGIN_ATTEMPTS", str(ATTEMPTS))
    monkeypatch.delenv("HEMATOVISION_TRUSTED_PROXIES", raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr(model_routes, "jobs", JobTable())  # no job of another test is running
    yield tmp_path
    get_settings.cache_clear()


@pytest.fixture
def api(lab) -> FastAPI:
    app = FastAPI()
    for routes in (account_routes, model_routes, ops_routes, review_routes):
        app.include_router(routes.router)
    errors.install(app)
    return app


@pytest.fixture
def client(api) -> TestClient:
    return TestClient(api, base_url=f"http://{HOST}")


def session_of(name: str, *roles: str) -> tuple[str, str]:
    """A signed-in browser session of a new account: (cookie secret, CSRF token)."""
    add_user(name, *roles, password=PASSWORD)
    secret, session = stores.accounts().start_session(User(name, frozenset(roles)))
    return secret, session.csrf_token


def call(app, method: str, path: str, headers: dict[str, str], chunks: list[bytes] | None = None, endless=False):
    """One request straight through ASGI; returns (status, JSON body, body messages read before the answer)."""
    chunks = list(chunks or [b"force=true"])
    read, sent = [], []

    async def receive():
        if sent:  # after the answer: a server would report the disconnect
            return {"type": "http.disconnect"}
        read.append(1)
        more = endless or len(read) < len(chunks)
        return {"type": "http.request", "body": chunks[min(len(read), len(chunks)) - 1], "more_body": more}

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [(b"host", HOST.encode()), *((k.lower().encode(), v.encode()) for k, v in headers.items())],
        "client": ("127.0.0.1", 50000),
        "server": (HOST, 80),
    }
    asyncio.run(app(scope, receive, send))
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return sent[0]["status"], json.loads(body), len(read)


def audit_entries(action: str) -> list[dict]:
    return [e for e in stores.corrections().audit_log(1000) if e["action"] == action]


# --- 1. bodies bounded, read only once the caller is known ---------------------------------------
def test_login_reads_at_most_max_form_bytes(api, client):
    form = {"content-type": "application/x-www-form-urlencoded"}
    declared = client.post("/login", content=b"username=" + b"a" * MAX_FORM_BYTES, headers=form)
    assert declared.status_code == 413 and declared.json()["error"] == "too_large"
    # No Content-Length (chunked): refused as soon as the limit is passed, the rest never read.
    status, body, read = call(api, "POST", "/login", form, [b"x" * 1000], endless=True)
    assert status == 413 and body["error"] == "too_large" and read == MAX_FORM_BYTES // 1000 + 1


PRIVILEGED = [
    ("POST", "/logout"),
    ("POST", "/models/3/promote"),
    ("POST", "/models/rollback"),
    ("POST", "/ops/alerts/1/approve"),
]


@pytest.mark.parametrize(("method", "path"), PRIVILEGED)
def test_privileged_routes_decide_who_asks_before_reading_the_body(api, method, path):
    form = {"content-type": "application/x-www-form-urlencoded", "content-length": "10"}
    status, body, read = call(api, method, path, form)
    assert (status, body["error"], read) == (401, "unauthorized", 0)

    secret, csrf = session_of("paula", "pathologist")
    cookie = {**form, "cookie": f"{COOKIE}={secret}"}
    if path != "/logout":  # anyone signed in may sign out
        status, body, read = call(api, method, path, {**cookie, "x-csrf-token": csrf})
        assert (status, body["error"], read) == (403, "forbidden", 0)
    # The CSRF token must come in the header: a form field would have to be read first.
    secret, csrf = session_of("erin", "engineer")
    cookie = {**form, "cookie": f"{COOKIE}={secret}"}
    status, body, read = call(api, method, path, cookie, [f"csrf_token={csrf}".encode()])
    assert (status, body["error"], read) == (403, "csrf", 0)


def test_a_correction_is_read_only_from_a_pathologist(api):
    """/feedback carries an upload: nobody but a signed-in pathologist gets it read."""
    form = {"content-type": "multipart/form-data; boundary=x", "content-length": "10"}
    status, body, read = call(api, "POST", "/feedback", form)
    assert (status, body["error"], read) == (401, "unauthorized", 0)
    secret, csrf = session_of("erin", "engineer")
    status, body, read = call(api, "POST", "/feedback", {**form, "cookie": f"{COOKIE}={secret}", "x-csrf-token": csrf})
    assert (status, body["error"], read) == (403, "forbidden", 0)


def test_promote_reads_at_most_max_form_bytes_once_the_engineer_is_known(api, monkeypatch):
    monkeypatch.setattr(model_routes, "promote_step", lambda *a: pytest.fail("no job may start"))
    secret, csrf = session_of("erin", "engineer")
    headers = {"cookie": f"{COOKIE}={secret}", "x-csrf-token": csrf, "content-type": "application/json"}
    status, body, read = call(api, "POST", "/models/3/promote", headers, [b" " * 1000], endless=True)
    assert status == 413 and body["error"] == "too_large" and read == MAX_FORM_BYTES // 1000 + 1


def test_usernames_over_64_characters_are_refused_before_any_lookup(client, monkeypatch):
    monkeypatch.setattr(Accounts, "authenticate", lambda *a: pytest.fail("looked up"))
    monkeypatch.setattr(Accounts, "sign_in_retry_after", lambda *a: pytest.fail("looked up"))
    refused = client.post("/login", data={"username": "a" * 65, "password": PASSWORD})
    assert refused.status_code == 400 and refused.json()["error"] == "bad_request"
    assert audit_entries("login_failed")[0]["detail"]["reason"] == "username_too_long"


# --- 2. nothing slow on the event loop ------------------------------------------------------------
def test_argon2_and_the_new_session_run_off_the_event_loop(client, monkeypatch):
    add_user("wendy", "pathologist", password=PASSWORD)
    on_loop: dict[str, bool] = {}

    def spy(name, original):
        def wrapped(*args, **kwargs):
            try:
                asyncio.get_running_loop()
                on_loop[name] = True
            except RuntimeError:
                on_loop[name] = False
            return original(*args, **kwargs)

        return wrapped

    for name in ("authenticate", "start_session"):
        monkeypatch.setattr(Accounts, name, spy(name, getattr(Accounts, name)))
    assert client.post("/login", data={"username": "wendy", "password": PASSWORD}).status_code == 200
    assert on_loop == {"authenticate": False, "start_session": False}


def wait_for_job(client, url: str, headers: dict) -> dict:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        job = client.get(url, headers=headers).json()
        if job["status"] in ("done", "failed"):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {url} did not finish: {job}")


def test_promote_is_a_job_answered_at_once_and_audited(client, monkeypatch):
    gate_may_finish = threading.Event()

    def gate(settings, params, version, force):
        assert gate_may_finish.wait(30)
        return GateDecision(True, ["better than the champion"])

    monkeypatch.setattr(model_routes, "promote_step", gate)
    add_user("erin", "engineer", password=PASSWORD)
    erin = {"Authorization": "Bearer " + stores.accounts().create_token("erin", "ci")}
    started = client.post("/models/7/promote", headers=erin)
    assert started.status_code == 202, started.text  # while the gate is still scoring
    url = started.json()["url"]
    assert started.headers["location"] == url and url == f"/models/jobs/{started.json()['job']}"
    assert client.get(url, headers=erin).json()["status"] in ("queued", "running")
    busy = client.post("/models/8/promote", headers=erin)
    assert busy.status_code == 409 and busy.json()["error"] == "job_running"
    gate_may_finish.set()
    job = wait_for_job(client, url, erin)
    assert (
        job["status"] == "done" and job["result"]["passed"] and job["result"]["reasons"] == ["better than the champion"]
    )
    (entry,) = audit_entries("promote")
    assert entry["actor"] == "erin" and entry["target"] == "7" and entry["detail"]["job"] == job["id"]
    assert client.get("/models/jobs/nope", headers=erin).status_code == 404
    secret, _ = session_of("paula", "pathologist")
    assert client.get(url, cookies={COOKIE: secret}).status_code == 403


def test_promote_without_a_prepared_manifest_is_a_failed_job_not_a_500(client, monkeypatch, lab):
    def gate(settings, params, version, force):
        # What promote_step raises (training.steps.load_manifest) when the data was never prepared.
        raise FileNotFoundError(f"{lab / 'prepared' / 'manifest.csv'} is missing: run `hematovision prepare` first")

    monkeypatch.setattr(model_routes, "promote_step", gate)
    add_user("erin", "engineer", password=PASSWORD)
    erin = {"Authorization": "Bearer " + stores.accounts().create_token("erin", "ci")}
    started = client.post("/models/7/promote", headers=erin, data={"force": "true"})
    assert started.status_code == 202
    job = wait_for_job(client, started.json()["url"], erin)
    assert job["status"] == "failed" and "manifest.csv is missing" in job["error"]
    (entry,) = audit_entries("promote_failed")
    assert entry["target"] == "7" and "manifest.csv" in entry["detail"]["error"] and entry["detail"]["force"]


# --- 3. the sign-in limit: in the lab database, bounded; proxies believed only when trusted -------
def test_sign_in_limit_lives_in_the_lab_database(client, lab):
    add_user("olga", "ops", password=PASSWORD)
    for _ in range(ATTEMPTS):
        assert client.post("/login", data={"username": "olga", "password": "wrong password!"}).status_code == 401
    limited = client.post("/login", data={"username": "olga", "password": PASSWORD})
    assert limited.status_code == 429 and int(limited.headers["retry-after"]) > 0
    # Another process (a second worker, a replica) reading the database sees the same failures.
    with sqlite3.connect(lab / "monitoring" / "lab.sqlite") as db:
        assert db.execute("SELECT COUNT(*) FROM login_failures WHERE username = 'olga'").fetchone()[0] == ATTEMPTS
    # Saying you come from elsewhere does not help: no proxy is trusted.
    forged = client.post(
        "/login", data={"username": "olga", "password": PASSWORD}, headers={"X-Forwarded-For": "203.0.113.9"}
    )
    assert forged.status_code == 429


def test_sign_in_failures_are_forgotten_past_the_window(lab):
    accounts, window = stores.accounts(), 300.0
    start = time.time()
    for i in range(200):  # made-up names
        accounts.sign_in_failed(f"nobody{i}", "198.51.100.7", window, now=start)
    assert accounts.sign_in_failures() == 200
    assert accounts.sign_in_retry_after("nobody1", "198.51.100.7", 1, window, now=start + 1) > 0
    accounts.sign_in_failed("late", "198.51.100.7", window, now=start + window + 1)
    assert accounts.sign_in_failures() == 1
    assert accounts.sign_in_retry_after("nobody1", "198.51.100.7", 1, window, now=start + window + 1) == 0


def request_from(peer: str, forwarded: str | None) -> Request:
    headers = [(b"x-forwarded-for", forwarded.encode())] if forwarded else []
    return Request({"type": "http", "method": "POST", "path": "/login", "headers": headers, "client": (peer, 1)})


def test_x_forwarded_for_is_believed_only_from_trusted_proxies(lab, monkeypatch):
    assert client_address(request_from("127.0.0.1", "203.0.113.9")) == "127.0.0.1"
    monkeypatch.setenv("HEMATOVISION_TRUSTED_PROXIES", '["127.0.0.1", "10.0.0.0/8"]')
    get_settings.cache_clear()
    assert client_address(request_from("127.0.0.1", "203.0.113.9")) == "203.0.113.9"
    # A client's own X-Forwarded-For entries are left of what the trusted proxies appended.
    assert client_address(request_from("127.0.0.1", "1.2.3.4, 203.0.113.9, 10.1.2.3")) == "203.0.113.9"
    assert client_address(request_from("192.0.2.1", "203.0.113.9")) == "192.0.2.1"  # not a proxy of ours
    assert client_address(request_from("127.0.0.1", "garbage")) == "127.0.0.1"


# --- 4. login CSRF --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({}, 200),  # curl, a script
        ({"Sec-Fetch-Site": "same-origin", "Origin": f"http://{HOST}"}, 200),  # our own page
        ({"Sec-Fetch-Site": "none"}, 200),
        ({"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),
        ({"Origin": "https://evil.example"}, 403),
        ({"Origin": "null"}, 403),
    ],
)
def test_cross_site_sign_ins_are_refused(client, headers, status):
    add_user("carl", "ops", password=PASSWORD)
    response = client.post("/login", data={"username": "carl", "password": PASSWORD}, headers=headers)
    assert response.status_code == status, response.text
    if status == 403:
        assert response.json()["error"] == "cross_site" and COOKIE not in response.cookies


# --- 5. tokens expire and are revoked one by one; sessions idle out; failures audited -------------
def test_tokens_are_listed_and_revoked_one_by_one(lab):
    add_user("lis", "pathologist", password=PASSWORD)
    first = CliRunner().invoke(cli, ["users", "token", "lis", "--name", "bridge"]).output.strip().splitlines()[-1]
    second = CliRunner().invoke(cli, ["users", "token", "lis", "--name", "backup"]).output.strip().splitlines()[-1]
    accounts = stores.accounts()
    assert accounts.token_user(first).username == "lis"
    listing = CliRunner().invoke(cli, ["users", "tokens", "lis"])
    assert listing.exit_code == 0 and "bridge" in listing.output and "backup" in listing.output
    assert first not in listing.output and first[3:20] not in listing.output  # never the secret
    tokens = {t["name"]: t for t in accounts.list_tokens("lis")}
    expires = datetime.fromisoformat(tokens["bridge"]["expires_at"])
    assert abs(expires - datetime.now(UTC) - timedelta(days=get_settings().lab.token_days)) < timedelta(minutes=1)
    assert tokens["bridge"]["last_used_at"] is not None and tokens["backup"]["last_used_at"] is None
    assert tokens["bridge"]["id"] in listing.output

    revoked = CliRunner().invoke(cli, ["users", "revoke-token", "lis", tokens["bridge"]["id"]])
    assert revoked.exit_code == 0, revoked.output
    assert accounts.token_user(first) is None and accounts.token_user(second).username == "lis"
    again = CliRunner().invoke(cli, ["users", "revoke-token", "lis", tokens["bridge"]["id"]])
    assert again.exit_code == 1
    assert audit_entries("revoke_token")[0]["detail"]["id"] == tokens["bridge"]["id"]


def test_tokens_expire(lab):
    add_user("lis", "pathologist", password=PASSWORD)
    accounts = stores.accounts()
    token = accounts.create_token("lis", "short", days=0.5 / 86400)  # half a second
    assert accounts.token_user(token) is not None
    time.sleep(0.6)
    assert accounts.token_user(token) is None
    assert accounts.list_tokens("lis")[0]["expired"]


def test_tokens_of_an_older_database_get_an_expiry(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:
        db.executescript(
            "CREATE TABLE users (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL, roles TEXT NOT NULL,"
            " disabled INTEGER NOT NULL DEFAULT 0, created_at TEXT NOT NULL);"
            "CREATE TABLE sessions (id_sha256 TEXT PRIMARY KEY, username TEXT NOT NULL, csrf_token TEXT NOT NULL,"
            " created_at TEXT NOT NULL, expires_at TEXT NOT NULL);"
            "CREATE TABLE api_tokens (token_sha256 TEXT PRIMARY KEY, username TEXT NOT NULL, name TEXT NOT NULL,"
            " created_at TEXT NOT NULL);"
            "INSERT INTO users VALUES ('old', 'x', 'ops', 0, '2020-01-01T00:00:00+00:00');"
            "INSERT INTO api_tokens VALUES ('ab' || hex(randomblob(31)), 'old', 'legacy', '2020-01-01T00:00:00+00:00');"
        )
    (token,) = Accounts(path).list_tokens("old")  # the test itself opens a throwaway database, not the project's
    assert token["expires_at"].startswith("2020-03-31") and token["expired"]


def test_sessions_idle_out_and_still_end_at_session_hours(lab):
    add_user("ivy", "pathologist", password=PASSWORD)
    accounts = stores.accounts()
    secret, _ = accounts.start_session(User("ivy", frozenset({"pathologist"})))
    db = sqlite3.connect(lab / "monitoring" / "lab.sqlite", isolation_level=None)

    def set_times(last_seen: timedelta, expires: timedelta) -> None:
        now = datetime.now(UTC)
        db.execute(
            "UPDATE sessions SET last_seen_at = ?, expires_at = ?",
            ((now - last_seen).isoformat(timespec="microseconds"), (now + expires).isoformat(timespec="microseconds")),
        )

    set_times(timedelta(minutes=20), timedelta(hours=1))
    assert accounts.session(secret, idle_minutes=30) is not None  # used 20 min ago: still on, and touched now
    last_seen = datetime.fromisoformat(db.execute("SELECT last_seen_at FROM sessions").fetchone()[0])
    assert datetime.now(UTC) - last_seen < timedelta(minutes=1)
    set_times(timedelta(minutes=31), timedelta(hours=1))
    assert accounts.session(secret, idle_minutes=30) is None  # idle too long
    set_times(timedelta(seconds=1), timedelta(seconds=-1))
    assert accounts.session(secret, idle_minutes=30) is None  # past session_hours
    db.close()


def test_failed_sign_ins_are_audited_with_the_address_never_the_password(client):
    add_user("fay", "ops", password=PASSWORD)
    secret_attempt = "hunter2 my secret attempt"
    assert client.post("/login", data={"username": "fay", "password": secret_attempt}).status_code == 401
    assert client.post("/login", data={"username": "ghost", "password": secret_attempt}).status_code == 401
    failed = audit_entries("login_failed")
    assert [(e["actor"], e["detail"]["reason"]) for e in failed] == [
        ("ghost", "bad_credentials"),
        ("fay", "bad_credentials"),
    ]
    assert all(e["detail"]["address"] == "testclient" for e in failed)
    assert secret_attempt not in json.dumps(stores.corrections().audit_log(1000))
