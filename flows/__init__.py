"""Prefect flows: thin orchestration over the platform's steps (``hematovision.training.steps``,
``hematovision.training.retrain``, ``hematovision.monitoring.monitor``).

The flows sit above the library: they import it, it never imports them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task

import hematovision  # noqa: F401 - its import switches every tool's telemetry off before Prefect loads
from hematovision.data import dvc
from hematovision.params import Params, load_params
from hematovision.settings import get_settings


def project_params(params_file: str, profile: str | None) -> Params:
    """A run's parameters, ``params_file`` read relative to the project directory: on a worker the
    flow runs in the code's checkout (``deploy.source``), not in the project folder that holds the
    data and the laboratory's params.yaml."""
    return load_params(get_settings().path(Path(params_file)), profile)


class StepTimer:
    """Runs a flow's steps and keeps each one's wall time (seconds), for the flow's summary."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}

    def __call__(self, name: str, call: Callable[..., Any], *args: Any) -> Any:
        started = time.perf_counter()
        result = call(*args)
        self.timings[name] = round(time.perf_counter() - started, 1)
        return result


@task(name="push data to the DVC remote", retries=2, retry_delay_seconds=5)
def push_to_remote() -> dict | None:
    """Lab mode (``paths.dvc_remote`` set): push what data.dvc and corrections.dvc pin before a model
    is trained on it, so any clone can pull exactly what a registered version's lineage names. A
    remote that cannot be reached fails the run here, before a model is made that nobody could
    reproduce elsewhere. Without a remote: nothing to do."""
    settings = get_settings()
    if not settings.paths.dvc_remote.strip():
        return None
    result = dvc.push(settings)
    get_run_logger().info("pushed to %s: %s", result["remote"], result["pushed"])
    return result
