"""Drift monitoring, for real: the session's champion embeds real images (blood-cells TEST as the
training lab's own traffic, pbc-sample as a new site) into a real sqlite prediction log; the
monitoring flow (Prefect, no server) judges windows with real Evidently reports against the
champion's reference; alerts persist in sqlite, reach a local webhook and the ops page of the real
service, where roles are checked."""

from __future__ import annotations

import http.server
import json
import random
import re
import sys
import threading
from collections import defaultdict
from datetime import UTC
from pathlib import Path

import pytest
import requests
from typer.testing import CliRunner

from hematovision import CLASSES, stores
from hematovision.cli import app
from hematovision.lab.corrections import Corrections
from hematovision.monitoring.drift import REFERENCE_FILE, build_reference, fetch_reference, save_reference
from hematovision.monitoring.monitor import MonitorState, decide, run_monitoring, should_retrain, start_retraining
from hematovision.registry.registry import CHAMPION
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.settings import get_settings

from conftest import BLOOD_CELLS, PBC, free_port

WINDOW = 25
PASSWORD = "correct horse battery"


def one_per_cell(split: str, per_class: int | None, seed: int = 0) -> list[Path]:
    """One augmented copy of each original cell (production sees each cell once), shuffled."""
    rng = random.Random(seed)
    out = []
    for cls in CLASSES:
        by_cell = defaultdict(list)
        for path in sorted((BLOOD_CELLS / split / cls.upper()).glob("*.jpeg")):
            by_cell[re.match(r"_(\d+)_", path.name).group(1)].append(path)
        cells = sorted(by_cell, key=int)[:per_class]
        out += [rng.choice(by_cell[c]) for c in cells]
    rng.shuffle(out)
    return out


def new_site(n: int, seed: int = 0) -> list[Path]:
    paths = [p for c in CLASSES for p in sorted((PBC / c).glob("*.jpg"))]
    return random.Random(seed).sample(paths, n)


def log_images(store: PredictionStore, classifier, version: str, paths: list[Path], at=None) -> None:
    """What the service does per request: prepare (decode, statistics), crop -> backbone -> head, log."""
    from hematovision.serving.batcher import run_model
    from hematovision.serving.images import prepare_image

    prepared = [prepare_image(p.read_bytes()) for p in paths]
    answers = run_model(classifier, prepared)
    probabilities, embeddings = answers.probabilities, answers.embeddings
    records = []
    for image, probs, embedding, label in zip(prepared, probabilities, embeddings, answers.labels(classifier.classes)):
        best = int(probs.argmax())
        records.append(
            PredictionRecord(
                version,
                label,
                float(probs[best]),
                dict(zip(classifier.classes, map(float, probs))),
                bool(probs[best] < 0.7),
                image.sha256,
                1.0,
                image.stats,
                embedding,
                **({"created_at": at.isoformat(timespec="milliseconds")} if at else {}),
            )
        )
    store.log_many(records)


