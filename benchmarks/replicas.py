"""Lab-mode serving benchmark: replicas that follow the champion alias on an MLflow tracking server.

    uv run --frozen python benchmarks/replicas.py [--duration 20] [--clients 8] [--no-record]

Everything runs on this machine, on 127.0.0.1, in a temporary folder:

1. a tracking server: ``mlflow server`` with a sqlite backend file, artifacts proxied by the server
   (``--serve-artifacts --artifacts-destination``): the replicas reach the registry and download
   the model over HTTP only;
2. a quick-profile model, trained by ``hematovision run`` in a small project like the test suite's
   (a few real cells per class, ``tests/conftest.py``) pointed at the server with
   ``MLFLOW_TRACKING_URI``, and a second version (the same model registered again, with its run
   and tags) to promote; the same recipe trained a second time in another project on its own local
   sqlite store, for the embedded mode;
3. the embedded mode: one ``hematovision serve`` on that local store, ``--clients`` closed-loop
   client threads: sustained requests/s and p50/p99;
4. lab mode, one replica: ``hematovision serve`` in a working directory of its own, pointed at the
   server; the same load;
5. lab mode, two replicas (two ports, two working directories, one shared prediction log and lab
   database); the clients split evenly between them (as instruments each sending to one host);
6. a promotion across the two replicas under that load: the ``champion`` alias moves to the second
   version and back; for each move, the time until every replica answers with the new version
   (each polls the alias every ``serving.alias_poll_seconds``; ``--alias-poll-seconds`` changes
   it) and the failed requests across both moves (target 0).

Only the servers of the step being measured run; all of them share this machine's cores with the
client, so two replicas here measure the cost of lab mode, not scaling. Appends a dated section to
benchmarks/RESULTS.md (``--no-record`` to only print). Run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))  # the test suite's small project: a few real cells per class

from serving import (  # noqa: E402 - benchmarks/ on the path first; serving.py moves to the checkout and quiets the tools
    Load,
    Target,
    free_port,
    ours_target,
    percentile,
    read_images,
    wait_for_version,
)
from training import code_version, machine, record  # noqa: E402 - benchmarks/ on the path first

from hematovision.api.process import stop_service  # noqa: E402 - after serving.py quieted the tools
from hematovision.settings import ENV_PREFIX, TELEMETRY_OFF, get_settings  # noqa: E402 - same

BIN = Path(sys.executable).parent  # the hematovision and mlflow CLIs of this environment
CHAMPION = "champion"


# --- processes ---------------------------------------------------------------------------------
@dataclass
class Process:
    name: str
    popen: subprocess.Popen
    url: str
    log: Path


def start(name: str, command: list[str], cwd: Path, env: dict[str, str], url: str, ready: str, log: Path) -> Process:
    """Start a server in its own process group and wait until ``url + ready`` answers 200."""
    with log.open("ab") as out:
        popen = subprocess.Popen(
            command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    process = Process(name, popen, url, log)
    started = time.perf_counter()
    while time.perf_counter() - started < 900:
        if popen.poll() is not None:
            raise RuntimeError(f"{name} exited with {popen.returncode}:\n{tail(log)}")
        try:
            if urllib.request.urlopen(url + ready, timeout=5).status == 200:
                print(f"{name} ready on {url} in {time.perf_counter() - started:.0f} s", flush=True)
                return process
        except OSError:
            pass
        time.sleep(0.5)
    stop(process)
    raise RuntimeError(f"{name} not ready after 900 s:\n{tail(log)}")


def stop(process: Process) -> None:
    if process.popen.poll() is None:
        stop_service(process.popen, kill=False)


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any HematoVision or MLflow store setting (each process gets only
    what its host would have), telemetry off, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "MLFLOW_TRACKING_URI"}
    return {**env, **TELEMETRY_OFF, **extra}


def start_tracking_server(home: Path, workers: int) -> Process:
    home.mkdir(parents=True)
    port = free_port()
    command = [
        str(BIN / "mlflow"),
        "server",
        "--backend-store-uri",
        f"sqlite:///{home}/mlflow.db",
        "--serve-artifacts",
        "--artifacts-destination",
        str(home / "artifacts"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
    ]
    # job execution off: 2 processes and ~0.6 GB instead of ~10 and 2.8 GB (shared/notes/stack.md)
    env = clean_env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    return start("mlflow server", command, home, env, f"http://127.0.0.1:{port}", "/health", home / "server.log")


# --- the model ---------------------------------------------------------------------------------
def train_quick_model(project: Path, data: Path, new_site: Path, store: dict[str, str]) -> float:
    """``hematovision run`` of the quick recipe in a fresh project (git + DVC, a few real cells per
    class, as the test suite's), registering into ``store``; returns the wall time in seconds."""
    import yaml

    from conftest import quick_params

    project.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(ROOT / name, project / name)
    (project / "params.yaml").write_text(yaml.safe_dump(quick_params()))
    shutil.copytree(ROOT / "src", project / "src")  # dvc.yaml names the code as dependencies
    env = clean_env(
        HEMATOVISION_PROJECT_DIR=str(project),
        HEMATOVISION_DATA_SOURCE=str(data),
        HEMATOVISION_NEW_SITE_SOURCE=str(new_site),
        KERAS_HOME=str(project / ".keras"),
        PREFECT_HOME=str(project / ".prefect"),  # its own ephemeral Prefect database
        # a fresh Prefect database migrates before the ephemeral API answers: slower than
        # Prefect's 20 s default on a busy 2-core machine
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="600",
        **store,
    )
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for command in (
        ["git", "init", "-q"],
        [*git, "commit", "-q", "--allow-empty", "-m", "init"],
        [str(BIN / "dvc"), "init", "-q"],
    ):
        subprocess.run(command, cwd=project, env=env, check=True, capture_output=True)
    started = time.perf_counter()
    with (project / "run.log").open("wb") as out:
        done = subprocess.run(
            [str(BIN / "hematovision"), "run"], cwd=project, env=env, stdout=out, stderr=subprocess.STDOUT
        )
    if done.returncode != 0:
        raise RuntimeError(f"training in {project} failed:\n{tail(project / 'run.log')}")
    return time.perf_counter() - started


def register_second_version(tracking_uri: str, name: str) -> tuple[str, str]:
    """(champion version, a new version of the same model with its run and tags): something to promote."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    champion = mlflow.MlflowClient().get_model_version_by_alias(name, CHAMPION)
    # register_model, not create_model_version: the source is a logged model (models:/m-...), which
    # the REST API accepts only with its model id, which register_model passes
    copy = mlflow.register_model(champion.source, name, tags={**champion.tags, "benchmark": "copy of the champion"})
    return str(champion.version), str(copy.version)


def move_champion(tracking_uri: str, name: str, version: str) -> float:
    from mlflow import MlflowClient

    started = time.perf_counter()
    MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).set_registered_model_alias(
        name, CHAMPION, version
    )
    return time.perf_counter() - started


# --- replicas ----------------------------------------------------------------------------------
def start_replica(name: str, home: Path, shared: Path, store: dict[str, str], args) -> Process:
    """``hematovision serve`` in its own working directory; what replicas share is what hosts would:
    the registry (``store``), the prediction log and the lab database (or ``--database-url``)."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = clean_env(
        HEMATOVISION_PROJECT_DIR=str(home),
        HEMATOVISION_PREDICTIONS_DB=str(shared / "predictions.sqlite"),
        HEMATOVISION_IMAGES_DIR=str(shared / "images"),
        HEMATOVISION_LAB_DB=str(shared / "lab.sqlite"),
        HEMATOVISION_MONITOR_STATE_DB=str(shared / "monitor.sqlite"),
        HEMATOVISION_ALIAS_POLL_SECONDS=str(args.alias_poll_seconds),
        # open to anyone, as for a public demo: this measures serving, not sign-in
        HEMATOVISION_PREDICT_REQUIRES_TOKEN="false",
        BENTOML_HOME=str(home / "bentoml"),
        KERAS_HOME=str(home / ".keras"),
        **store,
    )
    if args.database_url:
        env["HEMATOVISION_DATABASE_URL"] = args.database_url
    command = [str(BIN / "hematovision"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    return start(name, command, home, env, f"http://127.0.0.1:{port}", "/readyz", home / "serve.log")


@dataclass
class Level:
    mode: str
    replicas: int
    clients: int
    seconds: float
    throughput: float
    p50: float
    p99: float
    errors: int
    error_examples: list[str]


def spread(targets: list[Target], clients: int) -> list[Load]:
    """``clients`` closed-loop client threads split evenly over the replicas, one Load each."""
    return [Load(target, clients // len(targets) + (i < clients % len(targets))) for i, target in enumerate(targets)]


def measure(mode: str, targets: list[Target], clients: int, duration: float, warmup: float) -> Level:
    """Sustained throughput: successful answers that ended in the window after the warm-up, over its
    length; latencies of those answers; errors over the whole level."""
    loads = [load.start() for load in spread(targets, clients)]
    time.sleep(warmup)
    opened = time.perf_counter()
    time.sleep(duration)
    closed = time.perf_counter()
    for load in loads:
        load.stop()
    samples = [s for load in loads for s in load.samples]
    good = [s for s in samples if s.ok and opened <= s.end <= closed]
    failures = [s for s in samples if not s.ok]
    latencies = [(s.end - s.start) * 1000 for s in good]
    level = Level(
        mode,
        len(targets),
        clients,
        closed - opened,
        len(good) / (closed - opened),
        percentile(latencies, 50),
        percentile(latencies, 99),
        len(failures),
        sorted({s.error for s in failures if s.error})[:3],
    )
    print(
        f"  {mode}, {level.replicas} replica(s), {clients} clients: {level.throughput:.1f} req/s, "
        f"p50 {level.p50:.0f} ms, p99 {level.p99:.0f} ms, errors {level.errors} {level.error_examples or ''}",
        flush=True,
    )
    return level


@dataclass
class Move:
    to_version: str
    alias_s: float  # the alias move itself (one call to the tracking server)
    first_new_s: list[float | None]  # per replica: alias move -> its first answer from the new version
    all_new_s: float | None  # alias move -> every replica answers only with the new version


@dataclass
class Promotion:
    moves: list[Move]
    answers: int
    failed: int
    failures: list[str]
    p99: float


def promote_across(
    targets: list[Target], clients: int, tracking_uri: str, name: str, versions: tuple[str, str], timeout: float
) -> Promotion:
    """The alias moves to ``versions[1]`` and back to ``versions[0]`` while ``clients`` threads load
    the replicas; each move is timed per replica, failures counted over the whole load."""
    loads = [load.start() for load in spread(targets, clients)]
    moves = []
    try:
        time.sleep(3)  # the load is steady before the alias moves
        for version in (versions[1], versions[0]):
            moved = time.perf_counter()
            alias_s = move_champion(tracking_uri, name, version)
            # per replica: first answer from the new version, end of the last answer from the old
            seen = [wait_for_version(load, version, moved, timeout) for load in loads]
            first = [f for f, _ in seen]
            done = None if None in first else max(max(f, last or 0.0) for f, last in seen)
            moves.append(Move(version, alias_s, first, done))
            print(f"  champion -> v{version}: {moves[-1]}", flush=True)
    finally:
        for load in loads:
            load.stop()
    samples = [s for load in loads for s in load.samples]
    failures = [s for s in samples if not s.ok]
    return Promotion(
        moves,
        len(samples),
        len(failures),
        sorted({s.error for s in failures if s.error})[:3],
        percentile([(s.end - s.start) * 1000 for s in samples if s.ok], 99),
    )


# --- the run -----------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20, help="measured seconds per level (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds before each level (default 3)")
    parser.add_argument("--clients", type=int, default=8, help="closed-loop client threads (default 8)")
    parser.add_argument(
        "--alias-poll-seconds",
        type=float,
        default=get_settings().serving.alias_poll_seconds,
        help="how often each replica asks the registry where the alias points (default: the settings', "
        "serving.alias_poll_seconds)",
    )
    parser.add_argument("--images", type=int, default=200, help="TEST images sent round-robin (default 200)")
    parser.add_argument("--mlflow-workers", type=int, default=1, help="`mlflow server --workers` (default 1)")
    parser.add_argument(
        "--database-url",
        default="",
        help="HEMATOVISION_DATABASE_URL for the replicas (a shared PostgreSQL); default: shared sqlite files",
    )
    parser.add_argument("--switch-timeout", type=float, default=180, help="longest wait for a replica to follow")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (logs, stores)")
    parser.add_argument("--no-record", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()

    from conftest import build_kaggle_subset, build_new_site_subset

    commit = code_version()  # the code that runs is the code at the start
    name = get_settings().registry.registered_model
    work = Path(tempfile.mkdtemp(prefix="hematovision-replicas-bench-"))
    print(f"working in {work}", flush=True)
    images = read_images(args.images)
    running: list[Process] = []
    levels: list[Level] = []
    try:
        server = start_tracking_server(work / "tracking-server", args.mlflow_workers)
        running.append(server)
        lab_store = {"MLFLOW_TRACKING_URI": server.url, "HEMATOVISION_REGISTERED_MODEL": name}
        embedded_store = {
            "HEMATOVISION_MLFLOW_TRACKING_URI": f"sqlite:///{work}/embedded/mlruns/mlflow.db",
            "HEMATOVISION_REGISTERED_MODEL": name,
        }
        data = build_kaggle_subset(work / "upstream" / "blood-cells")
        new_site = build_new_site_subset(work / "new-site" / "pbc")
        train_s = {
            "lab": train_quick_model(work / "train-lab", data, new_site, lab_store),
            "embedded": train_quick_model(work / "embedded", data, new_site, embedded_store),
        }
        print("trained: " + ", ".join(f"{k} {v:.0f} s" for k, v in train_s.items()), flush=True)
        versions = register_second_version(server.url, name)

        # Embedded: the project's own `hematovision serve` on its local store; the tracking server idles.
        embedded = start_replica("embedded service", work / "embedded", work / "embedded", embedded_store, args)
        try:
            levels.append(
                measure("embedded", [ours_target(embedded.url, images)], args.clients, args.duration, args.warmup)
            )
        finally:
            stop(embedded)

        shared = work / "shared"
        shared.mkdir()
        first = start_replica("replica A", work / "replica-a", shared, lab_store, args)
        running.append(first)
        targets = [ours_target(first.url, images)]
        levels.append(measure("lab", targets, args.clients, args.duration, args.warmup))
        second = start_replica("replica B", work / "replica-b", shared, lab_store, args)
        running.append(second)
        targets.append(ours_target(second.url, images))
        levels.append(measure("lab", targets, args.clients, args.duration, args.warmup))
        promotion = promote_across(targets, args.clients, server.url, name, versions, args.switch_timeout)
    finally:
        for process in reversed(running):
            stop(process)
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    lines = report(args, commit, len(images), train_s, versions, levels, promotion)
    print("\n".join(lines))
    if not args.no_record:
        record(lines)


def report(args, commit, n_images, train_s, versions, levels, promotion) -> list[str]:
    def seconds(value: float | None) -> str:
        return "never" if value is None else f"{value:.1f} s"

    lines = [
        f"\n## Lab-mode serving: replicas on a tracking server — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}",
        f"- command: `uv run --frozen python benchmarks/replicas.py --duration {args.duration:g} --warmup {args.warmup:g} "
        f"--clients {args.clients} --alias-poll-seconds {args.alias_poll_seconds:g} --images {args.images}"
        + (" --database-url ..." if args.database_url else "")
        + "`",
        f"- model: quick profile trained by `hematovision run` on a few cells per class (lab {train_s['lab']:.0f} s "
        f"over the tracking server, embedded {train_s['embedded']:.0f} s); {n_images} TEST images round-robin, one per "
        f"request; {args.clients} closed-loop client threads, split evenly over the replicas; "
        f"{args.duration:g} s measured after {args.warmup:g} s warm-up",
        "- lab: `mlflow server` (sqlite backend, `--serve-artifacts`, "
        f"{args.mlflow_workers} worker) on 127.0.0.1; each replica `hematovision serve` in its own working "
        "directory with only MLFLOW_TRACKING_URI pointing at the server; "
        + (
            "one database server (HEMATOVISION_DATABASE_URL)"
            if args.database_url
            else "one shared sqlite prediction log and lab database"
        )
        + "; embedded: `hematovision serve` on the project's local sqlite store",
        "",
        "| mode | replicas | clients | req/s | p50 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        lines.append(
            f"| {level.mode} | {level.replicas} | {level.clients} | {level.throughput:.1f} | {level.p50:.0f} | "
            f"{level.p99:.0f} | {level.errors} |"
        )
    for level in levels:
        if level.error_examples:
            lines.append(f"\nErrors, {level.mode} x{level.replicas}: " + "; ".join(level.error_examples))
    lines.append(
        f"\nPromotion across 2 replicas under load ({args.clients} clients, alias polled every "
        f"{args.alias_poll_seconds:g} s): v{versions[0]} -> v{versions[1]} -> v{versions[0]}; "
        f"{promotion.answers} answers, {promotion.failed} failed (target 0); p99 {promotion.p99:.0f} ms during it"
    )
    for move in promotion.moves:
        lines.append(
            f"- champion -> v{move.to_version} (alias move {move.alias_s:.2f} s): every replica answering with "
            f"v{move.to_version} after {seconds(move.all_new_s)}; first answer per replica after "
            + ", ".join(seconds(s) for s in move.first_new_s)
        )
    if promotion.failures:
        lines.append("- failures: " + "; ".join(promotion.failures))
    return lines


if __name__ == "__main__":
    main()
