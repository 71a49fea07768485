"""The Evidently workspaces that keep every window's snapshot.

* The local workspace (``monitoring.workspace``) is the record: each window's snapshot is written
  there first, and ``hematovision monitor ui --host ... --port ...`` serves it.
* In lab mode ``monitoring.workspace_url`` names an Evidently UI service (``evidently ui`` on an ops
  host) and every snapshot is also sent there, into a project of the same name with the same
  dashboard, so ops open the windows from their own machine.

The service is a copy for people to look at, not a step of the monitoring: when it cannot be reached
the run goes on, the failure is logged and recorded (on the window, as ``remote``, and in the
monitoring state under :data:`REMOTE_STATE_KEY`: the last outcome and the windows that missed the
service, which the ops status shows); the window's snapshot is
still in the local workspace and its HTML report on the ops page. A snapshot that missed the service
is not sent again later.
"""

from __future__ import annotations

import logging
from typing import Any

from hematovision import stores
from hematovision.database import utc_now
from hematovision.monitoring.state import MonitorState
from hematovision.settings import Settings

logger = logging.getLogger("hematovision.monitoring.workspace")

PROJECT_NAME = "HematoVision drift"
REMOTE_STATE_KEY = "remote_workspace"
MISSED_KEPT = 100  # the newest windows whose snapshot did not reach the service, listed for ops


def drift_project(workspace):
    """The drift project in ``workspace`` (local or remote), created with one dashboard panel per
    signal the first time."""
    from evidently.sdk.models import PanelMetric  # heavy: Evidently loads only when a window is judged
    from evidently.sdk.panels import line_plot_panel, text_panel

    found = workspace.search_project(PROJECT_NAME)
    if found:
        return found[0]
    project = workspace.create_project(
        PROJECT_NAME, description="Each window of the champion's predictions against its reference profile."
    )
    dashboard = project.dashboard
    dashboard.add_panel(
        text_panel("HematoVision drift", "One point per window of the prediction log; thresholds in settings.py")
    )
    panels = [
        ("Image statistics: share of drifted statistics", "DriftedColumnsCount", {"value_type": "share"}, "share"),
        ("Embeddings: MMD on PCA of the reference", "EmbeddingsDrift", {}, "MMD"),
        ("Predictions: class mix (Jensen-Shannon distance)", "ValueDrift", {"column": "label"}, "JS distance"),
        ("Confidence (normed Wasserstein distance)", "ValueDrift", {"column": "confidence"}, "Wasserstein"),
    ]
    for title, metric, labels, legend in panels:
        dashboard.add_panel(
            line_plot_panel(title, [PanelMetric(legend=legend, metric=metric, metric_labels=labels)], size="half")
        )
    dashboard.add_panel(
        line_plot_panel(
            "Image statistics, each (normed Wasserstein distance)",
            [
                PanelMetric(legend=column, metric="ValueDrift", metric_labels={"column": column})
                for column in ("brightness", "saturation", "hue", "sharpness", "dark_fraction")
            ],
        )
    )
    return project


def workspace_project(settings: Settings):
    """The local workspace and its drift project."""
    workspace = stores.drift_workspace(settings)
    return workspace, drift_project(workspace)


class SnapshotSink:
    """Where one monitoring run puts its windows' snapshots: the local workspace, and the Evidently
    UI service when ``monitoring.workspace_url`` is set. Opened once per run, when a window is judged."""

    def __init__(self, settings: Settings, state: MonitorState) -> None:
        self.state = state
        self.local, self.project = workspace_project(settings)
        self.remote_url = settings.monitoring.workspace_url.strip()
        self.remote = self.remote_project = None
        self.remote_error: str | None = None
        if self.remote_url:
            try:
                self.remote = stores.remote_drift_workspace(settings)
                self.remote_project = drift_project(self.remote)
            except Exception as error:  # noqa: BLE001 - any failure to reach ops' copy is recorded, the run goes on
                self.remote = None
                self.lost_remote(error)

    def lost_remote(self, error: Exception) -> None:
        self.remote_error = f"{type(error).__name__}: {error}"
        logger.warning(
            "Evidently UI service %s unreachable (%s): snapshots stay in the local workspace only",
            self.remote_url,
            self.remote_error,
        )

    def add(self, window_id: int, snapshot) -> dict[str, Any] | None:
        """Keep one window's snapshot; returns what happened with the service's copy (None: no service)."""
        self.local.add_run(self.project.id, snapshot)
        if not self.remote_url:
            return None
        outcome: dict[str, Any] = {"url": self.remote_url, "window": window_id, "at": utc_now()}
        if self.remote is not None:
            try:
                sent = self.remote.add_run(self.remote_project.id, snapshot)
            except Exception as error:  # noqa: BLE001 - any failure to reach ops' copy is recorded, the run goes on
                self.remote = None  # the rest of this run's windows do not wait on it again
                self.lost_remote(error)
            else:
                outcome |= {"sent": True, "snapshot_url": sent.url}
        if "sent" not in outcome:
            outcome |= {"sent": False, "error": self.remote_error}
        record = self.state.get(REMOTE_STATE_KEY) or {}
        missed = record.get("missed_windows", []) + ([] if outcome["sent"] else [window_id])
        self.state.put(REMOTE_STATE_KEY, {"last": outcome, "missed_windows": missed[-MISSED_KEPT:]})
        return outcome
