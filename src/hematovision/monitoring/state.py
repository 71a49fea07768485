"""The drift monitor's state: every window judged, the alerts raised, and checkpoints.

A small database of its own (``monitoring.state_db``, or lab mode's PostgreSQL; the ``monitoring``
migrations' tables) that the monitoring flow writes and the ops page reads, so showing the drift
status never touches MLflow or Evidently.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import bindparam, text

from hematovision.database import connect, utc_now


class MonitorState:
    def __init__(self, database: str | Path) -> None:
        """``database``: the monitoring state's sqlite file, or lab mode's PostgreSQL URL."""
        self.db = connect(database, "monitoring")

    def get(self, key: str, default: Any = None) -> Any:
        rows = self.db.query("SELECT value FROM monitor_kv WHERE key = :key", {"key": key})
        return json.loads(rows[0][0]) if rows else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute(
            "INSERT INTO monitor_kv (key, value) VALUES (:key, :value) "
            "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            {"key": key, "value": json.dumps(value)},
        )

    def _insert(self, table: str, row: dict[str, Any]) -> int:
        """Insert ``row`` and return the id the database gave it."""
        sql = f"INSERT INTO {table} ({', '.join(row)}) VALUES ({', '.join(':' + k for k in row)}) RETURNING id"
        with self.db.transaction() as db:
            return int(db.execute(text(sql), row).scalar_one())

    def add_window(self, row: dict[str, Any]) -> int:
        return self._insert(
            "windows",
            {
                **row,
                "model_version": str(row["model_version"]),
                "signals": json.dumps(row["signals"]),
                "drifting": int(row["drifting"]),
            },
        )

    def set_report(self, window_id: int, report: str) -> None:
        self.db.execute("UPDATE windows SET report = :report WHERE id = :id", {"report": report, "id": window_id})

    def windows(self, limit: int = 50, model_version: str | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM windows", {"limit": int(limit)}
        if model_version is not None:
            sql, params = sql + " WHERE model_version = :version", {**params, "version": str(model_version)}
        rows = self.db.rows(sql + " ORDER BY id DESC LIMIT :limit", params)
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
            "model_version": str(model_version),
            "message": message,
            "detail": json.dumps(detail),
            "status": status,
        }
        return self.alert(self._insert("alerts", row))

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        rows = self.db.rows("SELECT * FROM alerts WHERE id = :id", {"id": int(alert_id)})
        return {**rows[0], "detail": json.loads(rows[0]["detail"])} if rows else None

    def alerts(self, limit: int = 20, status: Sequence[str] | None = None) -> list[dict[str, Any]]:
        if status:
            sql = text("SELECT * FROM alerts WHERE status IN :status ORDER BY id DESC LIMIT :limit").bindparams(
                bindparam("status", expanding=True)
            )
            params: dict[str, Any] = {"status": list(status), "limit": int(limit)}
        else:
            sql, params = text("SELECT * FROM alerts ORDER BY id DESC LIMIT :limit"), {"limit": int(limit)}
        with self.db.reading() as db:
            rows = [dict(r) for r in db.execute(sql, params).mappings()]
        return [{**r, "detail": json.loads(r["detail"])} for r in rows]

    def update_alert(self, alert_id: int, **values: Any) -> None:
        if "detail" in values:
            values["detail"] = json.dumps(values["detail"])
        sets = ", ".join(f"{k} = :{k}" for k in values)
        self.db.execute(f"UPDATE alerts SET {sets} WHERE id = :alert_id", {**values, "alert_id": int(alert_id)})

    def approve(self, alert_id: int, user: str) -> dict[str, Any]:
        """An engineer's go-ahead for an alert awaiting approval (the next run starts retraining)."""
        with self.db.transaction() as db:
            # FOR UPDATE on PostgreSQL (sqlite's BEGIN IMMEDIATE already holds the write lock): two
            # engineers approving at once see one another's decision
            lock = "" if self.db.is_sqlite else " FOR UPDATE"
            status = db.execute(text("SELECT status FROM alerts WHERE id = :id" + lock), {"id": alert_id}).scalar()
            if status is None:
                raise KeyError(alert_id)
            if status != "awaiting_approval":
                raise ValueError(f"alert {alert_id} is {status}, not awaiting approval")
            db.execute(
                text("UPDATE alerts SET status = 'approved', decided_by = :user, decided_at = :now WHERE id = :id"),
                {"user": user, "now": utc_now(), "id": alert_id},
            )
        return self.alert(alert_id)

    def reports_beyond(self, keep: int) -> list[tuple[int, str]]:
        """(window id, report file) of every window with an HTML report but the newest ``keep``."""
        rows = self.db.query("SELECT id, report FROM windows WHERE report IS NOT NULL ORDER BY id DESC")
        return [(int(window_id), str(report)) for window_id, report in rows[keep:]]

    def clear_report(self, window_id: int) -> None:
        self.db.execute("UPDATE windows SET report = NULL WHERE id = :id", {"id": window_id})
