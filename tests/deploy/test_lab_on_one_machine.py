"""A laboratory on one machine: lab mode's servers as processes, each "host" in a folder of its own.

What the hosts share is what a real deployment shares: one PostgreSQL server (the platform's
database and the tracking server's backend), ``mlflow server`` (the registry and the artifacts,
over HTTP), ``prefect server`` (deployments, schedules, runs), the DVC remote, and nothing else.
The training host is a project folder (git, DVC, a few real cells per class) with one process
worker; the two serving replicas are ``hematovision serve`` processes in empty folders of their
own, on two ports.

The story, in order, each step asserting what a laboratory would check:

1. a quick-profile model is trained by a run of the training deployment, on the worker;
2. both replicas serve it; predictions sent to both land in one log;
3. a pathologist signs in on replica A and corrects a prediction that replica B answered (its image
   too comes from the database); on replica B, with the same session, it has left the queue;
4. PostgreSQL stops under a stream of corrections: clear 503s meanwhile, the same processes carry
   on once it is back, and every acknowledged correction is there;
5. the monitoring deployment, on its schedule (the Prefect server's scheduler creates the run:
   what SQLAlchemy 2.1 broke, see pyproject.toml), flags the new site and starts the retraining
   deployment; the worker dies mid-retraining (the machine, not the run: the worker and the run's
   process are killed): the run is marked Crashed and the registry is unchanged;
6. a second worker runs retraining again; the gate promotes; both replicas answer with the new
   version, no request failing across the swap;
7. replica A is killed mid-stream: replica B keeps answering;
8. another machine pulls from the DVC remote (a shared folder here) exactly the data and
   corrections the new champion's lineage tags name: training and retraining pushed them.

It takes minutes (a training, two retrainings, a Crashed verdict after three missed heartbeats of
30 s); the waits below are liveness bounds, never measured durations.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest
import requests
import yaml

from flows.deployments import CRASH_SILENT_RUNS
from hematovision import CLASSES
from hematovision.api.process import free_port, start_service, stop_service
from hematovision.settings import ENV_PREFIX, TELEMETRY_OFF

from conftest import PBC, REPO, build_kaggle_subset, build_new_site_subset, quick_params
from lab_processes import BIN, api, prefect_server, wait_for
from postgres import PostgresServer, running_server

POOL = "hv-lab-pool"
MODEL = "hematovision-lab"
PASSWORD = "a long enough password"
FAR_AWAY = "30 1 29 2 *"  # a cron that is never due while the test runs
HEARTBEAT_SECONDS = 30  # Prefect's least: a dead worker's run is called Crashed after 3 of them
WINDOW = 10  # predictions per monitoring window (the least the setting allows)
PER_CLASS = 30  # new-site images corrected per class: what retraining learns the new site from, and its
# holdout (a quarter of them): fewer leave the gate's interval on the holdout too wide to call a win
LIVENESS = 600  # seconds: the longest any one step may take before the test gives up


def new_site(cls: str, first: int, count: int) -> list[tuple[str, bytes]]:
    """Images of the second laboratory (``pbc-sample``): the new site the monitor must notice."""
    return [(p.name, p.read_bytes()) for p in sorted((PBC / cls).iterdir())[first : first + count]]


def host_env(**settings: str) -> dict[str, str]:
    """A host's environment: nothing of this test process's settings (no HematoVision, MLflow or
    Prefect variable leaks in), telemetry off, plus what that host is configured with."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith((ENV_PREFIX, "PREFECT_")) and k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    }
    return {**env, **TELEMETRY_OFF, "PREFECT_LOGGING_LEVEL": "WARNING", **settings}


@dataclass
class Answer:
    ok: bool
    status: int | None
    version: str | None
    error: str = ""


