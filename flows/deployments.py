"""Lab mode: the flows as Prefect deployments on a Prefect server, their runs executed by workers.

``hematovision deploy`` (``src/hematovision/cli/deploy.py``) calls :func:`deploy_all`, which
registers, on the server ``PREFECT_API_URL`` names:

==========================================  ============================  ==========================  ===========
deployment                                  work pool                     schedule                    at a time
==========================================  ============================  ==========================  ===========
``hematovision-training/training``          ``deploy.training_work_pool``  by hand (a person, a CI)    1
``hematovision-retraining/retraining``      ``deploy.training_work_pool``  by the monitor, approvals   1
``hematovision-monitoring/monitoring``      ``deploy.work_pool``           ``deploy.monitoring_cron``  -
``hematovision-retention/retention``        ``deploy.work_pool``           ``deploy.purge_cron``       -
==========================================  ============================  ==========================  ===========

Training and retraining each run one at a time (a deployment concurrency limit of 1; more runs
wait in line, ENQUEUE). Work pools are created (type ``process``) when missing. Each run executes
on a worker (``prefect worker start --pool NAME --type process``), in the project's code found at
``deploy.source``: a git URL the worker clones, or a folder on the worker's machine (default: the
project directory, the same path on every worker). With ``deploy.retrain_on_worker`` the monitor
starts retraining as a run of the retraining deployment (:func:`start_retraining_deployment`), never
in its own process.

A worker (or its machine) that dies mid-run leaves its run "Running" on the server for ever, and a
one-at-a-time deployment would then never run again. So every run reports a heartbeat every
``deploy.heartbeat_seconds`` (Prefect's ``PREFECT_FLOWS_HEARTBEAT_FREQUENCY``, set in the
deployments' job environment: nothing to configure on the workers), and an automation
(:data:`CRASH_SILENT_RUNS`) marks a run of these deployments Crashed once it has been silent for
:data:`SILENT_HEARTBEATS` heartbeats; its slot is freed and the next run starts on another worker.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy, StateType
from prefect.deployments import run_deployment
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture
from prefect.exceptions import ObjectNotFound
from prefect.schedules import Cron

from hematovision.settings import Settings

TAG = "hematovision"
CRASH_SILENT_RUNS = "hematovision: crash runs whose worker died"
# Heartbeats a run may miss before it is called dead: one late heartbeat on a busy machine is not a
# death, three are.
SILENT_HEARTBEATS = 3


@dataclass(frozen=True)
class DeploymentSpec:
    flow_name: str
    name: str
    entrypoint: str  # relative to the project's root, where the worker runs the flow
    training: bool  # on the training work pool (a GPU machine), else on the general one
    cron_setting: str | None  # the deploy.* setting holding its cron schedule; None: started by someone
    one_at_a_time: bool
    description: str

    @property
    def full_name(self) -> str:
        return f"{self.flow_name}/{self.name}"


SPECS = (
    DeploymentSpec(
        "hematovision-training",
        "training",
        "flows/training.py:training_flow",
        True,
        None,
        True,
        "The main job: import, prepare, train, evaluate, register, promote through the gate.",
    ),
    DeploymentSpec(
        "hematovision-retraining",
        "retraining",
        "flows/retraining.py:retraining_flow",
        True,
        None,
        True,
        "Retraining on the pathologists' corrections, through the gate; started by the monitor.",
    ),
    DeploymentSpec(
        "hematovision-monitoring",
        "monitoring",
        "flows/monitoring.py:monitoring_flow",
        False,
        "monitoring_cron",
        False,
        "Drift monitoring of the champion's predictions; alerts; starts approved retraining.",
    ),
    DeploymentSpec(
        "hematovision-retention",
        "retention",
        "flows/retention.py:retention_flow",
        False,
        "purge_cron",
        False,
        "Retention purge: retained images, old embeddings, corrections and cache entries past their retention.",
    ),
)
RETRAINING_DEPLOYMENT = next(s.full_name for s in SPECS if s.name == "retraining")


def pool_of(spec: DeploymentSpec, settings: Settings) -> str:
    return (
        (settings.deploy.training_work_pool or settings.deploy.work_pool)
        if spec.training
        else settings.deploy.work_pool
    )


def source_of(settings: Settings) -> str:
    return settings.deploy.source or str(settings.path(settings.paths.project_dir))


def plan(settings: Settings) -> list[dict[str, Any]]:
    """What :func:`deploy_all` registers, from the settings alone (no server asked)."""
    return [
        {
            "deployment": spec.full_name,
            "entrypoint": spec.entrypoint,
            "work_pool": pool_of(spec, settings),
            "cron": getattr(settings.deploy, spec.cron_setting) if spec.cron_setting else None,
            "timezone": settings.deploy.timezone if spec.cron_setting else None,
            "concurrency_limit": 1 if spec.one_at_a_time else None,
            "source": source_of(settings),
            "heartbeat_seconds": settings.deploy.heartbeat_seconds,
        }
        for spec in SPECS
    ]


def ensure_work_pools(names: list[str]) -> list[str]:
    """Create the process work pools that do not exist yet; returns the names created."""
    from prefect.workers.process import ProcessWorker

    created = []
    with get_client(sync_client=True) as client:
        for name in dict.fromkeys(names):
            try:
                client.read_work_pool(name)
            except ObjectNotFound:
                client.create_work_pool(
                    WorkPoolCreate(
                        name=name, type="process", base_job_template=ProcessWorker.get_default_base_job_template()
                    )
                )
                created.append(name)
    return created


def deploy_all(settings: Settings) -> dict[str, Any]:
    """Create the work pools and register (or update) every deployment; returns what was done."""
    planned = plan(settings)
    created = ensure_work_pools([p["work_pool"] for p in planned])
    ids: list[str] = []
    for spec, item in zip(SPECS, planned, strict=True):
        deployment = flow.from_source(item["source"], spec.entrypoint).to_deployment(
            name=spec.name,
            schedules=[Cron(item["cron"], timezone=item["timezone"])] if item["cron"] else None,
            concurrency_limit=(
                ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE)
                if spec.one_at_a_time
                else None
            ),
            description=spec.description,
            tags=[TAG],
            job_variables={"env": {"PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(item["heartbeat_seconds"])}},
        )
        # RunnerDeployment.apply, not prefect.deploy(): this Prefect's deploy() first lists the
        # pool's online workers with a request its own server refuses (422, limit/offset None), and
        # a process pool needs neither an image nor a build.
        ids.append(str(deployment.apply(work_pool_name=item["work_pool"])))
    automation = crash_silent_runs(ids, settings.deploy.heartbeat_seconds)
    return {"work_pools_created": created, "deployments": planned, "ids": ids, "automation": automation}


def crash_silent_runs(deployment_ids: list[str], heartbeat_seconds: int) -> str:
    """(Re)create the automation that marks a run of these deployments Crashed after
    :data:`SILENT_HEARTBEATS` heartbeats without news (Prefect's recipe for "zombie" runs, limited
    to this platform's deployments so a shared Prefect server's other flows are left alone, and
    started from the run's Pending and Running states as well as from its heartbeats)."""
    automation = AutomationCore(
        name=CRASH_SILENT_RUNS,
        description="A run of a HematoVision deployment stopped reporting heartbeats: its worker or machine died.",
        trigger=EventTrigger(
            # From the moment a run is handed to a worker: a machine that dies before the run's
            # first heartbeat (between Pending and Running, or right after Running) leaves no
            # heartbeat to start from.
            after={"prefect.flow-run.Pending", "prefect.flow-run.Running", "prefect.flow-run.heartbeat"},
            expect={
                "prefect.flow-run.Running",
                "prefect.flow-run.heartbeat",
                "prefect.flow-run.Completed",
                "prefect.flow-run.Failed",
                "prefect.flow-run.Cancelled",
                "prefect.flow-run.Crashed",
            },
            match={"prefect.resource.id": "prefect.flow-run.*"},
            match_related={
                "prefect.resource.role": "deployment",
                "prefect.resource.id": [f"prefect.deployment.{i}" for i in deployment_ids],
            },
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=SILENT_HEARTBEATS * heartbeat_seconds),
        ),
        actions=[
            ChangeFlowRunState(
                state=StateType.CRASHED,
                message=f"no heartbeat for {SILENT_HEARTBEATS * heartbeat_seconds} s: its worker or machine died",
            )
        ],
    )
    with get_client(sync_client=True) as client:
        for old in client.read_automations_by_name(CRASH_SILENT_RUNS):
            client.delete_automation(old.id)  # re-deploying replaces it: the deployment ids may differ
        return str(client.create_automation(automation))


def start_retraining_deployment() -> dict[str, Any]:
    """The monitor's retraining trigger in lab mode: a run of the retraining deployment, queued for a
    worker (not waited for; the deployment's limit runs one at a time); returns the run's id."""
    run = run_deployment(RETRAINING_DEPLOYMENT, timeout=0, as_subflow=False, tags=[TAG, "triggered-by-monitor"])
    return {"deployment": RETRAINING_DEPLOYMENT, "flow_run_id": str(run.id), "state": run.state_name}
