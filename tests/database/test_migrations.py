"""Databases made before Alembic are upgraded in place with nothing lost, by `hematovision db upgrade`
or by the stores themselves on first use; migrations run once, on sqlite and on PostgreSQL."""

from __future__ import annotations

import hashlib
import os
import sqlite3
import stat
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from argon2 import PasswordHasher
from sqlalchemy import text
from typer.testing import CliRunner

from hematovision import database, migrations
from hematovision.cli import app as cli
from hematovision.lab.accounts import Accounts, User
from hematovision.lab.corrections import Corrections
from hematovision.monitoring.state import MonitorState
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.settings import get_settings

PASSWORD = "a long enough password"
SESSION_SECRET = "a session cookie's secret"
TOKEN = "hv_a token made before the upgrade"

# The schemas as the last version before Alembic created them (CREATE TABLE IF NOT EXISTS at start-up),
# copied verbatim from lab/accounts.py, lab/corrections.py (one file), serving/prediction_log.py and
# monitoring/state.py of that version.
LAB_SCHEMA = """
CREATE TABLE IF NOT EXISTS users (
    username      TEXT PRIMARY KEY,
    password_hash TEXT NOT NULL,
    roles         TEXT NOT NULL,          -- comma-separated, from ROLES
    disabled      INTEGER NOT NULL DEFAULT 0,
    created_at    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sessions (
    id_sha256    TEXT PRIMARY KEY,
    username     TEXT NOT NULL REFERENCES users(username),
    csrf_token   TEXT NOT NULL,           -- echoed by the page's forms (synchroniser token)
    created_at   TEXT NOT NULL,
    expires_at   TEXT NOT NULL,
    last_seen_at TEXT                     -- idle timeout; touched at most once per TOUCH_SECONDS
);
CREATE TABLE IF NOT EXISTS api_tokens (
    token_sha256 TEXT PRIMARY KEY,
    username     TEXT NOT NULL REFERENCES users(username),
    name         TEXT NOT NULL,
    created_at   TEXT NOT NULL,
    expires_at   TEXT,                    -- NULL only in databases older than expiry (see _migrate)
    last_used_at TEXT
);
CREATE TABLE IF NOT EXISTS login_failures (
    username TEXT NOT NULL,
    address  TEXT NOT NULL,
    at       REAL NOT NULL                -- Unix time: shared by processes and machines, unlike a monotonic clock
);
CREATE INDEX IF NOT EXISTS login_failures_key ON login_failures (username, address, at);
CREATE INDEX IF NOT EXISTS login_failures_at ON login_failures (at);
CREATE TABLE IF NOT EXISTS corrections (
    id              TEXT PRIMARY KEY,
    created_at      TEXT NOT NULL,
    reviewer        TEXT NOT NULL,
    image_sha256    TEXT NOT NULL,
    true_class      TEXT NOT NULL,
    predicted_class TEXT,              -- NULL when the image came without a prediction
    model_version   TEXT,
    prediction_id   TEXT,
    comment         TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS corrections_image ON corrections (image_sha256);
CREATE INDEX IF NOT EXISTS corrections_prediction ON corrections (prediction_id);
CREATE TABLE IF NOT EXISTS audit (
    seq    INTEGER PRIMARY KEY AUTOINCREMENT,
    at     TEXT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '{}'
);
"""
PREDICTIONS_SCHEMA = """
CREATE TABLE IF NOT EXISTS predictions (
    id            TEXT PRIMARY KEY,      -- uuid4 hex, returned to the client as prediction_id
    created_at    TEXT NOT NULL,         -- UTC ISO 8601
    model_version TEXT NOT NULL,
    label         TEXT NOT NULL,
    confidence    REAL NOT NULL,
    probabilities TEXT NOT NULL,         -- JSON {class: probability}
    needs_review  INTEGER NOT NULL,      -- 0/1
    embedding     BLOB,                  -- float16 little-endian, embedding_dim values
    embedding_dim INTEGER,
    image_stats   TEXT NOT NULL,         -- JSON, see imaging.image_stats
    latency_ms    REAL NOT NULL,
    image_sha256  TEXT NOT NULL,
    open_set_score REAL                  -- the model's open-set score (model/open_set.py); NULL without one
);
CREATE INDEX IF NOT EXISTS predictions_created_at ON predictions (created_at);
CREATE INDEX IF NOT EXISTS predictions_model_version ON predictions (model_version);
"""
MONITOR_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    checked_at    TEXT NOT NULL,
    model_version TEXT NOT NULL,
    mode          TEXT NOT NULL,          -- count | time
    first_rowid   INTEGER NOT NULL,
    last_rowid    INTEGER NOT NULL,
    start_at      TEXT NOT NULL,          -- created_at of the first / last prediction
    end_at        TEXT NOT NULL,
    n             INTEGER NOT NULL,
    drifting      INTEGER NOT NULL,
    signals       TEXT NOT NULL,          -- JSON, see drift.signals_of
    report        TEXT                    -- file name under the monitoring.reports_dir setting
);
CREATE TABLE IF NOT EXISTS alerts (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    created_at    TEXT NOT NULL,
    kind          TEXT NOT NULL,          -- drift | corrections
    model_version TEXT NOT NULL,
    message       TEXT NOT NULL,
    detail        TEXT NOT NULL DEFAULT '{}',
    status        TEXT NOT NULL,          -- open | awaiting_approval | approved | retraining | retrained | retraining_failed | retraining_unavailable
    decided_by    TEXT,
    decided_at    TEXT,
    webhook       TEXT                    -- what the webhook answered (NULL: none configured)
);
CREATE TABLE IF NOT EXISTS monitor_kv (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
EMBEDDING = np.linspace(-1, 1, 8).astype("<f2").tobytes()


def sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def old_database(path: Path, schema: str, *statements: tuple[str, tuple]) -> None:
    """A database as the earlier version left it: its schema, WAL, and rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA journal_mode = WAL")
        db.executescript(schema)
        for sql, params in statements:
            db.execute(sql, params)
    os.chmod(path, 0o644)  # the earlier version's files were the owner's alone; this one is not: tightened on open


def prediction_row(number: int, version: str = "3") -> tuple[str, tuple]:
    return (
        "INSERT INTO predictions VALUES (?, ?, ?, 'monocyte', 0.9, '{\"monocyte\": 0.9}', 0, ?, 8, '{}', 1.5, ?, NULL)",
        (f"p{number}", f"2026-11-0{number}T00:00:00.000+00:00", version, EMBEDDING, f"{number:064x}"),
    )


@pytest.fixture
def old_project(tmp_path, monkeypatch):
    """A project whose three databases the version before Alembic made, with rows in every table."""
    hashed = PasswordHasher().hash(PASSWORD)
    created, later = "2026-11-01T00:00:00.000000+00:00", "2099-01-01T00:00:00.000000+00:00"
    just_now = datetime.now(UTC).isoformat(timespec="microseconds")  # a session still in use
    old_database(
        tmp_path / "monitoring" / "lab.sqlite",
        LAB_SCHEMA,
        ("INSERT INTO users VALUES ('ann', ?, 'pathologist,admin', 0, ?)", (hashed, created)),
        ("INSERT INTO sessions VALUES (?, 'ann', 'csrf', ?, ?, NULL)", (sha256(SESSION_SECRET), just_now, later)),
        ("INSERT INTO api_tokens VALUES (?, 'ann', 'scanner', ?, ?, NULL)", (sha256(TOKEN), created, later)),
        ("INSERT INTO login_failures VALUES ('bob', '10.0.0.9', 1.5)", ()),
        (
            "INSERT INTO corrections VALUES ('c1', ?, 'ann', ?, 'monocyte', 'lymphocyte', '3', 'p1', 'looked twice')",
            (created, "ab" * 32),
        ),
        ("INSERT INTO audit (at, actor, action, target, detail) VALUES (?, 'ann', 'correct', 'c1', '{}')", (created,)),
        ("INSERT INTO audit (at, actor, action, target, detail) VALUES (?, 'ann', 'export', '', '{}')", (created,)),
    )
    old_database(
        tmp_path / "monitoring" / "predictions.sqlite",
        PREDICTIONS_SCHEMA,
        *(prediction_row(n) for n in (1, 2, 3, 4)),
        ("DELETE FROM predictions WHERE id = 'p2'", ()),  # a gap: seq must be the old rowid, not a renumbering
        ("PRAGMA user_version = 2", ()),
    )
    old_database(
        tmp_path / "monitoring" / "monitor.sqlite",
        MONITOR_SCHEMA,
        (
            "INSERT INTO windows (checked_at, model_version, mode, first_rowid, last_rowid, start_at, end_at, n,"
            " drifting, signals) VALUES (?, '3', 'count', 1, 3, ?, ?, 2, 1, '{}')",
            (created, created, created),
        ),
        (
            "INSERT INTO alerts (created_at, kind, model_version, message, status) VALUES (?, 'drift', '3', 'm', 'open')",
            (created,),
        ),
        ("INSERT INTO monitor_kv VALUES ('checkpoint:3', '3')", ()),
    )
    monkeypatch.setenv("HEMATOVISION_PROJECT_DIR", str(tmp_path))
    monkeypatch.delenv("HEMATOVISION_DATABASE_URL", raising=False)
    get_settings.cache_clear()
    yield tmp_path
    get_settings.cache_clear()


def test_db_upgrade_brings_the_earlier_versions_databases_up_to_date_with_nothing_lost(old_project):
    upgraded = CliRunner().invoke(cli, ["db", "upgrade"])
    assert upgraded.exit_code == 0, upgraded.output
    assert "lab: empty -> lab0002" in upgraded.output
    status = CliRunner().invoke(cli, ["db", "status"])
    assert status.exit_code == 0 and "predictions: predictions0002" in status.output, status.output
    again = CliRunner().invoke(cli, ["db", "upgrade"])
    assert again.exit_code == 0 and again.output.count("up to date") == 3, again.output

    lab, log_file = old_project / "monitoring" / "lab.sqlite", old_project / "monitoring" / "predictions.sqlite"
    accounts = Accounts(lab)
    assert accounts.authenticate("ann", PASSWORD) == User("ann", frozenset({"pathologist", "admin"}))
    assert accounts.session(SESSION_SECRET).csrf_token == "csrf"
    assert accounts.token_user(TOKEN).username == "ann"
    assert accounts.sign_in_failures() == 1

    corrections = Corrections(lab, old_project / "monitoring" / "corrections")
    (kept,) = corrections.all()
    assert (kept["id"], kept["comment"], kept["prediction_id"]) == ("c1", "looked twice", "p1")
    assert [e["seq"] for e in corrections.audit_log()] == [2, 1]
    corrections.audit("ann", "after_upgrade")
    assert corrections.audit_log()[0]["seq"] == 3  # the sequence carries on

    log = PredictionStore(log_file)
    assert log.count() == 3 and log.get("p4")["model_version"] == "3"
    state = MonitorState(old_project / "monitoring" / "monitor.sqlite")
    checkpoint = state.get("checkpoint:3")
    assert [r["created_at"][:10] for r in log.logged_after("3", checkpoint)] == ["2026-11-04"]  # rowid 4 = seq 4
    new = PredictionRecord("3", "monocyte", 0.9, {"monocyte": 0.9}, False, "cd" * 32, 1.0, embedding=np.ones(8))
    log.log(new)
    assert [r["rowid"] for r in log.logged_after("3", checkpoint)] == [4, 5]
    assert state.windows()[0]["last_rowid"] == 3 and state.alerts()[0]["status"] == "open"

    for path in (lab, log_file):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        with sqlite3.connect(path) as db:
            assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_stores_migrate_an_old_database_themselves_on_first_use(old_project):
    """The README's commands run no `db upgrade`: the first store to open a database migrates it."""
    log = PredictionStore(old_project / "monitoring" / "predictions.sqlite")
    assert sorted(r["rowid"] for r in log.logged_after("3", 0)) == [1, 3, 4]
    assert migrations.current(log.db, "predictions") == migrations.head("predictions")
    with log.db.reading() as connection:  # the earlier durability: NORMAL for the log, FULL for the lab
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 1
    lab = Corrections(old_project / "monitoring" / "lab.sqlite", old_project / "images")
    with lab.db.reading() as connection:
        assert connection.exec_driver_sql("PRAGMA synchronous").scalar() == 2
        assert connection.exec_driver_sql("PRAGMA busy_timeout").scalar() == database.BUSY_TIMEOUT_SECONDS * 1000
    assert lab.count() == 1


def test_a_prediction_log_older_than_open_set_scores_gains_the_column(tmp_path):
    older = PREDICTIONS_SCHEMA.replace(",\n    open_set_score REAL", "")
    assert "open_set_score" not in older
    old_database(
        tmp_path / "p.sqlite",
        older,
        (
            "INSERT INTO predictions VALUES ('p1', '2026-11-01', '3', 'monocyte', 0.9, '{}', 0, NULL, NULL, '{}', 1.0, ?)",
            ("ab" * 32,),
        ),
    )
    log = PredictionStore(tmp_path / "p.sqlite")
    assert log.get("p1")["open_set_score"] is None and log.count() == 1


def test_migrations_run_once_and_create_every_table_on_postgresql(postgres_url):
    target = database.get(postgres_url)
    for store in migrations.STORES:
        assert migrations.upgrade(target, store) == (None, migrations.head(store))
        assert migrations.upgrade(target, store) == (migrations.head(store), migrations.head(store))
    with target.reading() as connection:
        tables = set(connection.execute(text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")).scalars())
    assert tables == {
        "users",
        "sessions",
        "api_tokens",
        "login_failures",
        "corrections",
        "audit",
        "correction_images",
        "predictions",
        "prediction_images",
        "windows",
        "alerts",
        "monitor_kv",
        *(migrations.version_table(store) for store in migrations.STORES),
    }