@dataclass
class Stream:
    """Predictions sent one after another to one replica, as an instrument sends them, until stopped."""

    url: str
    token: str
    images: list[tuple[str, bytes]]
    answers: list[Answer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._send, daemon=True)

    def _send(self) -> None:
        with requests.Session() as session:
            session.headers["Authorization"] = f"Bearer {self.token}"
            i = 0
            while not self._stop.is_set():
                name, data = self.images[i % len(self.images)]
                i += 1
                try:
                    answer = session.post(f"{self.url}/predict", files={"image": (name, data)}, timeout=60)
                    ok = answer.status_code == 200
                    body = answer.json() if ok else {}
                    error = "" if ok else answer.text[:200]
                    self.answers.append(Answer(ok, answer.status_code, body.get("model_version"), error))
                except requests.RequestException as error:
                    self.answers.append(Answer(False, None, None, type(error).__name__))
                    time.sleep(0.2)  # a dead host refuses at once: do not spin

    def __enter__(self) -> Stream:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(90)

    def versions(self) -> list[str | None]:
        return [a.version for a in self.answers]

    def failures(self) -> list[Answer]:
        return [a for a in self.answers if not a.ok]


class Lab:
    """The processes of the test, stopped (killed if need be) whatever happens."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []

    def popen(self, name: str, command: list[str], cwd: Path, env: dict[str, str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        self.logs.append(log)
        with log.open("ab") as out:
            process = subprocess.Popen(
                [str(c) for c in command],
                cwd=cwd,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.processes.append(process)
        return process

    def wait(self, what: str, check, timeout: float = LIVENESS):
        return wait_for(what, check, timeout, self.logs)

    def stop_all(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                stop_service(process, kill=True)


@pytest.fixture
def postgres():
    """A PostgreSQL server of this test's own (it is stopped and started mid-test)."""
    with running_server() as server:
        yield server


def training_host(root: Path) -> Path:
    """The training machine's project: git + DVC, the quick recipe, a few real cells per class."""
    project = root / "training-host"
    project.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, project / name)
    params = quick_params()
    # The session's TEST is a handful of cells: one image is several points, so the TEST guard of
    # retraining is off here (its logic is tested in tests/registry/test_gate.py).
    params["retrain"].update(guard_tolerance=1.0, per_class_tolerance=1.0)
    (project / "params.yaml").write_text(yaml.safe_dump(params))
    shutil.copytree(REPO / "src", project / "src")  # dvc.yaml names the code as dependencies
    git = ["git", "-c", "user.name=lab", "-c", "user.email=lab@localhost"]
    for command in (
        ["git", "init", "-q"],
        [*git, "commit", "-q", "--allow-empty", "-m", "init"],
        [BIN / "dvc", "init", "-q"],
    ):
        subprocess.run(command, cwd=project, check=True, capture_output=True)
    return project


def registry_client(tracking_uri: str):
    """An MLflow client of the tracking server, as any other host opens one."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def champion(tracking_uri: str) -> tuple[str, list[str]]:
    """(the champion's version, every version) as the tracking server has them."""
    client = registry_client(tracking_uri)
    versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{MODEL}'"))
    return str(client.get_model_version_by_alias(MODEL, "champion").version), versions


def lineage_of(tracking_uri: str, version: str) -> dict[str, str]:
    return dict(registry_client(tracking_uri).get_model_version(MODEL, version).tags)


def run_state(base: str, run_id: str) -> dict:
    return api(base, f"/flow_runs/{run_id}")


def finished(base: str, run_id: str):
    run = run_state(base, run_id)
    return run if run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None


def check_the_deployments(base: str, deployments: dict[str, dict]) -> None:
    """What ``hematovision deploy`` registered, read back as any client would: the four deployments
    on the pool, training and retraining one at a time and started by hand, the crons in UTC, every
    run's heartbeat, and the automation that marks a dead worker's run Crashed."""
    assert set(deployments) == {"training", "retraining", "monitoring", "retention"}
    assert {d["work_pool_name"] for d in deployments.values()} == {POOL}
    for name in ("training", "retraining"):
        limit = deployments[name].get("global_concurrency_limit") or {}
        assert deployments[name]["concurrency_limit"] == 1 or limit.get("limit") == 1, deployments[name]
        assert not deployments[name]["schedules"]
    for name in ("monitoring", "retention"):
        (schedule,) = deployments[name]["schedules"]
        assert schedule["schedule"]["cron"] == FAR_AWAY and schedule["schedule"]["timezone"] == "UTC"
    heartbeat = {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT_SECONDS)}
    assert all(d["job_variables"]["env"] == heartbeat for d in deployments.values())
    (automation,) = api(base, "/automations/filter", {})
    assert automation["name"] == CRASH_SILENT_RUNS and automation["enabled"]
    assert automation["actions"][0]["type"] == "change-flow-run-state"
    assert automation["actions"][0]["state"] == "CRASHED"
    related = automation["trigger"]["match_related"]["prefect.resource.id"]
    assert sorted(related) == sorted(f"prefect.deployment.{d['id']}" for d in deployments.values())


