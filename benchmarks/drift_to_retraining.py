"""Lab-mode orchestration benchmark: from a drift window closing to the retraining run starting on a worker.

    uv run --frozen python benchmarks/drift_to_retraining.py [--window 10] [--no-record]

Everything runs on this machine, on 127.0.0.1, in a temporary folder:

1. ``mlflow server`` and a quick-profile model trained over it, as in ``benchmarks/replicas.py``;
2. ``prefect server`` (its own PREFECT_HOME) and ``hematovision deploy``: retraining started by the
   monitor as a run of the retraining deployment (``deploy.retrain_on_worker``, ``retrain_trigger``
   auto, ``drift.persistence`` 1, count windows of ``--window`` predictions); one process worker on
   the pool, polling every ``PREFECT_WORKER_QUERY_SECONDS`` (Prefect's default unless set), in the
   trained project's folder;
3. one replica (``hematovision serve`` on the tracking server) sharing the prediction log and the
   monitoring state with the worker; ``--window`` images of the second laboratory (pbc-sample, a
   new site) are sent to it one by one: the window closes when the last is answered;
4. a run of the monitoring deployment is created the moment the window closes, as its cron would
   at its next tick; the Prefect API is read: when the worker started it, the retraining run it
   created, and when that run started running on the worker.

It reports the whole delay and its parts (the monitoring run queued until the worker ran it, the
monitoring run until it created the retraining run, the retraining run queued until the worker ran
it). A scheduled monitor adds the wait for its next tick, up to one period of
``deploy.monitoring_cron``. The schedule itself is not used: Prefect 3.8.8's scheduler fails with
the pinned SQLAlchemy 2.1.9 (``_insert_scheduled_flow_runs``: "Can't evaluate bulk DML statement"),
so a cron never creates a run; the server runs with ``--no-scheduler``. The retraining run is
stopped once it has started (what it does is benchmarked in ``benchmarks/retraining.py``). Appends
a dated section to benchmarks/RESULTS.md (``--no-record`` to only print). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from replicas import (  # noqa: E402 - benchmarks/ on the path first; importing it moves to the checkout and quiets the tools
    BIN,
    Process,
    clean_env,
    start,
    start_replica,
    start_tracking_server,
    stop,
    train_quick_model,
)
from serving import free_port  # noqa: E402 - benchmarks/ on the path first
from training import code_version, machine, record  # noqa: E402 - benchmarks/ on the path first

from hematovision.api.process import stop_service  # noqa: E402 - after the tools are quieted
from hematovision.settings import get_settings  # noqa: E402 - same

POOL = "hv-bench-pool"
FAR_AWAY = "30 1 29 2 *"  # never due while this runs
PBC = ROOT.parent / "shared" / "datasets" / "pbc-sample"


def api(base: str, path: str, body: dict | None = None, method: str | None = None):
    request = urllib.request.Request(
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method=method or ("GET" if body is None else "POST"),
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        content = answer.read()
        return json.loads(content) if content else None


def when(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value.replace("Z", "+00:00"))


def start_prefect(home: Path, env: dict[str, str], port: int) -> Process:
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
    base = f"http://127.0.0.1:{port}"
    command += ["--analytics-off", "--no-scheduler"]
    return start("prefect server", command, home, env, base, "/api/health", home / "server.log")


def new_site_images(count: int, seed: int = 0) -> list[tuple[str, bytes]]:
    paths = sorted(p for folder in sorted(PBC.iterdir()) if folder.is_dir() for p in folder.glob("*.jpg"))
    return [(p.name, p.read_bytes()) for p in random.Random(seed).sample(paths, count)]


def send_window(url: str, images: list[tuple[str, bytes]]) -> datetime:
    """POST each image to the replica; returns when the last answer came (the window closed)."""
    import requests

    with requests.Session() as session:
        for name, data in images:
            answer = session.post(f"{url}/predict", files={"image": (name, data, "image/jpeg")}, timeout=120)
            answer.raise_for_status()
    return datetime.now(UTC)


def runs_of(base: str, deployment_id: str) -> list[dict]:
    runs = api(base, "/api/flow_runs/filter", {"deployments": {"id": {"any_": [deployment_id]}}})
    return sorted(runs, key=lambda r: r["created"])


def wait(what: str, check, timeout: float, logs: list[Path]):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.5)
    tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
    raise RuntimeError(f"{what}: not within {timeout:.0f} s\n{tails}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window", type=int, default=10, help="predictions per window (default 10, the least)")
    parser.add_argument("--timeout", type=float, default=900, help="longest wait for each step (default 900 s)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores)")
    parser.add_argument("--no-record", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()

    from conftest import build_kaggle_subset, build_new_site_subset

    commit = code_version()
    name = get_settings().registry.registered_model
    work = Path(tempfile.mkdtemp(prefix="hematovision-drift-retraining-bench-"))
    print(f"working in {work}", flush=True)
    running: list[Process] = []
    try:
        server = start_tracking_server(work / "tracking-server", 1)
        running.append(server)
        store = {"MLFLOW_TRACKING_URI": server.url, "HEMATOVISION_REGISTERED_MODEL": name}
        project = work / "project"
        data = build_kaggle_subset(work / "upstream" / "blood-cells")
        new_site = build_new_site_subset(work / "new-site" / "pbc")
        train_s = train_quick_model(project, data, new_site, store)
        print(f"trained in {train_s:.0f} s", flush=True)

        shared = work / "shared"  # what the replica and the worker share: the lab's database
        shared.mkdir()
        prefect_port = free_port()
        lab = {
            **store,
            "HEMATOVISION_PROJECT_DIR": str(project),
            "HEMATOVISION_PREDICTIONS_DB": str(shared / "predictions.sqlite"),
            "HEMATOVISION_LAB_DB": str(shared / "lab.sqlite"),
            "HEMATOVISION_MONITOR_STATE_DB": str(shared / "monitor.sqlite"),
            "HEMATOVISION_MONITOR_WINDOW": "count",
            "HEMATOVISION_MONITOR_WINDOW_SIZE": str(args.window),
            "HEMATOVISION_DRIFT_PERSISTENCE": "1",
            "HEMATOVISION_RETRAIN_TRIGGER": "auto",
            "HEMATOVISION_DEPLOY_RETRAIN_ON_WORKER": "true",
            "HEMATOVISION_DEPLOY_WORK_POOL": POOL,
            "HEMATOVISION_DEPLOY_SOURCE": str(ROOT),  # the code; the data is the project folder
            "HEMATOVISION_DEPLOY_MONITORING_CRON": FAR_AWAY,  # the benchmark starts the run itself
            "HEMATOVISION_DEPLOY_PURGE_CRON": FAR_AWAY,
            "PREFECT_HOME": str(work / "prefect-home"),
            "PREFECT_API_URL": f"http://127.0.0.1:{prefect_port}/api",
            "PREFECT_LOGGING_LEVEL": "WARNING",
            "KERAS_HOME": str(project / ".keras"),
        }
        env = clean_env(**lab)
        prefect = start_prefect(work, env, prefect_port)
        running.append(prefect)
        base = prefect.url
        deployed = subprocess.run(
            [str(BIN / "hematovision"), "deploy", "--json"], cwd=project, env=env, capture_output=True, text=True
        )
        if deployed.returncode != 0:
            raise RuntimeError(f"hematovision deploy failed:\n{deployed.stdout}\n{deployed.stderr}")
        deployments = {d["name"]: d for d in api(base, "/api/deployments/filter", {})}
        monitoring_id, retraining_id = deployments["monitoring"]["id"], deployments["retraining"]["id"]

        replica_args = SimpleNamespace(alias_poll_seconds=get_settings().serving.alias_poll_seconds, database_url="")
        replica = start_replica("replica", work / "replica", shared, store, replica_args)
        running.append(replica)

        worker_log = work / "worker.log"
        with worker_log.open("wb") as out:
            worker = subprocess.Popen(
                [
                    str(BIN / "prefect"),
                    "worker",
                    "start",
                    "--pool",
                    POOL,
                    "--type",
                    "process",
                    "--name",
                    "bench-worker",
                ],
                cwd=project,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        running.append(Process("prefect worker", worker, "", worker_log))
        logs = [worker_log, work / "server.log", work / "replica" / "serve.log"]

        closed = send_window(replica.url, new_site_images(args.window))
        monitoring = api(base, f"/api/deployments/{monitoring_id}/create_flow_run", {})
        print(
            f"window of {args.window} new-site predictions closed at {closed:%H:%M:%S}; monitoring run created",
            flush=True,
        )

        def retraining_running() -> dict | None:
            runs = [r for r in runs_of(base, retraining_id) if r["start_time"]]
            return runs[0] if runs else None

        retraining = wait("the retraining run starting on the worker", retraining_running, args.timeout, logs)
        monitoring = api(base, f"/api/flow_runs/{monitoring['id']}")  # its state and run time now
        api(base, f"/api/flow_runs/{retraining['id']}/set_state", {"state": {"type": "CANCELLING"}, "force": True})
    finally:
        for process in reversed(running):
            if process.name == "prefect worker":
                stop_service(process.popen, kill=True)  # and the flow run it started
            else:
                stop(process)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    created, started = when(retraining["created"]), when(retraining["start_time"])
    monitoring_created, monitoring_start = when(monitoring["created"]), when(monitoring["start_time"])
    lines = [
        f"\n## Lab mode: drift window closed -> retraining running on a worker — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}",
        f"- command: `uv run --frozen python benchmarks/drift_to_retraining.py --window {args.window}`",
        "- `prefect server` + one process worker (PREFECT_WORKER_QUERY_SECONDS "
        f"{os.environ.get('PREFECT_WORKER_QUERY_SECONDS', 'default')}), `mlflow server`, one replica on 127.0.0.1; "
        "retraining as a run of its deployment (retrain_on_worker, trigger auto, persistence 1); "
        f"windows of {args.window} predictions; quick-profile model trained over the tracking server in {train_s:.0f} s; "
        "the monitoring run created when the window closed (a schedule adds up to one period of "
        "deploy.monitoring_cron: Prefect 3.8.8's scheduler fails with SQLAlchemy 2.1.9, see the docstring)",
        "",
        f"- window closed (last of {args.window} new-site answers) -> retraining run running on the worker: "
        f"**{(started - closed).total_seconds():.1f} s**",
        f"- monitoring run created -> running on the worker: {(monitoring_start - monitoring_created).total_seconds():.1f} s",
        f"- monitoring run running -> retraining run created: {(created - monitoring_start).total_seconds():.1f} s "
        f"(the monitoring run: {monitoring['state_type'].lower()}, {monitoring['total_run_time']:.1f} s when read)",
        f"- retraining run created -> running on the worker: {(started - created).total_seconds():.1f} s",
    ]
    print("\n".join(lines))
    if not args.no_record:
        record(lines)


if __name__ == "__main__":
    main()
