"""Lab mode's commands: register the flows as Prefect deployments (``hematovision deploy``), and
move data through the DVC remote (``hematovision data push|pull``).

The work pools, schedules and sources come from the settings (``settings.deploy``); the Prefect
server is Prefect's own setting (``PREFECT_API_URL``). The deployments themselves are described in
``flows/deployments.py``, the remote in ``hematovision.data.dvc``; this module only prints and exits.
"""

from __future__ import annotations

import json
import os
from typing import Annotated

import typer

from hematovision import stores
from hematovision.cli.common import console, fail
from hematovision.data import dvc
from hematovision.data.dvc import DataImportError
from hematovision.registry.registry import RegistryError
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


def data_push(
    all_commits: Annotated[
        bool, typer.Option("--all-commits", help="Also every version that any git commit's .dvc files pin.")
    ] = False,
):
    """Push the dataset and the corrections (data.dvc, corrections.dvc) to the DVC remote
    (HEMATOVISION_DVC_REMOTE), so another machine can pull what a model was trained on."""
    try:
        result = dvc.push(get_settings(), all_commits)
    except DataImportError as error:
        fail(str(error))
    console.print(f"pushed to {result['remote']}: {result['dvc'] or 'everything was there already'}")
    print(json.dumps({k: v for k, v in result.items() if k != "dvc"}, indent=2))


def data_pull(
    model_version: Annotated[
        str | None,
        typer.Option(help="Pull exactly the data and corrections this model version's lineage tags name."),
    ] = None,
    alias: Annotated[str | None, typer.Option(help="The same for the version behind an alias, e.g. champion.")] = None,
):
    """Pull the dataset and the corrections from the DVC remote: what this checkout's .dvc files pin,
    or exactly the versions a registered model was trained on (its data_hash, corrections_hash)."""
    settings = get_settings()
    versions = None
    if model_version is not None or alias is not None:
        registry = stores.registry(settings)
        try:
            found = registry.get_version(model_version) if model_version else registry.version_by_alias(alias)
        except RegistryError as error:
            fail(str(error))
        if found is None:
            fail(f"no model version has the alias {alias!r}")
        versions = {"data": found.tags.get("data_hash"), "corrections": found.tags.get("corrections_hash")}
        console.print(
            f"model v{found.version} was trained on data {versions['data']}, corrections {versions['corrections']}"
        )
    try:
        result = dvc.pull(settings, versions)
    except DataImportError as error:
        fail(str(error))
    for name in result["repinned"]:
        console.print(f"{name}.dvc now pins {result['pulled'][name]} (commit it to keep this version)")
    print(json.dumps({k: v for k, v in result.items() if k != "dvc"}, indent=2))