class Webhook:
    """A tiny HTTP server on 127.0.0.1 that keeps what is POSTed to it."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                received.append(json.loads(self.rfile.read(int(self.headers["content-length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", free_port()), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()


@pytest.fixture(scope="module")
def champion(trained):
    from hematovision.registry.packaging import load_classifier

    settings = get_settings()
    version = str(stores.registry(settings).version_by_alias(CHAMPION).version)
    return version, load_classifier(f"models:/{settings.registry.registered_model}@{CHAMPION}")


@pytest.fixture(scope="module")
def references(champion, tmp_path_factory):
    """The champion's reference as a full-size validation split would give it. The session's
    project validates on ~16 images (a handful of cells), too few to describe a lab; so the same
    profiling (drift.build_reference) runs on one image of each of ~90 TRAIN cells."""
    version, classifier = champion
    folder = tmp_path_factory.mktemp("references")
    save_reference(build_reference(classifier, one_per_cell("TRAIN", 25)), folder / f"v{version}")
    return folder


@pytest.mark.e2e
def test_training_logs_a_reference_with_the_model_version(project, champion, tmp_path):
    version, _ = champion
    settings = get_settings().with_changes(monitoring={"references_dir": tmp_path})
    reference = fetch_reference(settings, version)  # from the run the registered version points to
    assert (tmp_path / f"v{version}" / REFERENCE_FILE).exists()
    # labelled as the service labels answers: a class, or "unknown" beyond the open-set threshold
    assert len(reference) > 0 and set(reference.label) <= {*CLASSES, "unknown"}
    assert {"brightness", "hue", "saturation", "sharpness", "width", "confidence"} <= set(reference.columns)
    assert sum(c.startswith("emb_") for c in reference.columns) == 1280
    profile = json.loads((tmp_path / f"v{version}" / "profile.json").read_text())
    assert profile["n_images"] == len(reference) and profile["source"] == "validation split"


def test_should_retrain_on_persistent_drift_or_enough_corrections():
    policy = {"persistence": 3, "min_corrections": 100}
    assert should_retrain(2, 99, **policy) == []
    assert should_retrain(3, 0, **policy) == ["drift"]
    assert should_retrain(5, 100, **policy) == ["drift", "corrections"]
    assert should_retrain(4, 150, **policy, already_alerted={"drift", "corrections"}) == []


@pytest.mark.e2e
def test_monitoring_flow_flags_the_new_site_once_and_tells_ops(
    project, champion, references, prefect_harness, service_url, tmp_path, monkeypatch
):
    version, classifier = champion
    hook = Webhook()
    for key, value in {
        "PREDICTIONS_DB": tmp_path / "predictions.sqlite",
        "MONITOR_REFERENCES_DIR": references,
        "MONITOR_WINDOW": "count",
        "MONITOR_WINDOW_SIZE": WINDOW,
        "DRIFT_PERSISTENCE": 2,
        "RETRAIN_TRIGGER": "approval",
        "ALERT_WEBHOOK_URL": hook.url,
    }.items():
        monkeypatch.setenv(f"HEMATOVISION_{key}", str(value))
    get_settings.cache_clear()
    from flows.monitoring import monitoring_flow

    try:
        store = PredictionStore(tmp_path / "predictions.sqlite")
        # The training lab's own traffic: two windows of new cells (TEST), and ten rows of a third.
        log_images(store, classifier, version, one_per_cell("TEST", None)[: 2 * WINDOW + 10])
        first = monitoring_flow()
        assert [w["drifting"] for w in first["windows"]] == [False, False], first["windows"]
        assert first["alerts"] == [] and not first["status"]["drifting"]

        # A new site: it completes the third window and fills two more.
        log_images(store, classifier, version, new_site(2 * WINDOW + WINDOW - 10))
        second = monitoring_flow()
        flags = [w["drifting"] for w in second["windows"]]
        assert len(flags) == 3 and flags[1:] == [True, True], second["windows"]
        drifted = second["windows"][-1]["signals"]
        assert drifted["image_stats"]["drift"] and drifted["embeddings"]["drift"]
        assert len(second["alerts"]) == 1, second["alerts"]  # persistence: one alert per drift episode
        alert = second["alerts"][0]
        assert alert["kind"] == "drift" and alert["status"] == "awaiting_approval"
        assert alert["webhook"].startswith("sent")
        assert [body["alert"]["id"] for body in hook.received] == [alert["id"]]

        third = monitoring_flow()  # nothing new: no window, no second alert, nothing posted
        assert third["windows"] == [] and third["alerts"] == [] and len(hook.received) == 1
        status = third["status"]
        assert status["drifting"] and status["model_version"] == version
        assert status["since"] == second["windows"][0 if flags[0] else 1]["start_at"]
        assert {"image_stats", "embeddings"} <= set(status["signals"])
        reports = [w["report_url"] for w in status["windows"]]
        assert all(reports) and len(set(reports)) == len(reports)
        workspace = Path(get_settings().path(get_settings().monitoring.workspace))
        assert workspace.is_dir() and any(workspace.rglob("*.json"))
    finally:
        hook.close()
        get_settings.cache_clear()
    check_ops_page(service_url, alert["id"], reports[0])


def add_user(name: str, *roles: str) -> str:
    args = ["users", "add", name, "--password-stdin"] + [a for r in roles for a in ("--role", r)]
    result = CliRunner().invoke(app, args, input=PASSWORD + "\n")
    assert result.exit_code == 0, result.output
    return CliRunner().invoke(app, ["users", "token", name, "--name", "test"]).output.strip().splitlines()[-1]


def check_ops_page(url: str, alert_id: int, report_url: str) -> None:
    tokens = {
        name: add_user(name, role)
        for name, role in (
            ("ops-oscar", "ops"),
            ("eng-ella", "engineer"),
            ("path-pia", "pathologist"),
            ("adm-ada", "admin"),
        )
    }
    auth = {name: {"Authorization": f"Bearer {token}"} for name, token in tokens.items()}
    assert requests.get(f"{url}/ops/status", timeout=30).status_code == 401
    assert requests.get(f"{url}/ops/status", headers=auth["path-pia"], timeout=30).status_code == 403
    for reader in ("ops-oscar", "eng-ella", "adm-ada"):
        status = requests.get(f"{url}/ops/status", headers=auth[reader], timeout=30)
        assert status.status_code == 200
    status = status.json()
    assert status["drifting"] and status["alerts"][0]["id"] == alert_id
    assert "total" in status["corrections"]

    report = requests.get(f"{url}{report_url}", headers=auth["ops-oscar"], timeout=30)
    assert report.status_code == 200 and report.headers["content-type"].startswith("text/html")
    assert "sandbox" in report.headers["content-security-policy"] and len(report.content) > 10_000
    assert requests.get(f"{url}{report_url}", timeout=30).status_code == 401
    for bad in (
        "..%2Fmonitor.sqlite",
        "..%2F..%2Fmonitoring%2Fmonitor.sqlite",
        "window-000001.html%00.txt",
        "%2Fetc%2Fpasswd",
        "window-1.html",
    ):
        assert requests.get(f"{url}/ops/reports/{bad}", headers=auth["ops-oscar"], timeout=30).status_code == 404, bad

    approve = f"{url}/ops/alerts/{alert_id}/approve"
    assert requests.post(approve, headers=auth["ops-oscar"], timeout=30).status_code == 403
    approved = requests.post(approve, headers=auth["eng-ella"], timeout=30)
    assert approved.status_code == 200 and approved.json()["alert"]["status"] == "approved"
    assert approved.json()["alert"]["decided_by"] == "eng-ella"
    assert requests.post(approve, headers=auth["eng-ella"], timeout=30).status_code == 409
    assert requests.post(f"{url}/ops/alerts/999999/approve", headers=auth["eng-ella"], timeout=30).status_code == 404
    page = requests.get(f"{url}/ui/ops.html", timeout=30)
    assert page.status_code == 200 and "ops.js" in page.text and "style.css" in page.text
    assert "/ops/status" in requests.get(f"{url}/ui/ops.js", timeout=30).text


@pytest.mark.e2e
def test_corrections_raise_one_alert_and_auto_trigger_calls_retraining(project, champion, tmp_path):
    version, _ = champion
    settings = get_settings().with_changes(
        lab={"lab_db": tmp_path / "lab.sqlite", "corrections_images_dir": tmp_path / "corrections"},
        monitoring={
            "state_db": tmp_path / "monitor.sqlite",
            "retrain_min_corrections": 2,
            "retrain_trigger": "auto",
            "alert_webhook_url": None,
        },
    )
    corrections = Corrections(settings.lab.lab_db, settings.lab.corrections_images_dir)
    state = MonitorState(settings.monitoring.state_db)
    first, second = sorted((BLOOD_CELLS / "TEST" / "MONOCYTE").glob("*.jpeg"))[:2]  # corrections must be images
    corrections.submit("pia", "monocyte", first.read_bytes())
    assert decide(settings, state, version, "2000-01-01T00:00:00+00:00") == []
    corrections.submit("pia", "eosinophil", second.read_bytes())
    [alert] = decide(settings, state, version, "2000-01-01T00:00:00+00:00")
    assert alert["kind"] == "corrections" and alert["status"] == "approved" and alert["webhook"] is None
    assert decide(settings, state, version, "2000-01-01T00:00:00+00:00") == []  # one per champion

    calls = []  # the monitor is handed its trigger (the retraining flow is tested on its own)
    done = start_retraining(state, alert, lambda: calls.append(1) or {"version": "99"})
    assert calls == [1] and done["status"] == "retrained" and done["detail"]["retraining"] == {"version": "99"}

    def broken() -> dict:
        raise RuntimeError("no worker")

    failed = start_retraining(state, state.add_alert("drift", version, "test", {}, "approved"), broken)
    assert failed["status"] == "retraining_failed" and failed["detail"]["error"] == "no worker"
    other = state.add_alert("drift", version, "test", {}, "approved")
    assert start_retraining(state, other, None)["status"] == "retraining_unavailable"  # no way to start it


@pytest.mark.e2e
def test_time_windows_judge_only_elapsed_windows_with_enough_predictions(project, champion, references, tmp_path):
    from datetime import datetime, timedelta

    version, classifier = champion
    settings = get_settings().with_changes(
        serving={"predictions_db": tmp_path / "predictions.sqlite"},
        lab={"lab_db": tmp_path / "lab.sqlite"},
        monitoring={
            "state_db": tmp_path / "monitor.sqlite",
            "references_dir": references,
            "reports_dir": tmp_path / "reports",
            "workspace": tmp_path / "workspace",
            "window": "time",
            "window_minutes": 60.0,
            "min_window_size": 10,
            "retrain_trigger": "off",
        },
    )
    store = PredictionStore(settings.serving.predictions_db)
    now = datetime.now(UTC)
    hour = now.replace(minute=0, second=0, microsecond=0)
    images = one_per_cell("TEST", 10)  # 30 cells
    log_images(store, classifier, version, images[:12], hour - timedelta(hours=2) + timedelta(minutes=5))  # judged
    log_images(store, classifier, version, images[12:17], hour - timedelta(minutes=30))  # too few: skipped
    log_images(store, classifier, version, images[17:24], now)  # this hour is still filling
    [window] = run_monitoring(settings, now=now)["windows"]
    assert (
        window["n"] == 12 and not window["drifting"] and (settings.monitoring.reports_dir / window["report"]).exists()
    )
    assert run_monitoring(settings, now=now)["windows"] == []

    log_images(store, classifier, version, images[24:29], now)
    settings = settings.with_changes(monitoring={"keep_reports": 1})
    [next_hour] = run_monitoring(settings, now=now + timedelta(hours=1))["windows"]  # this hour, once elapsed
    assert next_hour["n"] == 12
    assert sorted(p.name for p in settings.monitoring.reports_dir.iterdir()) == [
        next_hour["report"]
    ]  # older HTML pruned
    assert [w["report"] for w in MonitorState(settings.monitoring.state_db).windows()] == [next_hour["report"], None]


def start_monitor_ui(env: dict, port: int, host: str = "127.0.0.1", options: tuple[str, ...] = ()):
    """`hematovision monitor ui` (with ``options``) on ``host:port`` in its own process group, and its
    answer to ``/api/projects`` once it serves (None if it exited or never answered in 90 s)."""
    import subprocess
    import time

    ui = subprocess.Popen(
        [str(Path(sys.executable).parent / "hematovision"), "monitor", "ui", *options, "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline, projects = time.monotonic() + 90, None
    while time.monotonic() < deadline and ui.poll() is None:
        try:
            projects = requests.get(f"http://{host}:{port}/api/projects", timeout=5).json()
            break
        except (requests.ConnectionError, ValueError):
            time.sleep(0.5)
    return ui, projects


@pytest.mark.e2e
def test_monitor_ui_serves_the_workspace_on_localhost_without_telemetry(project, tmp_path):
    import os
    import signal
    import subprocess

    port = free_port()
    env = {**os.environ, "HEMATOVISION_MONITOR_WORKSPACE": str(tmp_path / "workspace")}
    env.pop("DO_NOT_TRACK", None)  # the command itself must switch evidently's telemetry off
    ui, projects = start_monitor_ui(env, port)
    try:
        assert projects is not None, ui.stdout.read().decode()[-3000:] if ui.poll() is not None else "no answer"
        assert [p["name"] for p in projects] == ["HematoVision drift"]
        environ = dict(
            item.split("=", 1) for item in Path(f"/proc/{ui.pid}/environ").read_text().split("\0") if "=" in item
        )
        assert environ.get("DO_NOT_TRACK") == "true"  # evidently's telemetry is off when DO_NOT_TRACK is set
        listening = subprocess.run(["ss", "-ltnp"], capture_output=True, text=True).stdout
        assert f"127.0.0.1:{port}" in listening and f"0.0.0.0:{port}" not in listening
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(30)
