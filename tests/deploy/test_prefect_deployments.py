"""Lab mode's orchestration: `hematovision deploy` against a real `prefect server`, a run on a real worker.

A Prefect server on a free 127.0.0.1 port with its own PREFECT_HOME; ``hematovision deploy``
registers the four deployments and creates the work pool; one process worker polls it; a run of the
retention-purge deployment (the cheap one) must complete on that worker, in the worker's own
settings (its own project folder). The schedules and the one-at-a-time limits are read back from the
server's REST API, as any client would. The server's scheduler is off there, so nothing starts on its
own while that test runs. That a schedule produces runs on a worker (what SQLAlchemy 2.1 broke in
prefect 3.8.8: see pyproject.toml) is checked by the laboratory test (``test_lab_on_one_machine.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from flows.deployments import CRASH_SILENT_RUNS, plan, start_retraining_deployment
from flows.monitoring import retraining_trigger
from flows.retraining import retraining_flow
from hematovision.settings import ENV_PREFIX, TELEMETRY_OFF, Settings

from conftest import REPO, free_port, stop_service
from lab_processes import BIN, api, prefect_server, wait_for

POOL = "hv-test-pool"
MONITORING_CRON = "0 0 29 2 *"  # far away: nothing is due while the test runs
PURGE_CRON = "30 1 29 2 *"


def lab_env(tmp_path: Path, base: str, **settings: str) -> dict[str, str]:
    """The environment of every process of a test: its own PREFECT_HOME and server, no settings leaking in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((ENV_PREFIX, "PREFECT_"))}
    env.update(
        {
            **TELEMETRY_OFF,
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_API_URL": base,
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "HEMATOVISION_DEPLOY_WORK_POOL": POOL,
            "HEMATOVISION_DEPLOY_SOURCE": str(REPO),  # the code; the data is the worker's project folder
            "HEMATOVISION_DEPLOY_MONITORING_CRON": MONITORING_CRON,
            "HEMATOVISION_DEPLOY_PURGE_CRON": PURGE_CRON,
            **settings,
        }
    )
    return env


def deploy(tmp_path: Path, env: dict[str, str]) -> dict[str, dict]:
    """`hematovision deploy` as an operator runs it; the deployments as the server has them, by name."""
    deployed = subprocess.run(
        [BIN / "hematovision", "deploy", "--json"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr
    assert json.loads(deployed.stdout)["work_pools_created"] == [POOL]
    return {d["name"]: d for d in api(env["PREFECT_API_URL"], "/deployments/filter", {})}


def test_the_plan_follows_the_settings():
    settings = Settings().with_changes(
        deploy={"work_pool": "cpu", "training_work_pool": "gpu", "source": "https://git.lab/hv.git"}
    )
    by_name = {d["deployment"]: d for d in plan(settings)}
    assert by_name["hematovision-training/training"]["work_pool"] == "gpu"
    assert by_name["hematovision-retraining/retraining"]["concurrency_limit"] == 1
    assert by_name["hematovision-monitoring/monitoring"]["work_pool"] == "cpu"
    assert by_name["hematovision-monitoring/monitoring"]["cron"] == settings.deploy.monitoring_cron
    assert by_name["hematovision-retention/retention"]["cron"] == settings.deploy.purge_cron
    assert {d["source"] for d in by_name.values()} == {"https://git.lab/hv.git"}
    assert {d["heartbeat_seconds"] for d in by_name.values()} == {settings.deploy.heartbeat_seconds}
    embedded = Settings().with_changes(deploy={"training_work_pool": ""})
    assert {d["work_pool"] for d in plan(embedded)} == {embedded.deploy.work_pool}


def test_the_monitor_starts_retraining_on_a_worker_only_in_lab_mode():
    assert retraining_trigger(Settings().with_changes(deploy={"retrain_on_worker": False})) is retraining_flow
    assert (
        retraining_trigger(Settings().with_changes(deploy={"retrain_on_worker": True})) is start_retraining_deployment
    )


@pytest.mark.e2e
def test_deploy_registers_schedules_and_limits_and_a_worker_runs_the_purge(tmp_path):
    port = free_port()
    base = f"http://127.0.0.1:{port}/api"
    worker_project = tmp_path / "worker-project"
    worker_project.mkdir()
    env = lab_env(tmp_path, base, PREFECT_WORKER_QUERY_SECONDS="1", HEMATOVISION_PROJECT_DIR=str(worker_project))
    worker_log = tmp_path / "worker.log"
    with prefect_server(tmp_path, port, env, scheduler=False) as server_log:
        logs = [server_log, worker_log]
        deployments = deploy(tmp_path, env)
        assert set(deployments) == {"training", "retraining", "monitoring", "retention"}
        assert {d["work_pool_name"] for d in deployments.values()} == {POOL}
        for name in ("training", "retraining"):
            limit = deployments[name].get("global_concurrency_limit") or {}
            assert deployments[name]["concurrency_limit"] == 1 or limit.get("limit") == 1, deployments[name]
            assert not deployments[name]["schedules"]
        crons = {name: [s["schedule"]["cron"] for s in deployments[name]["schedules"]] for name in deployments}
        assert crons["monitoring"] == [MONITORING_CRON] and crons["retention"] == [PURGE_CRON]
        assert deployments["retention"]["schedules"][0]["schedule"]["timezone"] == "UTC"
        # Every run reports heartbeats; a run whose worker died is marked Crashed by the automation.
        heartbeat = str(Settings().deploy.heartbeat_seconds)
        assert all(
            d["job_variables"]["env"] == {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": heartbeat} for d in deployments.values()
        )
        (automation,) = api(base, "/automations/filter", {})
        assert automation["name"] == CRASH_SILENT_RUNS and automation["enabled"]
        assert automation["actions"] == [dict(automation["actions"][0], type="change-flow-run-state", state="CRASHED")]
        related = automation["trigger"]["match_related"]
        assert sorted(related["prefect.resource.id"]) == sorted(
            f"prefect.deployment.{d['id']}" for d in deployments.values()
        )

        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [BIN / "prefect", "worker", "start", "--pool", POOL, "--type", "process", "--name", "test-worker"],
                cwd=tmp_path,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            run = api(base, f"/deployments/{deployments['retention']['id']}/create_flow_run", {})

            def finished() -> dict | None:
                state = api(base, f"/flow_runs/{run['id']}")
                return state if state["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

            done = wait_for("the retention run finishing on the worker", finished, 150, logs)
            assert done["state_type"] == "COMPLETED", (done["state"], worker_log.read_text(errors="replace")[-3000:])
            assert done["work_pool_name"] == POOL and done["infrastructure_pid"], done
            # It ran in the worker's settings: the prediction log it purged is the worker project's.
            assert (worker_project / "monitoring" / "predictions.sqlite").exists()
        finally:
            stop_service(worker)
