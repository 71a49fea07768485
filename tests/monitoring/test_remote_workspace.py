"""Lab mode's Evidently: every window's snapshot also reaches ops' Evidently UI service.

A real ``evidently ui`` process on 127.0.0.1 (its own workspace, a free port) stands for the ops
host; the session's champion embeds real images into a real prediction log and ``run_monitoring``
judges its windows. What the service holds is read back through its own HTTP API. Then the service
is stopped: the next run still judges its window, keeps the snapshot locally and records the miss."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
import test_monitoring
from test_monitoring import log_images, one_per_cell

from hematovision import stores
from hematovision.monitoring.monitor import run_monitoring
from hematovision.monitoring.workspace import PROJECT_NAME, REMOTE_STATE_KEY
from hematovision.serving.prediction_log import PredictionStore
from hematovision.settings import get_settings

from conftest import free_port

champion = test_monitoring.champion  # fixture: (version, classifier) of the session's champion
WINDOW = 10  # the smallest window the settings allow: each window costs a real Evidently report


def start_evidently_ui(workspace: Path, log: Path, timeout: float = 120) -> tuple[subprocess.Popen, str]:
    port = free_port()
    evidently = str(Path(sys.executable).parent / "evidently")
    args = [evidently, "ui", "--workspace", str(workspace), "--host", "127.0.0.1", "--port", str(port)]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        try:
            if requests.get(f"{url}/api/version", timeout=5).ok:
                return process, url
        except requests.ConnectionError:
            time.sleep(0.5)
    stop(process)
    pytest.fail(f"evidently ui did not answer on {url}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)


def lab_settings(tmp_path: Path, workspace_url: str):
    return get_settings().with_changes(
        serving={"predictions_db": tmp_path / "predictions.sqlite"},
        lab={"lab_db": tmp_path / "lab.sqlite"},
        monitoring={
            "state_db": tmp_path / "monitor.sqlite",
            "references_dir": tmp_path / "references",  # fetched from the champion's run
            "reports_dir": tmp_path / "reports",
            "workspace": tmp_path / "workspace",
            "workspace_url": workspace_url,
            "window": "count",
            "window_size": WINDOW,
            "retrain_trigger": "off",
        },
    )


def local_snapshot_names(settings) -> list[str]:
    workspace = stores.drift_workspace(settings)
    [project] = workspace.search_project(PROJECT_NAME)
    return sorted(workspace.get_run(project.id, run).name for run in workspace.list_runs(project.id))


@pytest.mark.e2e
def test_each_window_reaches_the_ops_evidently_service_and_a_down_service_loses_nothing(project, champion, tmp_path):
    version, classifier = champion
    ops, url = start_evidently_ui(tmp_path / "ops-workspace", tmp_path / "evidently-ui.log")
    try:
        settings = lab_settings(tmp_path, url)
        store = PredictionStore(settings.serving.predictions_db)
        images = one_per_cell("TEST", None)
        log_images(store, classifier, version, images[: 2 * WINDOW])
        first = run_monitoring(settings)
        assert len(first["windows"]) == 2
        assert all(w["remote"]["sent"] for w in first["windows"]), first["windows"]

        # What ops see, through the service's own API: one project, the dashboard, each window
        [remote_project] = requests.get(f"{url}/api/projects", timeout=30).json()
        assert remote_project["name"] == PROJECT_NAME
        snapshots = requests.get(f"{url}/api/projects/{remote_project['id']}/snapshots", timeout=30).json()
        names = sorted(s["name"] for s in snapshots)
        assert names == local_snapshot_names(settings) and len(names) == 2
        assert all(f"v{version}" in s["tags"] for s in snapshots)
        for window in first["windows"]:
            assert f"v{version} {window['start_at']} .. {window['end_at']}" in names
            assert window["remote"]["snapshot_url"].startswith(f"{url}/projects/{remote_project['id']}/reports/")
        dashboard = requests.get(f"{url}/api/v2/dashboards/{remote_project['id']}", timeout=30).json()
        assert len(dashboard["panels"]) == 6  # the same dashboard as the local workspace's
        status = first["status"]["remote_workspace"]
        assert status["last"]["sent"] and status["last"]["window"] == first["windows"][-1]["id"]
        assert status["missed_windows"] == []

        log_images(store, classifier, version, images[2 * WINDOW : 3 * WINDOW])
        second = run_monitoring(settings)  # the project is found again, not created twice
        assert [w["remote"]["sent"] for w in second["windows"]] == [True]
        assert [p["id"] for p in requests.get(f"{url}/api/projects", timeout=30).json()] == [remote_project["id"]]
        assert len(requests.get(f"{url}/api/projects/{remote_project['id']}/snapshots", timeout=30).json()) == 3
    finally:
        stop(ops)

    # The ops host is down: the run still judges the window, keeps it locally and records the miss.
    log_images(store, classifier, version, images[3 * WINDOW : 4 * WINDOW])
    third = run_monitoring(settings)
    [window] = third["windows"]
    assert not window["remote"]["sent"] and "Connection refused" in window["remote"]["error"], window["remote"]
    assert (settings.monitoring.reports_dir / window["report"]).exists()
    assert f"v{version} {window['start_at']} .. {window['end_at']}" in local_snapshot_names(settings)
    assert len(local_snapshot_names(settings)) == 4
    missed = stores.monitor_state(settings).get(REMOTE_STATE_KEY)
    assert missed["missed_windows"] == [window["id"]] and not missed["last"]["sent"]
    assert third["status"]["remote_workspace"] == missed


@pytest.mark.e2e
def test_a_workspace_url_that_is_not_an_evidently_service_is_recorded_not_fatal(project, champion, tmp_path):
    version, classifier = champion
    settings = lab_settings(tmp_path, "ftp://ops.example/workspace")
    log_images(
        PredictionStore(settings.serving.predictions_db), classifier, version, one_per_cell("TEST", None)[:WINDOW]
    )
    [window] = run_monitoring(settings)["windows"]
    assert not window["remote"]["sent"] and "not an http(s) URL" in window["remote"]["error"]
    assert local_snapshot_names(settings) == [f"v{version} {window['start_at']} .. {window['end_at']}"]


@pytest.mark.e2e
def test_monitor_ui_serves_the_local_workspace_on_the_address_ops_give(project, tmp_path):
    # 127.0.0.2 is another address of this machine (all of 127/8 is loopback): it shows the command
    # listens where it is told without opening a port to the network from a test.
    port = free_port()
    env = {**os.environ, "HEMATOVISION_MONITOR_WORKSPACE": str(tmp_path / "workspace")}
    ui, projects = test_monitoring.start_monitor_ui(env, port, "127.0.0.2", ("--host", "127.0.0.2"))
    try:
        assert projects is not None, ui.stdout.read().decode()[-3000:] if ui.poll() is not None else "no answer"
        assert [p["name"] for p in projects] == [PROJECT_NAME]
        listening = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        assert f"127.0.0.2:{port}" in listening and f"127.0.0.1:{port}" not in listening
    finally:
        stop(ui)
