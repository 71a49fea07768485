"""Lab mode: register the flows as Prefect deployments (``hematovision deploy``).

The work pools, schedules and sources come from the settings (``settings.deploy``); the Prefect
server is Prefect's own setting (``PREFECT_API_URL``). The deployments themselves are described in
``flows/deployments.py``; this module only prints and exits.
"""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from hematovision.cli.common import console, fail
from hematovision.settings import get_settings


def deploy(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be registered, from the settings; ask no server.")
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON only.")] = False,
):
    """Register the Prefect deployments (training, retraining, scheduled monitoring and retention
    purge) and their process work pools on the Prefect server PREFECT_API_URL names; runs then
    execute on workers (`prefect worker start --pool POOL --type process`)."""
    from flows.deployments import deploy_all, plan  # Prefect takes seconds to import

    settings = get_settings()
    if dry_run:
        result = {"deployments": plan(settings)}
    else:
        if not os.environ.get("PREFECT_API_URL"):
            fail("PREFECT_API_URL is not set: deployments live on a Prefect server (`prefect server start`)")
        try:
            result = deploy_all(settings)
        except (OSError, ValueError, RuntimeError) as error:
            fail(f"could not register the deployments: {error}")
    if as_json:
        print(json.dumps(result, indent=2))
        return
    for name in result.get("work_pools_created", []):
        console.print(f"created work pool {name} (process)")
    for d in result["deployments"]:
        when = f"cron '{d['cron']}' ({d['timezone']})" if d["cron"] else "on demand"
        limit = f", {d['concurrency_limit']} run at a time" if d["concurrency_limit"] else ""
        console.print(
            f"{'would register' if dry_run else 'registered'} {d['deployment']} on pool {d['work_pool']}: {when}{limit}"
        )
    pools = sorted({d["work_pool"] for d in result["deployments"]})
    console.print(
        "start a worker per pool: " + "; ".join(f"prefect worker start --pool {p} --type process" for p in pools)
    )
