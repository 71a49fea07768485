"""Lab mode's orchestration, from the settings: what ``hematovision deploy`` would register, and how
the monitor starts retraining. The deployments on a real ``prefect server``, their schedules, limits,
heartbeats and crash automation read back, and runs on real workers, are in the laboratory test
(``test_lab_on_one_machine.py``), which also checks that a schedule produces runs (what SQLAlchemy
2.1 broke in prefect 3.8.8: see pyproject.toml).
"""

from __future__ import annotations

from flows.deployments import plan, start_retraining_deployment
from flows.monitoring import retraining_trigger
from flows.retraining import retraining_flow
from hematovision.settings import Settings


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