def cli(env: dict[str, str], cwd: Path, *args: str, stdin: str = "") -> str:
    done = subprocess.run([BIN / "hematovision", *args], cwd=cwd, env=env, input=stdin, capture_output=True, text=True)
    assert done.returncode == 0, f"hematovision {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def sign_in(url: str) -> tuple[requests.Session, str]:
    """A pathologist's browser session on one replica: the cookie, and the CSRF token the pages send."""
    session = requests.Session()
    answer = session.post(f"{url}/login", data={"username": "rita", "password": PASSWORD}, timeout=30)
    assert answer.status_code == 200, answer.text
    return session, answer.json()["csrf_token"]


@pytest.mark.e2e
def test_a_laboratory_on_one_machine(tmp_path, postgres):
    lab = Lab(tmp_path)
    try:
        run_the_laboratory(lab, tmp_path, postgres)
    finally:
        lab.stop_all()


def run_the_laboratory(lab: Lab, root: Path, postgres: PostgresServer) -> None:
    # --- the shared servers: PostgreSQL, the tracking server on it, the Prefect server ------------
    database_url = postgres.new_database("hematovision")
    mlflow_port, prefect_port = free_port(), free_port()
    tracking = f"http://127.0.0.1:{mlflow_port}"
    (root / "mlflow-host").mkdir()
    lab.popen(
        "mlflow-server",
        [BIN / "mlflow", "server", "--backend-store-uri", postgres.new_database("mlflow")]
        + ["--serve-artifacts", "--artifacts-destination", root / "mlflow-host" / "artifacts"]
        + ["--host", "127.0.0.1", "--port", str(mlflow_port), "--workers", "1"],
        root / "mlflow-host",
        # job execution off: 2 processes instead of ~10 (shared/notes/stack.md)
        host_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"),
    )
    base = f"http://127.0.0.1:{prefect_port}/api"
    everywhere = {"HEMATOVISION_DATABASE_URL": database_url, "MLFLOW_TRACKING_URI": tracking, "PREFECT_API_URL": base}
    everywhere["HEMATOVISION_REGISTERED_MODEL"] = MODEL
    (root / "prefect-host").mkdir()
    prefect_env = host_env(
        PREFECT_HOME=str(root / "prefect-host"),
        PREFECT_API_URL=base,
        PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5",  # a new schedule's runs appear within seconds
    )
    with prefect_server(root / "prefect-host", prefect_port, prefect_env, scheduler=True) as prefect_log:
        lab.logs.append(prefect_log)
        lab.wait("the tracking server answering", lambda: requests.get(f"{tracking}/health", timeout=5).ok)

        # --- the training host: its project, the deployments, one worker ---------------------------
        project = training_host(root)
        upstream = build_kaggle_subset(root / "upstream" / "blood-cells")
        site = build_new_site_subset(root / "upstream" / "pbc")
        remote = root / "dvc-remote"  # what a shared mount or a bucket is to DVC
        worker_env = host_env(
            **everywhere,
            PREFECT_HOME=str(project / ".prefect"),
            PREFECT_WORKER_QUERY_SECONDS="1",
            HEMATOVISION_PROJECT_DIR=str(project),
            HEMATOVISION_DATA_SOURCE=str(upstream),
            HEMATOVISION_NEW_SITE_SOURCE=str(site),
            HEMATOVISION_DVC_REMOTE=str(remote),
            HEMATOVISION_DEPLOY_WORK_POOL=POOL,
            HEMATOVISION_DEPLOY_SOURCE=str(REPO),  # the code; the data is the training host's project
            HEMATOVISION_DEPLOY_MONITORING_CRON=FAR_AWAY,  # scheduled every minute once there is something to see
            HEMATOVISION_DEPLOY_PURGE_CRON=FAR_AWAY,
            HEMATOVISION_DEPLOY_RETRAIN_ON_WORKER="true",
            HEMATOVISION_DEPLOY_HEARTBEAT_SECONDS=str(HEARTBEAT_SECONDS),
            HEMATOVISION_MONITOR_WINDOW="count",
            HEMATOVISION_MONITOR_WINDOW_SIZE=str(WINDOW),
            HEMATOVISION_DRIFT_PERSISTENCE="1",
            HEMATOVISION_RETRAIN_TRIGGER="auto",
            KERAS_HOME=str(project / ".keras"),
        )
        cli(worker_env, project, "deploy", "--json")
        deployments = {d["name"]: d for d in api(base, "/deployments/filter", {})}
        check_the_deployments(base, deployments)
        worker_command = [BIN / "prefect", "worker", "start", "--pool", POOL, "--type", "process"]
        worker = lab.popen("worker-1", [*worker_command, "--name", "worker-1"], project, worker_env)

        # 1. Training, as a run of the training deployment on the worker.
        training = api(base, f"/deployments/{deployments['training']['id']}/create_flow_run", {})
        done = lab.wait("the training run finishing on the worker", lambda: finished(base, training["id"]))
        assert done["state_type"] == "COMPLETED", done["state"]
        assert done["work_pool_name"] == POOL
        first, versions = champion(tracking)
        assert versions == [first]
        assert not (project / "mlruns").exists()  # the registry and artifacts are the server's alone

        # --- the admin makes the accounts (in the shared database) -------------------------------
        admin_env = host_env(**everywhere)
        (root / "admin-host").mkdir()
        cli(
            admin_env,
            root / "admin-host",
            "users",
            "add",
            "rita",
            "--role",
            "pathologist",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        cli(
            admin_env,
            root / "admin-host",
            "users",
            "add",
            "microscope",
            "--role",
            "ops",
            "--password-stdin",
            stdin=PASSWORD + "\n",
        )
        token = (
            cli(admin_env, root / "admin-host", "users", "token", "microscope", "--name", "instrument")
            .strip()
            .splitlines()[-1]
        )

        # 2. Two replicas, each in an empty folder of its own; both serve the champion.
        def replica(name: str) -> tuple[subprocess.Popen, str]:
            home = root / f"replica-{name}"
            home.mkdir()
            env = host_env(
                **everywhere,
                HEMATOVISION_PROJECT_DIR=str(home),
                HEMATOVISION_ALIAS_POLL_SECONDS="1",
                HEMATOVISION_REVIEW_THRESHOLD="0.99",  # nearly every answer of the tiny model needs review
                BENTOML_HOME=str(home / "bentoml"),
                KERAS_HOME=str(home / ".keras"),
            )
            log = root / f"replica-{name}.log"
            lab.logs.append(log)
            server, url = start_service(home, log, env, timeout=LIVENESS)
            lab.processes.append(server)
            return server, url

        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            (server_a, url_a), (_, url_b) = pool.map(replica, ["a", "b"])
        for url in (url_a, url_b):
            assert requests.get(f"{url}/model", timeout=30).json()["version"] == first

        instrument = {"Authorization": f"Bearer {token}"}
        answered: dict[str, list[str]] = {url_a: [], url_b: []}
        for i, cls in enumerate(CLASSES):
            for name, data in new_site(cls, 0, WINDOW // 2 + 1):
                url = (url_a, url_b)[i % 2]
                answer = requests.post(f"{url}/predict", files={"image": (name, data)}, headers=instrument, timeout=60)
                assert answer.status_code == 200, answer.text
                answered[url].append(answer.json()["prediction_id"])
        sent = answered[url_a] + answered[url_b]
        with psycopg.connect(postgres.libpq_url("hematovision")) as db:
            logged = {row[0] for row in db.execute("SELECT id FROM predictions")}
        assert set(sent) <= logged  # one log, written by both hosts

        # 3. A pathologist signs in on replica A and corrects what replica B answered.
        session, csrf = sign_in(url_a)
        queue_a = {item["id"] for item in session.get(f"{url_a}/review/queue?limit=500", timeout=30).json()["items"]}
        from_b = next(i for i in answered[url_b] if i in queue_a)
        image = session.get(f"{url_a}/review/image/{from_b}", timeout=30)
        assert image.status_code == 200 and image.content  # kept by replica B, read from the database by A
        corrected = session.post(
            f"{url_a}/feedback",
            data={"prediction_id": from_b, "true_class": "monocyte"},
            headers={"X-CSRF-Token": csrf},
            timeout=30,
        )
        assert corrected.status_code == 201, corrected.text
        queue_b = {item["id"] for item in session.get(f"{url_b}/review/queue?limit=500", timeout=30).json()["items"]}
        assert from_b not in queue_b and queue_b  # the same session on B; the reviewed cell has left B's queue
        stats_b = session.get(f"{url_b}/feedback/stats", timeout=30).json()
        assert stats_b["per_model_version"] == {first: {"reviewed": 1, "confirmed": 0, "agreement": 0.0}} or (
            stats_b["overall"]["reviewed"] == 1
        ), stats_b  # B reports the correction made on A

        def correct(url: str, cls: str, name: str, data: bytes) -> requests.Response:
            return session.post(
                f"{url}/feedback",
                data={"true_class": cls, "comment": "lab test"},
                files={"image": (name, data)},
                headers={"X-CSRF-Token": csrf},
                timeout=30,
            )

        # 4. PostgreSQL stops and comes back under a stream of corrections on replica B.
        acknowledged: list[str] = []
        refused: list[requests.Response] = []
        stop_writing = threading.Event()
        stream_images = [(cls, *image) for cls in CLASSES for image in new_site(cls, 10, PER_CLASS)]

        def pathologist_at_work() -> None:
            i = 0
            while not stop_writing.is_set():
                cls, name, data = stream_images[i % len(stream_images)]
                i += 1
                try:
                    answer = correct(url_b, cls, name, data)
                except requests.RequestException:
                    continue
                if answer.status_code == 201:
                    acknowledged.append(answer.json()["id"])
                else:
                    refused.append(answer)
                    time.sleep(0.2)

        writer = threading.Thread(target=pathologist_at_work, daemon=True)
        writer.start()
        try:
            lab.wait("corrections acknowledged before the outage", lambda: len(acknowledged) >= len(stream_images))
            postgres.stop()
            lab.wait("a correction refused while PostgreSQL is down", lambda: refused)
            during = len(acknowledged)
            postgres.start()
            lab.wait("corrections acknowledged after PostgreSQL is back", lambda: len(acknowledged) >= during + 5)
        finally:
            stop_writing.set()
            writer.join(60)
        assert {r.status_code for r in refused} == {503}, [r.text for r in refused[:3]]
        assert {r.json()["error"] for r in refused} == {"database_unavailable"}
        with psycopg.connect(postgres.libpq_url("hematovision")) as db:
            stored = {row[0] for row in db.execute("SELECT id FROM corrections")}
        assert set(acknowledged) <= stored  # nothing acknowledged was lost
        for url in (url_a, url_b):  # the same processes answer again: no restart
            answer = requests.post(
                f"{url}/predict", files={"image": stream_images[0][1:]}, headers=instrument, timeout=60
            )
            assert answer.status_code == 200, answer.text

        # 5. The monitor, on its schedule, flags the new site and starts retraining on the worker;
        #    the worker's machine dies mid-retraining.
        cli({**worker_env, "HEMATOVISION_DEPLOY_MONITORING_CRON": "* * * * *"}, project, "deploy", "--json")

        def retraining_runs() -> list[dict]:
            body = {"flow_runs": {"deployment_id": {"any_": [deployments["retraining"]["id"]]}}}
            return sorted(api(base, "/flow_runs/filter", body), key=lambda r: r["created"])

        def scheduled_monitoring_runs() -> list[dict]:
            body = {"flow_runs": {"deployment_id": {"any_": [deployments["monitoring"]["id"]]}}}
            return [r for r in api(base, "/flow_runs/filter", body) if r["auto_scheduled"] and r["start_time"]]

        lab.wait("a scheduled monitoring run starting on the worker", scheduled_monitoring_runs)
        # One scheduled run is enough: no more monitoring until the end (a second alert would start
        # a second retraining and muddle what the replicas must answer with).
        api(base, f"/deployments/{deployments['monitoring']['id']}", {"paused": True}, method="PATCH")
        started = lab.wait(
            "the retraining run the monitor started, running",
            lambda: [r for r in retraining_runs() if r["state_type"] == "RUNNING"],
        )
        assert started[0]["tags"] and "triggered-by-monitor" in started[0]["tags"], started[0]
        dying = started[0]
        stop_service(worker, kill=True)  # the worker and the run's own process: the machine died
        crashed = lab.wait(
            "the dead worker's run marked Crashed",
            lambda: run_state(base, dying["id"])["state_type"] == "CRASHED" and run_state(base, dying["id"]),
            timeout=4 * 3 * HEARTBEAT_SECONDS,
        )
        assert "heartbeat" in crashed["state"]["message"], crashed["state"]
        assert champion(tracking) == (first, versions)  # the registry is unchanged: nothing half-done

        # 6. Another worker; retraining again (as an engineer's approval starts it) while both
        #    replicas answer a stream; the gate promotes, both follow, no request fails.
        lab.popen("worker-2", [*worker_command, "--name", "worker-2"], project, worker_env)
        streams = [
            Stream(url, token, new_site(cls, 30, 3)) for url, cls in ((url_a, "lymphocyte"), (url_b, "neutrophil"))
        ]
        with contextlib.ExitStack() as running:
            for stream in streams:
                running.enter_context(stream)
            again = api(base, f"/deployments/{deployments['retraining']['id']}/create_flow_run", {})
            done = lab.wait("the second retraining run finishing", lambda: finished(base, again["id"]))
            assert done["state_type"] == "COMPLETED", done["state"]
            promoted, now = champion(tracking)
            assert promoted != first and promoted in now, "the gate did not promote the retrained model"
            lab.wait(
                "both replicas answering with the new version",
                lambda: all(s.versions()[-3:] == [promoted] * 3 for s in streams),
            )
        for stream in streams:
            assert not stream.failures(), stream.failures()[:3]
            assert stream.versions()[0] == first  # the stream straddled the swap

        # 7. Replica A dies mid-stream; replica B keeps answering.
        streams = [Stream(url, token, new_site("eosinophil", 40, 3)) for url in (url_a, url_b)]
        with streams[0], streams[1]:
            lab.wait("both replicas answering", lambda: all(s.answers for s in streams))
            stop_service(server_a, kill=True)
            answered_then = len(streams[1].answers)
            lab.wait("replica B answering after A died", lambda: len(streams[1].answers) >= answered_then + 5)
        assert streams[0].failures()  # A is gone: its instrument sees it
        assert not streams[1].failures(), streams[1].failures()[:3]
        assert set(streams[1].versions()) == {promoted}

        # 8. Another machine pulls exactly the data and corrections the new champion was trained on.
        other = root / "another-host"
        other.mkdir()
        for command in (["git", "init", "-q"], [BIN / "dvc", "init", "-q"]):
            subprocess.run(command, cwd=other, check=True, capture_output=True)
        other_env = host_env(**everywhere, HEMATOVISION_PROJECT_DIR=str(other), HEMATOVISION_DVC_REMOTE=str(remote))
        cli(other_env, other, "data", "pull", "--model-version", promoted)
        lineage = lineage_of(tracking, promoted)
        assert lineage["corrections_hash"] not in ("", "unknown") and lineage["data_hash"] not in ("", "unknown")
        for folder in ("data", "corrections"):
            pulled = sorted(p.relative_to(other / folder) for p in (other / folder).rglob("*") if p.is_file())
            trained_on = sorted(p.relative_to(project / folder) for p in (project / folder).rglob("*") if p.is_file())
            assert pulled and pulled == trained_on, folder
