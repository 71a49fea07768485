"""Watching the prediction log: windows, drift status, alerts, and the trigger for retraining.

One monitoring run (:func:`run_monitoring`, called by ``flows/monitoring.py`` and
``hematovision monitor run``):

1. finds the champion and its reference profile (``drift.fetch_reference``);
2. cuts the new part of the prediction log into windows: consecutive blocks of
   ``monitor_window_size`` predictions, or consecutive ``monitor_window_minutes`` (a window is
   judged once, when complete; the checkpoint is the last row judged). **Only the champion's
   predictions count**: another version's embeddings live in another backbone's space and were not
   profiled by this reference; while the service moves to a new champion (a few seconds of alias
   polling) the old version's rows are left out, and a new champion starts with fresh windows;
3. checks each window with Evidently (``drift.check_window``), saves its HTML report, adds its
   snapshot to the Evidently workspace (a project with a dashboard panel per signal) and records it;
4. decides with :func:`should_retrain`: drift for ``drift_persistence`` consecutive windows, or
   ``retrain_min_corrections`` corrections since the champion was registered, raise an alert (one
   per drift episode, one per champion for corrections): logged, stored, POSTed to
   ``alert_webhook_url`` if set, and acted on per ``retrain_trigger``: ``auto`` runs the
   retraining flow now, ``approval`` waits for an engineer (``POST /ops/alerts/{id}/approve``; the
   next run starts it), ``off`` only alerts.

The state (windows, alerts, checkpoints) is a small sqlite file (``monitor_state_db``) that the
ops page (``ops_api.py``) reads without touching MLflow.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Collection, Sequence

import numpy as np
import pandas as pd

from hematovision.database import connect, rows_as_dicts, transaction, utc_now
from hematovision.settings import Settings, get_settings

logger = logging.getLogger("hematovision.monitoring.monitor")

PROJECT_NAME = "HematoVision drift"
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
    report        TEXT                    -- file name under monitor_reports_dir
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


class MonitoringError(RuntimeError):
    """A run that cannot check anything (no champion, no reference)."""


# --- the decision, as plain code ---------------------------------------------------------------
def should_retrain(drift_streak: int, new_corrections: int, *, persistence: int, min_corrections: int,
                   already_alerted: Collection[str] = ()) -> list[str]:
    """The reasons that newly call for retraining: ``"drift"`` when the last ``drift_streak``
    windows all drifted and that reaches ``persistence``, ``"corrections"`` when
    ``new_corrections`` reaches ``min_corrections``; a reason in ``already_alerted`` (an alert of
    this drift episode, of this champion) is not raised again."""
    reasons = []
    if drift_streak >= persistence and "drift" not in already_alerted:
        reasons.append("drift")
    if new_corrections >= min_corrections and "corrections" not in already_alerted:
        reasons.append("corrections")
    return reasons


# --- state -------------------------------------------------------------------------------------
class MonitorState:
    def __init__(self, db_path: Path) -> None:
        self.db = connect(Path(db_path), SCHEMA)

    def get(self, key: str, default: Any = None) -> Any:
        rows = self.db.execute("SELECT value FROM monitor_kv WHERE key = ?", (key,))
        return json.loads(rows[0][0]) if rows else default

    def put(self, key: str, value: Any) -> None:
        self.db.execute("INSERT INTO monitor_kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                        (key, json.dumps(value)))

    def add_window(self, row: dict[str, Any]) -> int:
        row = {**row, "signals": json.dumps(row["signals"]), "drifting": int(row["drifting"])}
        with transaction(self.db) as db:
            cursor = db.execute(f"INSERT INTO windows ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
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

    def add_alert(self, kind: str, model_version: str, message: str, detail: dict[str, Any], status: str) -> dict[str, Any]:
        row = {"created_at": utc_now(), "kind": kind, "model_version": model_version, "message": message,
               "detail": json.dumps(detail), "status": status}
        with transaction(self.db) as db:
            cursor = db.execute(f"INSERT INTO alerts ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})", tuple(row.values()))
        return self.alert(int(cursor.lastrowid))

    def alert(self, alert_id: int) -> dict[str, Any] | None:
        rows = rows_as_dicts(self.db, "SELECT * FROM alerts WHERE id = ?", (alert_id,))
        return {**rows[0], "detail": json.loads(rows[0]["detail"])} if rows else None

    def alerts(self, limit: int = 20, status: Sequence[str] | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM alerts", []
        if status:
            sql += f" WHERE status IN ({', '.join('?' * len(status))})"
            params = list(status)
        return [{**r, "detail": json.loads(r["detail"])} for r in rows_as_dicts(self.db, sql + " ORDER BY id DESC LIMIT ?", (*params, limit))]

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
            db.execute("UPDATE alerts SET status = 'approved', decided_by = ?, decided_at = ? WHERE id = ?",
                       (user, utc_now(), alert_id))
        return self.alert(alert_id)


def state_from_settings(settings: Settings | None = None) -> MonitorState:
    settings = settings or get_settings()
    return MonitorState(settings.path(settings.monitor_state_db))


# --- windows of the prediction log ----------------------------------------------------------------
def read_log(db_path: Path, model_version: str, after_rowid: int) -> pd.DataFrame:
    """The champion's predictions after a checkpoint, in log order, in the reference's layout."""
    from hematovision.monitoring.drift import profile_frame
    from hematovision.serving.prediction_log import decode_embedding

    if not Path(db_path).exists():
        return pd.DataFrame()
    conn = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=30)
    try:
        rows = conn.execute("SELECT rowid, created_at, label, confidence, embedding, image_stats FROM predictions "
                            "WHERE model_version = ? AND rowid > ? AND embedding IS NOT NULL ORDER BY rowid",
                            (str(model_version), int(after_rowid))).fetchall()
    finally:
        conn.close()
    if not rows:
        return pd.DataFrame()
    embeddings = np.stack([decode_embedding(r[4]) for r in rows])
    return profile_frame([json.loads(r[5]) for r in rows], [r[2] for r in rows], [r[3] for r in rows], embeddings,
                         {"rowid": [r[0] for r in rows], "created_at": [r[1] for r in rows]})


def complete_windows(rows: pd.DataFrame, settings: Settings, now: datetime | None = None) -> list[pd.DataFrame]:
    """The complete windows in ``rows`` (oldest first): blocks of ``monitor_window_size`` rows, or
    the rows of each elapsed ``monitor_window_minutes`` (those with too few rows are dropped)."""
    if rows.empty:
        return []
    if settings.monitor_window == "count":
        size = settings.monitor_window_size
        return [rows.iloc[i:i + size] for i in range(0, len(rows) - size + 1, size)]
    minutes = settings.monitor_window_minutes
    now = now or datetime.now(timezone.utc)
    times = pd.to_datetime(rows.created_at, utc=True, format="ISO8601")
    bucket = (times.astype("int64") // int(minutes * 60e9)).to_numpy()
    current = int(pd.Timestamp(now).value // int(minutes * 60e9))
    windows = []
    for key in sorted(set(bucket)):
        if key >= current:  # still filling
            break
        window = rows[bucket == key]
        windows.append(window)
    return windows


# --- alerts --------------------------------------------------------------------------------------
def post_webhook(url: str, alert: dict[str, Any], timeout: float = 5.0) -> str:
    """POST the alert as JSON; returns what happened (never raises: an alert must not be lost to a
    webhook that is down, it is stored and shown anyway)."""
    body = json.dumps({"source": "hematovision", "alert": alert}, default=str).encode()
    request = urllib.request.Request(url, data=body, method="POST", headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return f"sent: HTTP {response.status}"
    except Exception as error:  # noqa: BLE001 - any failure is reported on the alert
        logger.warning("alert webhook %s failed: %s", url, error)
        return f"failed: {error}"


def raise_alert(state: MonitorState, settings: Settings, kind: str, model_version: str, message: str,
                detail: dict[str, Any]) -> dict[str, Any]:
    status = {"auto": "approved", "approval": "awaiting_approval", "off": "open"}[settings.retrain_trigger]
    alert = state.add_alert(kind, model_version, message, detail, status)
    if status == "approved":
        state.update_alert(alert["id"], decided_by="auto", decided_at=utc_now())
    logger.warning("ALERT %s (model v%s): %s [%s]", kind, model_version, message, status)
    if settings.alert_webhook_url:
        state.update_alert(alert["id"], webhook=post_webhook(settings.alert_webhook_url, alert))
    return state.alert(alert["id"])


def retrain_approved(settings: Settings, state: MonitorState, **flow_options: Any) -> list[dict[str, Any]]:
    """One retraining run for every alert approved so far (a drift alert and a corrections alert
    approved together ask for the same thing: a model trained on the corrections)."""
    if settings.retrain_trigger == "off":
        return []
    approved = state.alerts(50, status=["approved"])
    if not approved:
        return []
    first = start_retraining(state, approved[0], **flow_options)
    for alert in approved[1:]:
        state.update_alert(alert["id"], status=first["status"],
                           detail={**alert["detail"], "retraining_of_alert": first["id"]})
    return [first] + [state.alert(a["id"]) for a in approved[1:]]


def start_retraining(state: MonitorState, alert: dict[str, Any], **flow_options: Any) -> dict[str, Any]:
    """The retraining entry point: ``flows.retraining.retraining_flow(**flow_options)`` when that
    module exists (``profile``/``params_file`` as for the training flow)."""
    try:
        from flows.retraining import retraining_flow
    except ModuleNotFoundError as error:
        if error.name not in ("flows.retraining", "flows"):
            raise
        logger.error("alert %s asks for retraining, but retraining is unavailable (no flows.retraining)", alert["id"])
        state.update_alert(alert["id"], status="retraining_unavailable")
        return state.alert(alert["id"])
    state.update_alert(alert["id"], status="retraining")
    try:
        result = retraining_flow(**flow_options)
    except Exception as error:  # noqa: BLE001 - recorded on the alert, the monitor keeps running
        logger.exception("retraining for alert %s failed", alert["id"])
        state.update_alert(alert["id"], status="retraining_failed", detail={**alert["detail"], "error": str(error)})
    else:
        state.update_alert(alert["id"], status="retrained",
                           detail={**alert["detail"], "retraining": json.loads(json.dumps(result, default=str))})
    return state.alert(alert["id"])


def corrections_since(settings: Settings, since: str | None) -> tuple[int, int]:
    """(all corrections, corrections recorded after ``since``) in the laboratory database."""
    from hematovision.lab.corrections import Corrections

    corrections = Corrections(settings.path(settings.lab_db), settings.path(settings.corrections_images_dir))
    total = corrections.count()
    if since is None:
        return total, total
    return total, int(corrections.db.execute("SELECT COUNT(*) FROM corrections WHERE created_at > ?", (since,))[0][0])


# --- the Evidently workspace ------------------------------------------------------------------------
def workspace_project(settings: Settings):
    """The workspace and its drift project, created with one dashboard panel per signal."""
    from evidently.sdk.models import PanelMetric
    from evidently.sdk.panels import line_plot_panel, text_panel
    from evidently.ui.workspace import Workspace

    path = settings.path(settings.monitor_workspace)
    path.mkdir(parents=True, exist_ok=True)
    workspace = Workspace(str(path))
    found = workspace.search_project(PROJECT_NAME)
    if found:
        return workspace, found[0]
    project = workspace.create_project(PROJECT_NAME, description="Each window of the champion's predictions against its reference profile.")
    dashboard = project.dashboard
    dashboard.add_panel(text_panel("HematoVision drift", "One point per window of the prediction log; thresholds in settings.py"))
    panels = [
        ("Image statistics: share of drifted statistics", "DriftedColumnsCount", {"value_type": "share"}, "share"),
        ("Embeddings: MMD on PCA of the reference", "EmbeddingsDrift", {}, "MMD"),
        ("Predictions: class mix (Jensen-Shannon distance)", "ValueDrift", {"column": "label"}, "JS distance"),
        ("Confidence (normed Wasserstein distance)", "ValueDrift", {"column": "confidence"}, "Wasserstein"),
    ]
    for title, metric, labels, legend in panels:
        dashboard.add_panel(line_plot_panel(title, [PanelMetric(legend=legend, metric=metric, metric_labels=labels)], size="half"))
    dashboard.add_panel(line_plot_panel("Image statistics, each (normed Wasserstein distance)", [
        PanelMetric(legend=column, metric="ValueDrift", metric_labels={"column": column})
        for column in ("brightness", "saturation", "hue", "sharpness", "dark_fraction")]))
    return workspace, project


# --- one run ---------------------------------------------------------------------------------------
def champion(settings: Settings) -> tuple[str, str]:
    """(version, registered-at ISO time) of the champion."""
    from hematovision.registry.registry import CHAMPION, Registry
    from hematovision.registry.tracking import configure_mlflow

    version = Registry(settings.registered_model, configure_mlflow(settings)).version_by_alias(CHAMPION)
    if version is None:
        raise MonitoringError("there is no champion to monitor: train one (`hematovision run`)")
    created = datetime.fromtimestamp(int(version.creation_timestamp) / 1000, tz=timezone.utc)
    return str(version.version), created.isoformat(timespec="milliseconds")


def check_windows(settings: Settings, state: MonitorState, version: str, now: datetime | None = None) -> list[dict[str, Any]]:
    """Judge every new complete window of the champion's predictions; returns the recorded windows."""
    from hematovision.monitoring.drift import DriftPolicy, check_window, fetch_reference

    checkpoint_key = f"checkpoint:v{version}"
    rows = read_log(settings.path(settings.predictions_db), version, state.get(checkpoint_key, 0))
    windows = complete_windows(rows, settings, now)
    if len(windows) > settings.monitor_max_windows_per_run:
        logger.warning("%d windows waiting; checking the newest %d", len(windows), settings.monitor_max_windows_per_run)
        windows = windows[-settings.monitor_max_windows_per_run:]
    if not windows:
        return []
    reference = fetch_reference(settings, version)
    policy = DriftPolicy.from_settings(settings)
    reports_dir = settings.path(settings.monitor_reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    workspace, project = workspace_project(settings)
    recorded = []
    for window in windows:
        if settings.monitor_window == "time" and len(window) < settings.monitor_min_window_size:
            state.put(checkpoint_key, int(window.rowid.iloc[-1]))
            logger.info("window of %d predictions ending %s skipped (fewer than %d)", len(window),
                        window.created_at.iloc[-1], settings.monitor_min_window_size)
            continue
        end_at = str(window.created_at.iloc[-1])
        result = check_window(reference, window, policy, timestamp=pd.Timestamp(end_at).to_pydatetime(),
                              name=f"v{version} {window.created_at.iloc[0]} .. {end_at}", tags=[f"v{version}"])
        row = {"checked_at": utc_now(), "model_version": version, "mode": settings.monitor_window,
               "first_rowid": int(window.rowid.iloc[0]), "last_rowid": int(window.rowid.iloc[-1]),
               "start_at": str(window.created_at.iloc[0]), "end_at": end_at, "n": int(len(window)),
               "drifting": result.drifting, "signals": result.signals}
        window_id = state.add_window(row)
        report = f"window-{window_id:06d}.html"
        result.snapshot.save_html(str(reports_dir / report))
        state.set_report(window_id, report)
        workspace.add_run(project.id, result.snapshot)
        state.put(checkpoint_key, row["last_rowid"])
        drifted = [name for name, signal in result.signals.items() if signal["drift"]]
        (logger.warning if result.drifting else logger.info)(
            "window %d (v%s, %d predictions, %s .. %s): %s%s", window_id, version, row["n"], row["start_at"], end_at,
            "DRIFTING" if result.drifting else "no drift", f" (signals: {', '.join(drifted)})" if drifted else "")
        recorded.append({**row, "id": window_id, "report": report})
    prune_reports(settings, state)
    return recorded


def prune_reports(settings: Settings, state: MonitorState) -> int:
    """Delete HTML reports beyond the newest ``monitor_keep_reports`` (Evidently inlines its whole
    viewer: ~4 MB a window); their windows keep their scores and their workspace snapshots."""
    old = state.db.execute("SELECT id, report FROM windows WHERE report IS NOT NULL ORDER BY id DESC LIMIT -1 OFFSET ?",
                           (settings.monitor_keep_reports,))
    folder = settings.path(settings.monitor_reports_dir)
    for window_id, report in old:
        (folder / report).unlink(missing_ok=True)
        state.db.execute("UPDATE windows SET report = NULL WHERE id = ?", (window_id,))
    return len(old)


def decide(settings: Settings, state: MonitorState, version: str, champion_since: str) -> list[dict[str, Any]]:
    """Raise the alerts :func:`should_retrain` calls for; returns the new alerts."""
    streak, since = state.drift_streak(version)
    total, new = corrections_since(settings, champion_since)
    alerted = set()
    for alert in state.alerts(200):
        if alert["model_version"] != version:
            continue
        if alert["kind"] == "corrections" or (alert["kind"] == "drift" and since and alert["detail"].get("since") == since):
            alerted.add(alert["kind"])
    raised = []
    for reason in should_retrain(streak, new, persistence=settings.drift_persistence,
                                 min_corrections=settings.retrain_min_corrections, already_alerted=alerted):
        if reason == "drift":
            latest = state.windows(1, version)[0]
            signals = [name for name, s in latest["signals"].items() if s["drift"]]
            message = (f"images drift from model v{version}'s reference for {streak} consecutive windows "
                       f"since {since} (signals: {', '.join(signals)})")
            detail = {"since": since, "windows": streak, "signals": signals, "report": latest["report"]}
        else:
            message = f"{new} new corrections since model v{version} was registered ({champion_since})"
            detail = {"new_corrections": new, "total_corrections": total, "since": champion_since}
        raised.append(raise_alert(state, settings, reason, version, message, detail))
    return raised


def run_monitoring(settings: Settings | None = None, now: datetime | None = None, act: bool = True,
                   retrain_options: dict[str, Any] | None = None) -> dict[str, Any]:
    """One monitoring run: check new windows, raise alerts, start approved retraining (``act``;
    ``retrain_options`` go to the retraining flow)."""
    settings = settings or get_settings()
    state = state_from_settings(settings)
    version, champion_since = champion(settings)
    state.put("champion", {"version": version, "registered_at": champion_since})
    windows = check_windows(settings, state, version, now)
    alerts = decide(settings, state, version, champion_since)
    retraining = retrain_approved(settings, state, **(retrain_options or {})) if act else []
    state.put("last_run", {"at": utc_now(), "windows": len(windows), "alerts": [a["id"] for a in alerts]})
    return {"model_version": version, "windows": windows, "alerts": alerts, "retraining": retraining,
            "status": ops_status(settings, state)}


def ops_status(settings: Settings | None = None, state: MonitorState | None = None, limit: int = 10) -> dict[str, Any]:
    """What the ops page shows: drifting or not, since when, which signals, the model version,
    corrections, the latest alerts and links to the latest windows' reports."""
    settings = settings or get_settings()
    state = state or state_from_settings(settings)
    champ = state.get("champion") or {}
    version = champ.get("version")
    latest = state.windows(limit, version) if version else []
    streak, since = state.drift_streak(version) if version else (0, None)
    total, new = corrections_since(settings, champ.get("registered_at"))
    current = latest[0] if latest else None
    return {
        "drifting": bool(current and current["drifting"]),
        "since": since,
        "drift_windows": streak,
        "signals": [name for name, s in current["signals"].items() if s["drift"]] if current else [],
        "model_version": version,
        "champion_registered_at": champ.get("registered_at"),
        "corrections": {"total": total, "since_champion": new, "alert_at": settings.retrain_min_corrections},
        "last_run": state.get("last_run"),
        "retrain_trigger": settings.retrain_trigger,
        "persistence": settings.drift_persistence,
        "alerts": [{**a, "report_url": f"/ops/reports/{a['detail']['report']}" if a["detail"].get("report") else None}
                   for a in state.alerts(limit)],
        "windows": [{k: w[k] for k in ("id", "start_at", "end_at", "n", "drifting", "signals")}
                    | {"report_url": f"/ops/reports/{w['report']}" if w["report"] else None} for w in latest],
    }

