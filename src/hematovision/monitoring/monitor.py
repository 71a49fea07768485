"""Watching the prediction log: windows, drift status, alerts, and the trigger for retraining.

One monitoring run (:func:`run_monitoring`, called by ``flows/monitoring.py`` and
``hematovision monitor run``):

1. finds the champion and its reference profile (``drift.fetch_reference``);
2. cuts the new part of the prediction log into windows: consecutive blocks of
   ``monitoring.window_size`` predictions, or consecutive ``monitoring.window_minutes`` (a window is
   judged once, when complete; the checkpoint is the last row judged). **Only the champion's
   predictions count**: another version's embeddings live in another backbone's space and were not
   profiled by this reference; while the service moves to a new champion (a few seconds of alias
   polling) the old version's rows are left out, and a new champion starts with fresh windows;
3. checks each window with Evidently (``drift.check_window``), saves its HTML report, adds its
   snapshot to the Evidently workspace (a project with a dashboard panel per signal; in lab mode
   also to ops' Evidently UI service: ``monitoring/workspace.py``) and records it;
4. decides with :func:`should_retrain`: drift for ``drift.persistence`` consecutive windows, or
   ``monitoring.retrain_min_corrections`` corrections since the champion was registered, raise an
   alert (one per drift episode, one per champion for corrections): logged, stored, POSTed to
   ``monitoring.alert_webhook_url`` if set, and acted on per ``monitoring.retrain_trigger``:
   ``auto`` starts retraining now, ``approval`` waits for an engineer
   (``POST /ops/alerts/{id}/approve``; the next run starts it), ``off`` only alerts.

How retraining starts is not decided here: the caller hands in a *trigger*, a callable that starts
it and returns what it did (``flows/monitoring.py`` hands in the retraining flow). The library never
imports the flows that orchestrate it.

The state (windows, alerts, checkpoints) is ``monitoring/state.py``; the ops page
(``api/ops_routes.py``) reads it without touching MLflow.
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Callable, Collection
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pandas as pd

from hematovision import stores
from hematovision.database import utc_now
from hematovision.monitoring.drift import DriftPolicy, check_window, fetch_reference, profile_frame
from hematovision.monitoring.state import MonitorState
from hematovision.monitoring.workspace import REMOTE_STATE_KEY, SnapshotSink
from hematovision.registry.registry import CHAMPION
from hematovision.serving.prediction_log import PredictionStore, decode_embedding
from hematovision.settings import Settings, get_settings

logger = logging.getLogger("hematovision.monitoring.monitor")

# Starts retraining and returns what it did (the flow's summary, or a deployment run's id).
RetrainingTrigger = Callable[[], Any]


class MonitoringError(RuntimeError):
    """A run that cannot check anything (no champion, no reference)."""


# --- the decision, as plain code ---------------------------------------------------------------
def should_retrain(
    drift_streak: int,
    new_corrections: int,
    *,
    persistence: int,
    min_corrections: int,
    already_alerted: Collection[str] = (),
) -> list[str]:
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


# --- windows of the prediction log ----------------------------------------------------------------
def read_log(log: PredictionStore, model_version: str, after_rowid: int) -> pd.DataFrame:
    """The champion's predictions after a checkpoint, in log order, in the reference's layout."""
    rows = log.logged_after(model_version, after_rowid)
    if not rows:
        return pd.DataFrame()
    embeddings = np.stack([decode_embedding(r["embedding"]) for r in rows])
    return profile_frame(
        [json.loads(r["image_stats"]) for r in rows],
        [r["label"] for r in rows],
        [r["confidence"] for r in rows],
        embeddings,
        {"rowid": [r["rowid"] for r in rows], "created_at": [r["created_at"] for r in rows]},
    )


def complete_windows(rows: pd.DataFrame, settings: Settings, now: datetime | None = None) -> list[pd.DataFrame]:
    """The complete windows in ``rows`` (oldest first): blocks of ``monitoring.window_size`` rows, or
    the rows of each elapsed ``monitoring.window_minutes`` (those with too few rows are dropped)."""
    if rows.empty:
        return []
    if settings.monitoring.window == "count":
        size = settings.monitoring.window_size
        return [rows.iloc[i : i + size] for i in range(0, len(rows) - size + 1, size)]
    minutes = settings.monitoring.window_minutes
    now = now or datetime.now(UTC)
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


def raise_alert(
    state: MonitorState, settings: Settings, kind: str, model_version: str, message: str, detail: dict[str, Any]
) -> dict[str, Any]:
    status = {"auto": "approved", "approval": "awaiting_approval", "off": "open"}[settings.monitoring.retrain_trigger]
    alert = state.add_alert(kind, model_version, message, detail, status)
    if status == "approved":
        state.update_alert(alert["id"], decided_by="auto", decided_at=utc_now())
    logger.warning("ALERT %s (model v%s): %s [%s]", kind, model_version, message, status)
    if settings.monitoring.alert_webhook_url:
        state.update_alert(alert["id"], webhook=post_webhook(settings.monitoring.alert_webhook_url, alert))
    return state.alert(alert["id"])


def retrain_approved(
    settings: Settings, state: MonitorState, trigger: RetrainingTrigger | None
) -> list[dict[str, Any]]:
    """One retraining run for every alert approved so far (a drift alert and a corrections alert
    approved together ask for the same thing: a model trained on the corrections)."""
    if settings.monitoring.retrain_trigger == "off":
        return []
    approved = state.alerts(50, status=["approved"])
    if not approved:
        return []
    first = start_retraining(state, approved[0], trigger)
    for alert in approved[1:]:
        state.update_alert(
            alert["id"], status=first["status"], detail={**alert["detail"], "retraining_of_alert": first["id"]}
        )
    return [first] + [state.alert(a["id"]) for a in approved[1:]]


def start_retraining(state: MonitorState, alert: dict[str, Any], trigger: RetrainingTrigger | None) -> dict[str, Any]:
    """Start retraining for an approved alert with ``trigger``; the outcome is recorded on the alert
    (``retraining_unavailable`` when the caller gave no trigger)."""
    if trigger is None:
        logger.error("alert %s asks for retraining, but this monitor was given no way to start it", alert["id"])
        state.update_alert(alert["id"], status="retraining_unavailable")
        return state.alert(alert["id"])
    state.update_alert(alert["id"], status="retraining")
    try:
        result = trigger()
    except Exception as error:
        logger.exception("retraining for alert %s failed", alert["id"])
        state.update_alert(alert["id"], status="retraining_failed", detail={**alert["detail"], "error": str(error)})
    else:
        state.update_alert(
            alert["id"],
            status="retrained",
            detail={**alert["detail"], "retraining": json.loads(json.dumps(result, default=str))},
        )
    return state.alert(alert["id"])


def corrections_since(settings: Settings, since: str | None) -> tuple[int, int]:
    """(all corrections, corrections recorded after ``since``) in the laboratory database."""
    corrections = stores.corrections(settings)
    total = corrections.count()
    return total, (total if since is None else corrections.count_since(since))


# --- one run ---------------------------------------------------------------------------------------
def champion(settings: Settings) -> tuple[str, str]:
    """(version, registered-at ISO time) of the champion."""
    version = stores.registry(settings).version_by_alias(CHAMPION)
    if version is None:
        raise MonitoringError("there is no champion to monitor: train one (`hematovision run`)")
    created = datetime.fromtimestamp(int(version.creation_timestamp) / 1000, tz=UTC)
    return str(version.version), created.isoformat(timespec="milliseconds")


def check_windows(
    settings: Settings, state: MonitorState, version: str, now: datetime | None = None
) -> list[dict[str, Any]]:
    """Judge every new complete window of the champion's predictions; returns the recorded windows."""
    checkpoint_key = f"checkpoint:v{version}"
    rows = read_log(stores.prediction_log(settings), version, state.get(checkpoint_key, 0))
    windows = complete_windows(rows, settings, now)
    if len(windows) > settings.monitoring.max_windows_per_run:
        logger.warning(
            "%d windows waiting; checking the newest %d", len(windows), settings.monitoring.max_windows_per_run
        )
        windows = windows[-settings.monitoring.max_windows_per_run :]
    if not windows:
        return []
    reference = fetch_reference(settings, version)
    policy = DriftPolicy.from_settings(settings)
    reports_dir = settings.path(settings.monitoring.reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    snapshots = SnapshotSink(settings, state)
    recorded = []
    for window in windows:
        if settings.monitoring.window == "time" and len(window) < settings.monitoring.min_window_size:
            state.put(checkpoint_key, int(window.rowid.iloc[-1]))
            logger.info(
                "window of %d predictions ending %s skipped (fewer than %d)",
                len(window),
                window.created_at.iloc[-1],
                settings.monitoring.min_window_size,
            )
            continue
        end_at = str(window.created_at.iloc[-1])
        result = check_window(
            reference,
            window,
            policy,
            timestamp=pd.Timestamp(end_at).to_pydatetime(),
            name=f"v{version} {window.created_at.iloc[0]} .. {end_at}",
            tags=[f"v{version}"],
        )
        row = {
            "checked_at": utc_now(),
            "model_version": version,
            "mode": settings.monitoring.window,
            "first_rowid": int(window.rowid.iloc[0]),
            "last_rowid": int(window.rowid.iloc[-1]),
            "start_at": str(window.created_at.iloc[0]),
            "end_at": end_at,
            "n": int(len(window)),
            "drifting": result.drifting,
            "signals": result.signals,
        }
        window_id = state.add_window(row)
        report = f"window-{window_id:06d}.html"
        result.snapshot.save_html(str(reports_dir / report))
        state.set_report(window_id, report)
        remote = snapshots.add(window_id, result.snapshot)
        state.put(checkpoint_key, row["last_rowid"])
        drifted = [name for name, signal in result.signals.items() if signal["drift"]]
        (logger.warning if result.drifting else logger.info)(
            "window %d (v%s, %d predictions, %s .. %s): %s%s",
            window_id,
            version,
            row["n"],
            row["start_at"],
            end_at,
            "DRIFTING" if result.drifting else "no drift",
            f" (signals: {', '.join(drifted)})" if drifted else "",
        )
        recorded.append({**row, "id": window_id, "report": report} | ({"remote": remote} if remote else {}))
    prune_reports(settings, state)
    return recorded


def prune_reports(settings: Settings, state: MonitorState) -> int:
    """Delete HTML reports beyond the newest ``monitoring.keep_reports`` (Evidently inlines its whole
    viewer in each); their windows keep their scores and their workspace snapshots."""
    old = state.reports_beyond(settings.monitoring.keep_reports)
    folder = settings.path(settings.monitoring.reports_dir)
    for window_id, report in old:
        (folder / report).unlink(missing_ok=True)
        state.clear_report(window_id)
    return len(old)


def decide(settings: Settings, state: MonitorState, version: str, champion_since: str) -> list[dict[str, Any]]:
    """Raise the alerts :func:`should_retrain` calls for; returns the new alerts."""
    streak, since = state.drift_streak(version)
    total, new = corrections_since(settings, champion_since)
    alerted = set()
    for alert in state.alerts(200):
        if alert["model_version"] != version:
            continue
        if alert["kind"] == "corrections" or (
            alert["kind"] == "drift" and since and alert["detail"].get("since") == since
        ):
            alerted.add(alert["kind"])
    raised = []
    for reason in should_retrain(
        streak,
        new,
        persistence=settings.drift.persistence,
        min_corrections=settings.monitoring.retrain_min_corrections,
        already_alerted=alerted,
    ):
        if reason == "drift":
            latest = state.windows(1, version)[0]
            signals = [name for name, s in latest["signals"].items() if s["drift"]]
            message = (
                f"images drift from model v{version}'s reference for {streak} consecutive windows "
                f"since {since} (signals: {', '.join(signals)})"
            )
            detail = {"since": since, "windows": streak, "signals": signals, "report": latest["report"]}
        else:
            message = f"{new} new corrections since model v{version} was registered ({champion_since})"
            detail = {"new_corrections": new, "total_corrections": total, "since": champion_since}
        raised.append(raise_alert(state, settings, reason, version, message, detail))
    return raised


def run_monitoring(
    settings: Settings | None = None, now: datetime | None = None, trigger: RetrainingTrigger | None = None
) -> dict[str, Any]:
    """One monitoring run: check new windows, raise alerts, start approved retraining with
    ``trigger`` (none given: alerts only). ``flows/monitoring.py`` runs the same steps as tasks."""
    settings = settings or get_settings()
    state = stores.monitor_state(settings)
    version, champion_since = champion(settings)
    state.put("champion", {"version": version, "registered_at": champion_since})
    windows = check_windows(settings, state, version, now)
    alerts = decide(settings, state, version, champion_since)
    retraining = retrain_approved(settings, state, trigger) if trigger is not None else []
    state.put("last_run", {"at": utc_now(), "windows": len(windows), "alerts": [a["id"] for a in alerts]})
    return {
        "model_version": version,
        "windows": windows,
        "alerts": alerts,
        "retraining": retraining,
        "status": ops_status(settings, state),
    }


def ops_status(settings: Settings | None = None, state: MonitorState | None = None, limit: int = 10) -> dict[str, Any]:
    """What the ops page shows: drifting or not, since when, which signals, the model version,
    corrections, the latest alerts and links to the latest windows' reports."""
    settings = settings or get_settings()
    state = state or stores.monitor_state(settings)
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
        "corrections": {"total": total, "since_champion": new, "alert_at": settings.monitoring.retrain_min_corrections},
        "last_run": state.get("last_run"),
        "retrain_trigger": settings.monitoring.retrain_trigger,
        "persistence": settings.drift.persistence,
        "remote_workspace": state.get(REMOTE_STATE_KEY) if settings.monitoring.workspace_url else None,
        "alerts": [
            {**a, "report_url": f"/ops/reports/{a['detail']['report']}" if a["detail"].get("report") else None}
            for a in state.alerts(limit)
        ],
        "windows": [
            {k: w[k] for k in ("id", "start_at", "end_at", "n", "drifting", "signals")}
            | {"report_url": f"/ops/reports/{w['report']}" if w["report"] else None}
            for w in latest
        ],
    }
