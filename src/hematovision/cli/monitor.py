"""Commands for drift monitoring of the champion's predictions (Evidently)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from typing import Annotated

import typer

from hematovision.cli.common import console, fail
from hematovision.monitoring.monitor import MonitoringError
from hematovision.monitoring.workspace import workspace_project
from hematovision.settings import get_settings

monitor_app = typer.Typer(help="Drift monitoring of the champion's predictions (Evidently).", no_args_is_help=True)


@monitor_app.command("run")
def monitor_run(
    act: Annotated[bool, typer.Option(help="Start retraining that an alert calls for (per retrain_trigger).")] = True,
):
    """Check new windows of the prediction log for drift now, raise alerts; prints the status."""
    from flows.monitoring import monitoring_flow

    try:
        result = monitoring_flow(act=act)
    except MonitoringError as error:
        fail(str(error))
    status = result["status"]
    for w in result["windows"]:
        drifted = [name for name, s in w["signals"].items() if s["drift"]]
        console.print(
            f"window {w['id']}: {w['n']} predictions {w['start_at'][:19]} .. {w['end_at'][:19]}: "
            + ("[red]DRIFTING[/] (" + ", ".join(drifted) + ")" if w["drifting"] else "no drift")
        )
    for alert in result["alerts"]:
        console.print(f"[yellow]alert {alert['id']}[/] ({alert['status']}): {alert['message']}")
    console.print(
        f"model v{status['model_version']}: "
        + (
            f"[red]drifting[/] since {status['since']} ({', '.join(status['signals'])})"
            if status["drifting"]
            else "no drift"
        )
        + f"; {len(result['windows'])} new window(s); "
        f"corrections since this champion: {status['corrections']['since_champion']}"
    )
    print(json.dumps({k: status[k] for k in ("drifting", "since", "signals", "model_version", "drift_windows")}))


@monitor_app.command("ui")
def monitor_ui(
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on: 127.0.0.1 keeps it on this machine; the host's address (or 0.0.0.0) "
            "lets ops open it from theirs (the Evidently UI has no sign-in: keep it on the lab's network)."
        ),
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
):
    """Serve the Evidently UI on the monitoring workspace (telemetry off)."""

    settings = get_settings()
    workspace_project(settings)  # the project and its dashboard exist before the first window
    evidently = shutil.which("evidently", path=str(Path(sys.executable).parent)) or shutil.which("evidently")
    if evidently is None:
        fail("evidently is not installed in this environment")
    workspace = str(settings.path(settings.monitoring.workspace))
    shown = f"[{host}]" if ":" in host else host
    console.print(f"Evidently UI on http://{shown}:{port}/ (workspace {workspace})")
    os.execv(evidently, [evidently, "ui", "--workspace", workspace, "--host", host, "--port", str(port)])
