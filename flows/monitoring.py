"""The monitoring flow: judge new windows of the champion's predictions for drift, raise alerts,
start retraining when the trigger allows it.

Runs with no Prefect server (an ephemeral local API) unless PREFECT_API_URL points at one; schedule
it (a Prefect deployment, cron, a systemd timer) as often as windows fill. Every step is a call into
``hematovision.monitoring.monitor``; this flow hands the monitor its retraining trigger (the
retraining flow, or in lab mode a run of the retraining deployment on a worker: see
``flows/deployments.py``), so the library never imports the flows. ``hematovision monitor run`` runs it once.

    uv run python -m flows.monitoring
"""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from flows.deployments import start_retraining_deployment
from flows.retraining import retraining_flow
from hematovision import stores
from hematovision.monitoring import monitor as monitoring
from hematovision.monitoring.monitor import RetrainingTrigger
from hematovision.settings import Settings, get_settings


@task(name="find the champion", retries=2, retry_delay_seconds=2)
def find_champion() -> tuple[str, str]:
    version, since = monitoring.champion(get_settings())
    get_run_logger().info("monitoring model v%s (registered %s)", version, since)
    return version, since


@task(name="check windows")
def check_windows(version: str) -> list[dict]:
    settings = get_settings()
    windows = monitoring.check_windows(settings, stores.monitor_state(settings), version)
    logger = get_run_logger()
    for w in windows:
        drifted = [name for name, s in w["signals"].items() if s["drift"]]
        (logger.warning if w["drifting"] else logger.info)(
            "window %s: %d predictions, %s%s",
            w["id"],
            w["n"],
            "DRIFTING" if w["drifting"] else "no drift",
            f" ({', '.join(drifted)})" if drifted else "",
        )
    if not windows:
        logger.info("no new complete window")
    return windows


@task(name="decide")
def decide(version: str, champion_since: str) -> list[dict]:
    settings = get_settings()
    alerts = monitoring.decide(settings, stores.monitor_state(settings), version, champion_since)
    for alert in alerts:
        get_run_logger().warning("ALERT %s: %s (%s)", alert["kind"], alert["message"], alert["status"])
    return alerts


def retraining_trigger(settings: Settings) -> RetrainingTrigger:
    """How this monitor starts retraining: a run of the retraining deployment, executed by a worker
    (lab mode, ``deploy.retrain_on_worker``), or the retraining flow in this process (embedded)."""
    return start_retraining_deployment if settings.deploy.retrain_on_worker else retraining_flow


@task(name="start approved retraining")
def retrain_approved() -> list[dict]:
    settings = get_settings()
    return monitoring.retrain_approved(settings, stores.monitor_state(settings), retraining_trigger(settings))


@flow(name="hematovision-monitoring", log_prints=True)
def monitoring_flow(act: bool = True) -> dict:
    """Check the prediction log for drift against the champion's reference; alert; maybe retrain."""
    settings = get_settings()
    state = stores.monitor_state(settings)
    version, since = find_champion()
    state.put("champion", {"version": version, "registered_at": since})
    windows = check_windows(version)
    alerts = decide(version, since)
    retraining = retrain_approved() if act else []
    state.put("last_run", {"at": monitoring.utc_now(), "windows": len(windows), "alerts": [a["id"] for a in alerts]})
    return {
        "model_version": version,
        "windows": windows,
        "alerts": alerts,
        "retraining": retraining,
        "status": monitoring.ops_status(settings, state),
    }


if __name__ == "__main__":
    monitoring_flow()
