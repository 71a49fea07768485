"""The drift monitor's state: every window judged, the alerts raised, and checkpoints.

A small database of its own (``monitoring.state_db``) that the monitoring flow writes and the ops
page reads, so showing the drift status never touches MLflow or Evidently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hematovision.database import connect, rows_as_dicts, transaction, utc_now

SCHEMA = """
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


class MonitorState:
    def __init__(self, db_path: Path) -> None:
        self.db = connect(Path(db_path), SCHEMA)

    def get(self, key: str, default: Any = None) -> Any:
        rows = self.db.execute("SELECT value FROM monitor_kv WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO monitor_kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
            (key, json.dumps(value)),
        )

    def add_window(self, row: dict[str, Any]) -> int:
        row = {**row, "signals": json.dumps(row["signals"]), "drifting": int(row["drifting"])}
        with transaction(self.db) as db:
            cursor = db.execute(
                f"INSERT INTO windows ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
            return int(cursor.lastrowid)

    def set_report(self, window_id: int, report: str) -> None:
        self.db.execute("UPDATE windows SET report = ? WHERE id = ?", (report, window_id))

    def windows(self, limit: int = 50, model_version: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM windows", []
        if model_version is not None:
            sql, params = sql + " WHERE model_version = ?", [model_version]
        rows = rows_as_dicts(self.db, sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        return [{**r, "drifting": bool(r["drifting"]), "signals": json.loads(r["signals"])} for r in rows]

    def drift_streak(self, model_version: str) -> tuple[int, str | None]:
        """How many of this version's latest windows drift in a row, and since when (first one's start)."""
        streak, since = 0, None
        for window in self.windows(1000, model_version):
            if not window["drifting"]:
                break
            streak, since = streak + 1, window["start_at"]
        return streak, since

    def add_alert(
        self, kind: str, model_version: str, message: str, detail: dict[str, Any], status: str
    ) -> dict[str, Any]:
        row = {
            "created_at": utc_now(),
            "kind": kind,
            "model_version": model_version,
            "message": message,
            "detail": json.dumps(detail),
            "status": status,
        }
        with transaction(self.db) as db:
            cursor = db.execute(
                f"INSERT INTO alerts ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values())
            )
        return self.alert(int(cursor.lastrowid))

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        rows = rows_as_dicts(self.db, "SELECT * FROM alerts WHERE id = ?", (alert_id,))
        return {**rows[0], "detail": json.loads(rows[0]["detail"])} if rows else None

    def alerts(self, limit: int = 20, status: Sequence[str] | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM alerts", []
        if status:
            sql += f" WHERE status IN ({', '.join('?' * len(status))})"
            params = list(status)
        return [
            {**r, "detail": json.loads(r["detail"])}
            for r in rows_as_dicts(self.db, sql + " ORDER BY id DESC LIMIT ?", (*params, limit))
        ]

    def update_alert(self, alert_id: int, **values: Any) -> None:
        if "detail" in values:
            values["detail"] = json.dumps(values["detail"])
        sets = ", ".join(f"{k} = ?" for k in values)
        self.db.execute(f"UPDATE alerts SET {sets} WHERE id = ?", (*values.values(), alert_id))

    def approve(self, alert_id: int, user: str) -> dict[str, Any]:
        """An engineer's go-ahead for an alert awaiting approval (the next run starts retraining)."""
        with transaction(self.db) as db:
            rows = db.execute("SELECT status FROM alerts WHERE id = ?", (alert_id,)).fetchall()
            if not rows:
                raise KeyError(alert_id)
            if rows[0][0] != "awaiting_approval":
                raise ValueError(f"alert {alert_id} is {rows[0][0]}, not awaiting approval")
            db.execute(
                "UPDATE alerts SET status = 'approved', decided_by = ?, decided_at = ? WHERE id = ?",
                (user, utc_now(), alert_id),
            )
        return self.alert(alert_id)

    def reports_beyond(self, keep: int) -> list[tuple[int, str]]:
        """(window id, report file) of every window with an HTML report but the newest ``keep``."""
        rows = self.db.execute(
            "SELECT id, report FROM windows WHERE report IS NOT NULL ORDER BY id DESC LIMIT -1 OFFSET ?", (keep,)
        )
        return [(int(window_id), str(report)) for window_id, report in rows]

    def clear_report(self, window_id: int) -> None:
        self.db.execute("UPDATE windows SET report = NULL WHERE id = ?", (window_id,))
