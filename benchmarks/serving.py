"""Serving load benchmark: our BentoML service (full model and int8 flavour) against `mlflow models serve`
of the same champion.

    uv run --frozen python benchmarks/serving.py [--duration 20] [--max-requests 20000] [--skip-int8]

In one run, on this machine, with the same client and the same images (the official TEST images,
read into memory and sent round-robin, one image per request):

1. the ceiling: the champion loaded in this process, ``prepare_image`` + ``run_model`` on batches
   of 32 images (the path the service's batcher runs, test-time views included), images/s, for
   its full model and for its int8 flavour (``model/export.py``: the export registered with the
   champion, or one built here as the register step builds it);
2. our service (``bentoml serve hematovision.api.service:HematoVision``, POST /predict multipart)
   serving the champion's full model,
3. our service serving the int8 flavour: a copy of the champion registered in a run of its own
   with the export and ``serving_flavour=int8``, under the alias ``benchmark-int8`` that this
   server follows (``HEMATOVISION_SERVE_ALIAS``); copy, alias and run are deleted afterwards, and
4. ``mlflow models serve -m models:/hematovision@champion`` (POST /invocations, base64 in a
   ``dataframe_split`` JSON; the pyfunc answers with the full model), one server after the other,
   never two at once, each at 1, 8 and 32
   concurrent clients (threads, one HTTP session each, closed loop): successful requests/s,
   p50/p95/p99 latency, errors (non-200 or exceptions); each level runs a short warm-up, then is
   bounded by ``--duration`` seconds and ``--max-requests`` answers;
5. a promote during sustained load on our service (full model): a copy of the champion is registered, the
   ``champion`` alias moved to it with 8 clients running, the time until answers carry the new
   ``model_version`` measured and failed requests counted; then the alias goes back, the service
   must follow again, and the copy is deleted (``finally``: champion is back on the original
   version, and the champion history tag as it was).

Appends a dated section to benchmarks/RESULTS.md with the targets and PASS/FAIL (``--no-record``
to only print). The service logs to a temporary prediction log, not the real one.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from base64 import b64encode
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
os.chdir(ROOT)  # the settings' relative paths (mlruns/, the dataset) hang from the checkout
sys.path.insert(0, str(ROOT / "benchmarks"))

from hematovision.settings import TELEMETRY_OFF, get_settings, quiet_environment  # noqa: E402 - after os.chdir: the settings' relative paths hang from the checkout

quiet_environment()

import requests  # noqa: E402 - after quiet_environment(): telemetry off before the tools load
from training import machine, record  # noqa: E402  (same machine line as the training benchmark)

TEST_IMAGES = Path("../shared/datasets/blood-cells/dataset2-master/images/TEST")
BIN = Path(sys.executable).parent  # bentoml and mlflow CLIs of this environment
LEVELS = (1, 8, 32)
CEILING_BATCH = 32
PROMOTE_CLIENTS = 8
SERVICE = "hematovision.api.service:HematoVision"
INT8_ALIAS = "benchmark-int8"  # the alias the int8 server follows (a copy of the champion)


# --- the client --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Target:
    """One server as the client sees it: where to POST, one ready-made body per image (built up
    front so the client spends its CPU on sending, not encoding), and how to read an answer."""

    name: str
    url: str
    bodies: list[tuple[bytes, dict[str, str]]]
    parse: Callable[[bytes], dict]  # -> {"label": ..., "model_version": ..., "model_flavour": ...}; raises if malformed


@dataclass
class Sample:
    start: float
    end: float
    ok: bool
    version: str | None = None
    error: str | None = None


def send(session: requests.Session, target: Target, index: int) -> Sample:
    body, headers = target.bodies[index % len(target.bodies)]
    start = time.perf_counter()
    try:
        response = session.post(target.url, data=body, headers=headers, timeout=120)
        end = time.perf_counter()
        if response.status_code != 200:
            return Sample(start, end, False, error=f"HTTP {response.status_code}: {response.text[:200]}")
        answer = target.parse(response.content)
        return Sample(start, end, True, version=answer.get("model_version"))
    except Exception as error:  # noqa: BLE001 - every failure is a data point, not a crash
        return Sample(start, time.perf_counter(), False, error=f"{type(error).__name__}: {error}"[:200])


class Load:
    """``clients`` threads sending back to back (a closed loop, like lab instruments waiting for
    their answer) until ``stop()``; every answer is kept as a :class:`Sample`."""

    def __init__(self, target: Target, clients: int, max_samples: int | None = None) -> None:
        self.target, self.clients, self.max_samples = target, clients, max_samples
        self.samples: list[Sample] = []
        self.counted_from = float("inf")  # answers ending from here on count towards max_samples
        self.counted = 0
        self.full = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = itertools.count()
        self._threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def _client(self) -> None:
        with requests.Session() as session:
            while not self._stop.is_set():
                sample = send(session, self.target, next(self._next))
                with self._lock:
                    self.samples.append(sample)
                    if sample.end >= self.counted_from:
                        self.counted += 1
                        if self.max_samples and self.counted >= self.max_samples:
                            self.full.set()

    def start(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def stop(self) -> None:
        """Stop sending and wait for the answers in flight (they are kept)."""
        self._stop.set()
        for thread in self._threads:
            thread.join(180)


@dataclass
class LevelResult:
    server: str
    clients: int
    seconds: float
    answers: int
    throughput: float
    p50: float
    p95: float
    p99: float
    errors: int
    error_examples: list[str] = field(default_factory=list)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def run_level(target: Target, clients: int, duration: float, warmup: float, max_requests: int) -> LevelResult:
    """Throughput = successful answers that ended inside the measured window / its length (steady
    state: the window opens after the warm-up, with every client busy). Latencies are those of the
    answers in the window; errors count every failure of the level, warm-up and drain included."""
    load = Load(target, clients, max_requests)
    load.counted_from = time.perf_counter() + warmup
    load.start()
    opened = load.counted_from
    time.sleep(max(0.0, opened - time.perf_counter()))
    load.full.wait(duration)
    closed = time.perf_counter()
    load.stop()
    window = [s for s in load.samples if opened <= s.end <= closed]
    good = [s for s in window if s.ok]
    failures = [s for s in load.samples if not s.ok]
    latencies = [(s.end - s.start) * 1000 for s in good]
    return LevelResult(
        target.name,
        clients,
        closed - opened,
        len(window),
        len(good) / (closed - opened),
        percentile(latencies, 50),
        percentile(latencies, 95),
        percentile(latencies, 99),
        len(failures),
        sorted({s.error for s in failures if s.error})[:3],
    )


# --- the servers -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server in its own process group (BentoML and uvicorn start children), its output in a log
    file; stopped as a group so no worker outlives the benchmark."""

    def __init__(self, name: str, command: list[str], env: dict[str, str], health_url: str, log: Path) -> None:
        self.name, self.health_url, self.log = name, health_url, log
        self._log_file = log.open("wb")
        self.process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=self._log_file, stderr=subprocess.STDOUT, start_new_session=True
        )

    def wait_ready(self, timeout: float = 600) -> float:
        started = time.perf_counter()
        while time.perf_counter() - started < timeout:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; log:\n{self.tail()}")
            try:
                if requests.get(self.health_url, timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except requests.RequestException:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{self.name} not ready after {timeout:.0f} s; log:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            for sig, wait in ((signal.SIGTERM, 30), (signal.SIGKILL, 10)):
                try:
                    os.killpg(self.process.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    self.process.wait(wait)
                    break
                except subprocess.TimeoutExpired:
                    continue
        try:  # children that ignored SIGTERM while the leader exited
            os.killpg(self.process.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self._log_file.close()


def start_ours(
    workdir: Path, batch_wait_ms: float | None, service: str, alias: str | None = None
) -> tuple[Server, str]:
    port = free_port()
    name = "bentoml (ours)" if alias is None else f"bentoml (ours, alias {alias})"
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        # a throwaway prediction log: the benchmark's answers are not patients' predictions
        "HEMATOVISION_PREDICTIONS_DB": str(workdir / "predictions.sqlite"),
        "HEMATOVISION_IMAGES_DIR": str(workdir / "images"),
        # the promote is timed in seconds; a 1 s poll keeps the alias lag out of the measure
        "HEMATOVISION_ALIAS_POLL_SECONDS": "1",
        # predictions open to anyone (as for a public demo): this measures throughput, not sign-in,
        # and the mlflow server it is compared with checks no credentials either
        "HEMATOVISION_PREDICT_REQUIRES_TOKEN": "false",
    }
    if batch_wait_ms is not None:
        env["HEMATOVISION_BATCH_WAIT_MS"] = str(batch_wait_ms)
    if alias is not None:
        env["HEMATOVISION_SERVE_ALIAS"] = alias
    command = [str(BIN / "bentoml"), "serve", service, "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    log = workdir / ("bentoml.log" if alias is None else f"bentoml-{alias}.log")
    return Server(name, command, env, f"{base}/readyz", log), base


def start_mlflow(workdir: Path) -> tuple[Server, str]:
    port = free_port()
    env = {**os.environ, **TELEMETRY_OFF, "MLFLOW_TRACKING_URI": get_settings().tracking_uri}
    command = [
        str(BIN / "mlflow"),
        "models",
        "serve",
        "-m",
        f"models:/{get_settings().registry.registered_model}@champion",
        "--env-manager",
        "local",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    base = f"http://127.0.0.1:{port}"
    return Server("mlflow models serve", command, env, f"{base}/ping", workdir / "mlflow.log"), base


def ours_target(base: str, images: list[tuple[str, bytes]], server: str = "ours") -> Target:
    bodies = []
    for name, data in images:
        prepared = requests.Request("POST", f"{base}/predict", files={"image": (name, data, "image/jpeg")}).prepare()
        bodies.append((prepared.body, {"Content-Type": prepared.headers["Content-Type"]}))

    def parse(content: bytes) -> dict:
        answer = json.loads(content)
        if "label" not in answer:
            raise ValueError(f"no label in {answer}")
        return {
            "label": answer["label"],
            "model_version": str(answer.get("model_version")),
            "model_flavour": answer.get("model_flavour"),
        }

    return Target(server, f"{base}/predict", bodies, parse)


def mlflow_target(base: str, images: list[tuple[str, bytes]]) -> Target:
    # A binary column travels as base64 text in JSON; the scoring server decodes it because the
    # signature says the column is binary (mlflow.utils.proto_json_utils), so the pyfunc gets bytes.
    headers = {"Content-Type": "application/json"}
    bodies = [
        (
            json.dumps({"dataframe_split": {"columns": ["image"], "data": [[b64encode(data).decode()]]}}).encode(),
            headers,
        )
        for _, data in images
    ]

    def parse(content: bytes) -> dict:
        rows = json.loads(content)["predictions"]
        if len(rows) != 1 or "label" not in rows[0]:
            raise ValueError(f"unexpected answer {rows}")
        return {"label": rows[0]["label"], "model_version": None}

    return Target("mlflow", f"{base}/invocations", bodies, parse)


def labels(target: Target, count: int) -> tuple[list[str], set[str | None]]:
    """The labels a server gives to the first ``count`` images, one request at a time, and the
    flavours that answered (None: a server that does not say)."""
    out, flavours = [], set()
    with requests.Session() as session:
        for i in range(count):
            body, headers = target.bodies[i]
            response = session.post(target.url, data=body, headers=headers, timeout=120)
            response.raise_for_status()
            answer = target.parse(response.content)
            out.append(answer["label"])
            flavours.add(answer.get("model_flavour"))
    return out, flavours


# --- the ceiling -------------------------------------------------------------------------------
def champion_flavours():
    """The champion's full model and its int8 flavour (the export registered with it, or one built
    here as the register step builds it), where the export came from, and the champion's version."""
    from hematovision.model.export import Int8Classifier
    from hematovision.params import load_params
    from hematovision.registry.packaging import INT8_SHA256_TAG, download_int8, load_classifier
    from hematovision.registry.registry import CHAMPION
    from hematovision.registry.tracking import point_mlflow
    from hematovision.training.steps import int8_export, load_manifest

    # Without this mlflow would open (and create) ./mlflow.db, not the project's registry.
    point_mlflow(get_settings())
    from hematovision import stores

    registry = stores.registry(get_settings())
    champion = registry.version_by_alias(CHAMPION)
    if champion is None:
        raise RuntimeError("no champion to benchmark")
    full = load_classifier(f"models:/{registry.name}/{champion.version}")
    if INT8_SHA256_TAG in champion.tags:
        with tempfile.TemporaryDirectory() as folder:
            export = download_int8(champion.run_id, folder, champion.tags[INT8_SHA256_TAG]).read_bytes()
        source = f"registered with v{champion.version} (serving_flavour={champion.tags.get('serving_flavour')})"
    else:
        settings = get_settings()
        export = int8_export(settings, load_params(Path("params.yaml")), full, load_manifest(settings))
        source = f"built here for v{champion.version} (registered before exports existed)"
    return full, Int8Classifier.from_classifier(full, export), source, str(champion.version)


def ceiling(
    images: list[tuple[str, bytes]], duration: float, max_images: int, classifier
) -> tuple[float, int, list[str]]:
    """In-process images/s of ``classifier`` on batches of 32: decode + checks + drift statistics
    (``prepare_image``) and crop + backbone over the test-time views + head (``run_model``), i.e.
    what the service does per batch without HTTP, logging and waiting. Returns also the tta views
    and the labels of the first images (the reference the servers are checked against)."""
    from hematovision.serving.batcher import run_model
    from hematovision.serving.images import prepare_image

    batches = itertools.cycle(
        [images[i : i + CEILING_BATCH] for i in range(0, len(images) - CEILING_BATCH + 1, CEILING_BATCH)]
    )

    def one(batch) -> tuple:
        return run_model(classifier, [prepare_image(data) for _, data in batch])

    answers = one(images[:CEILING_BATCH])  # warm-up: the first calls trace and allocate
    reference = answers.labels(classifier.classes)  # "unknown" where the service would say it
    done, started = 0, time.perf_counter()
    while time.perf_counter() - started < duration and done < max_images:
        one(next(batches))
        done += CEILING_BATCH
    return done / (time.perf_counter() - started), classifier.config.tta_views, reference


# --- the promote under load --------------------------------------------------------------------
@dataclass
class Switch:
    to_version: str
    alias_moved_s: float  # how long moving the alias took (the promote call)
    first_new_s: float | None  # from the alias move to the first answer from the new version
    last_old_s: float | None  # from the alias move to the end of the last answer from the old one


@dataclass
class PromoteResult:
    original: str
    copy: str | None = None
    switches: list[Switch] = field(default_factory=list)
    answers: int = 0
    failed: int = 0
    failures: list[str] = field(default_factory=list)
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    restored: bool = False
    note: str = ""


def wait_for_version(load: Load, version: str, since: float, timeout: float) -> tuple[float | None, float | None]:
    """Seconds from ``since`` to the first answer carrying ``version``, and to the end of the last
    answer that did not (once the new version has answered for 2 s, so stragglers are seen)."""
    deadline = since + timeout
    first = None
    while time.perf_counter() < deadline:
        with load._lock:
            fresh = [s for s in load.samples if s.end >= since and s.ok]
        new = [s.end for s in fresh if s.version == version]
        if new:
            first = min(new)
            if time.perf_counter() - first >= 2:
                old = [s.end for s in fresh if s.version != version]
                return first - since, (max(old) - since) if old else 0.0
        time.sleep(0.2)
    return None, None


def promote_under_load(target: Target, switch_timeout: float) -> PromoteResult:
    import mlflow

    from hematovision import stores
    from hematovision.params import PromoteParams
    from hematovision.registry import gate
    from hematovision.registry.registry import CHAMPION, HISTORY_TAG

    registry = stores.registry(get_settings())  # also points mlflow's process-wide URIs at it
    champion = registry.version_by_alias(CHAMPION)
    if champion is None:
        raise RuntimeError("no champion to benchmark")
    result = PromoteResult(original=str(champion.version))
    history = registry.client.get_registered_model(registry.name).tags.get(HISTORY_TAG)
    load: Load | None = None
    try:
        # Registered before the load starts: what is timed is the swap, not the registration.
        copy = mlflow.register_model(
            champion.source,
            registry.name,
            tags={"benchmark": "copy of the champion for benchmarks/serving.py; deleted after"},
        )
        result.copy = str(copy.version)
        load = Load(target, PROMOTE_CLIENTS).start()
        time.sleep(3)  # the load is steady before the alias moves
        window_start = time.perf_counter()

        moved = time.perf_counter()
        gate.promote(registry, result.copy, PromoteParams(), force=True)
        alias_s = time.perf_counter() - moved
        result.switches.append(
            Switch(result.copy, alias_s, *wait_for_version(load, result.copy, moved, switch_timeout))
        )

        moved = time.perf_counter()
        registry.client.set_registered_model_alias(registry.name, CHAMPION, result.original)
        alias_s = time.perf_counter() - moved
        result.switches.append(
            Switch(result.original, alias_s, *wait_for_version(load, result.original, moved, switch_timeout))
        )
        load.stop()
        window = [s for s in load.samples if s.start >= window_start]
        latencies = [(s.end - s.start) * 1000 for s in window if s.ok]
        result.answers = len(window)
        # Failures count over the whole load, the 3 s before the first move included.
        failures = [s for s in load.samples if not s.ok]
        result.failed, result.failures = len(failures), sorted({s.error for s in failures if s.error})[:3]
        result.p99_ms, result.max_ms = percentile(latencies, 99), max(latencies, default=float("nan"))
    finally:
        if load is not None:
            load.stop()
        # The registry ends as it began: champion on the original version, the history tag as it
        # was (promote appended to it), the copy gone (a soft delete; its number stays used).
        registry.client.set_registered_model_alias(registry.name, CHAMPION, result.original)
        if history is None:
            registry.client.delete_registered_model_tag(registry.name, HISTORY_TAG)
        else:
            registry.client.set_registered_model_tag(registry.name, HISTORY_TAG, history)
        if result.copy is not None:
            registry.client.delete_model_version(registry.name, result.copy)
        now = registry.version_by_alias(CHAMPION)
        result.restored = now is not None and str(now.version) == result.original
        if not result.restored:
            result.note = f"champion is on {now and now.version}, not {result.original}: FIX THE REGISTRY BY HAND"
    return result


# --- the int8 flavour as the service serves it --------------------------------------------------
class Int8Copy:
    """A copy of the champion registered with its int8 export and ``serving_flavour=int8`` under the
    alias ``INT8_ALIAS``, in a run of its own (the champion's run and tags stay as they were);
    ``remove()`` deletes the alias, the copy and its run."""

    def __init__(self, full, int8, champion_version: str) -> None:
        import mlflow

        from hematovision import stores
        from hematovision.model.export import INT8
        from hematovision.registry.packaging import FlavourDecision, log_classifier

        self.registry = stores.registry(get_settings())
        self.version: str | None = None
        self.folder = Path(tempfile.mkdtemp(prefix="hematovision-int8-copy-"))
        with mlflow.start_run(run_name="benchmark-int8-copy") as run:
            self.run_id = run.info.run_id
            mlflow.set_tag("benchmark", "copy of the champion for benchmarks/serving.py; deleted after")
            model_uri = log_classifier(full.save(self.folder / "classifier"))
        registered = mlflow.register_model(
            model_uri, self.registry.name, tags={"benchmark": f"int8 copy of v{champion_version}; deleted after"}
        )
        self.version = str(registered.version)
        self.registry.record_flavour(
            self.version, FlavourDecision(INT8, f"int8: benchmark copy of v{champion_version}"), int8.tflite_model
        )
        self.registry.client.set_registered_model_alias(self.registry.name, INT8_ALIAS, self.version)

    def remove(self) -> None:
        import shutil

        client = self.registry.client
        try:
            client.delete_registered_model_alias(self.registry.name, INT8_ALIAS)
        finally:
            if self.version is not None:
                client.delete_model_version(self.registry.name, self.version)
            client.delete_run(self.run_id)
            shutil.rmtree(self.folder, ignore_errors=True)


# --- the run -----------------------------------------------------------------------------------
def read_images(limit: int | None) -> list[tuple[str, bytes]]:
    """TEST images, classes interleaved so any prefix of the round-robin mixes all four."""
    per_class = [
        sorted(d.glob("*.jpeg")) + sorted(d.glob("*.jpg")) + sorted(d.glob("*.png"))
        for d in sorted(p for p in TEST_IMAGES.iterdir() if p.is_dir())
    ]
    paths = [p for group in itertools.zip_longest(*per_class) for p in group if p is not None]
    return [(p.name, p.read_bytes()) for p in paths[:limit]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=20, help="measured seconds per level (default 20)")
    parser.add_argument("--warmup", type=float, default=3, help="unmeasured seconds before each level (default 3)")
    parser.add_argument("--max-requests", type=int, default=20000, help="most answers measured per level")
    parser.add_argument("--levels", default=",".join(map(str, LEVELS)), help="concurrent clients, comma-separated")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        default=None,
        help="HEMATOVISION_BATCH_WAIT_MS for our service (default: the settings')",
    )
    parser.add_argument("--service", default=SERVICE, help=f"our service's import string (default {SERVICE})")
    parser.add_argument("--images", type=int, default=None, help="use only the first N TEST images")
    parser.add_argument("--skip-mlflow", action="store_true", help="only our service (for tuning runs)")
    parser.add_argument("--skip-int8", action="store_true", help="not our service's int8 flavour")
    parser.add_argument("--skip-promote", action="store_true")
    parser.add_argument("--no-record", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    if subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no", "src"], capture_output=True, text=True
    ).stdout.strip():
        commit += " (with uncommitted changes in src/)"
    settings = get_settings()
    batch_wait_ms = settings.serving.batch_wait_ms if args.batch_wait_ms is None else args.batch_wait_ms
    images = read_images(args.images)
    print(f"{len(images)} TEST images in memory; levels {levels}; {args.duration:.0f} s each", flush=True)

    full, int8, int8_source, champion_version = champion_flavours()
    ceilings: dict[str, float] = {}
    references: dict[str, list[str]] = {}
    for flavour, classifier in (("full", full), ("int8", int8))[: 1 if args.skip_int8 else 2]:
        ceilings[flavour], tta_views, references[flavour] = ceiling(
            images, args.duration, args.max_requests, classifier
        )
        print(
            f"ceiling {flavour} (in-process, batches of {CEILING_BATCH}, {tta_views} views): "
            f"{ceilings[flavour]:.1f} images/s",
            flush=True,
        )

    results: list[LevelResult] = []
    promote: PromoteResult | None = None
    startup: dict[str, float] = {}
    agreement: dict[str, str] = {}
    workdir = Path(tempfile.mkdtemp(prefix="hematovision-serving-bench-"))
    print(f"server logs in {workdir}", flush=True)
    copy: Int8Copy | None = None
    starters = [("ours", lambda: start_ours(workdir, args.batch_wait_ms, args.service), ours_target, "full")]
    if not args.skip_int8:
        starters.append(
            (
                "ours-int8",
                lambda: start_ours(workdir, args.batch_wait_ms, args.service, INT8_ALIAS),
                lambda base, images: ours_target(base, images, "ours-int8"),
                "int8",
            )
        )
    if not args.skip_mlflow:
        starters.append(("mlflow", lambda: start_mlflow(workdir), mlflow_target, "full"))
    for name, start, make_target, flavour in starters:
        if name == "ours-int8":
            copy = Int8Copy(full, int8, champion_version)
        server, base = start()
        try:  # one server at a time: two on two cores would measure each other
            startup[name] = server.wait_ready()
            target = make_target(base, images)
            got, flavours = labels(target, 16)
            same = sum(a == b for a, b in zip(got, references[flavour]))
            agreement[name] = f"{same}/{len(got)} (vs in-process {flavour})"
            print(
                f"{name}: ready in {startup[name]:.0f} s; flavour {flavours}; labels agree with in-process "
                f"{flavour} on {same}/{len(got)} images",
                flush=True,
            )
            if name == "ours-int8" and flavours != {"int8"}:
                raise RuntimeError(f"the int8 server answered with {flavours}, not int8: see {server.log}")
            for clients in levels:
                level = run_level(target, clients, args.duration, args.warmup, args.max_requests)
                results.append(level)
                print(
                    f"  {name} x{clients}: {level.throughput:.1f} req/s, p50 {level.p50:.0f} ms, "
                    f"p95 {level.p95:.0f} ms, p99 {level.p99:.0f} ms, errors {level.errors} "
                    f"{level.error_examples or ''}",
                    flush=True,
                )
            if name == "ours" and not args.skip_promote:
                promote = promote_under_load(target, switch_timeout=180)
                print(f"  promote: {promote}", flush=True)
        finally:
            server.stop()
            if copy is not None:
                copy.remove()
                copy = None

    lines = report(
        args,
        commit,
        settings,
        batch_wait_ms,
        tta_views,
        len(images),
        ceilings,
        int8_source,
        startup,
        agreement,
        results,
        promote,
        workdir,
    )
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        record(lines)


def report(
    args,
    commit,
    settings,
    batch_wait_ms,
    tta_views,
    n_images,
    ceilings,
    int8_source,
    startup,
    agreement,
    results,
    promote,
    workdir,
) -> list[str]:
    ceiling_rate = ceilings["full"]

    def verdict(ok: bool | None) -> str:
        return "n/a" if ok is None else ("PASS" if ok else "FAIL")

    by = {(r.server, r.clients): r for r in results}
    lines = [
        f"\n## Serving load benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}",
        f"- settings: {args.duration:.0f} s per level after {args.warmup:.0f} s warm-up (at most {args.max_requests} "
        f"answers); {n_images} TEST images round-robin, one per request; {tta_views} test-time views; "
        f"max_batch_images {settings.serving.max_batch_images}, batch_wait_ms {batch_wait_ms:g}; closed-loop client threads",
        f"- servers: ours = `bentoml serve {args.service}` (POST /predict, multipart) with the champion's full model, "
        + ("" if args.skip_int8 else f"ours-int8 = the same serving an int8 copy of it (export {int8_source}), ")
        + "mlflow = `mlflow models serve -m models:/hematovision@champion --env-manager local` "
        "(POST /invocations, base64 in `dataframe_split`); one at a time; ready after "
        + ", ".join(f"{k} {v:.0f} s" for k, v in startup.items())
        + "; labels agreeing with the in-process model on the first 16 images: "
        + ", ".join(f"{k} {v}" for k, v in agreement.items()),
        "",
        "| server | clients | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.server} | {r.clients} | {r.throughput:.1f} | {r.p50:.0f} | {r.p95:.0f} | {r.p99:.0f} | {r.errors} |"
        )
    lines.append(
        f"\nCeiling (champion in-process, one thread: `prepare_image` then `run_model`, batches of "
        f"{CEILING_BATCH}): "
        + ", ".join(f"{flavour} {rate:.1f} images/s" for flavour, rate in ceilings.items())
        + ". The service can pass it: its request threads "
        "decode and localise while the model calls run (`model_calls` at once)."
    )
    for r in results:
        if r.error_examples:
            lines.append(f"\nErrors, {r.server} x{r.clients}: " + "; ".join(r.error_examples))
    if promote is not None:
        lines.append(
            f"\nPromote under load ({PROMOTE_CLIENTS} clients, alias polled every 1 s): copy v{promote.copy} "
            f"of champion v{promote.original}; {promote.answers} answers in the window, "
            f"{promote.failed} failed; p99 {promote.p99_ms:.0f} ms, max {promote.max_ms:.0f} ms during it"
        )
        for s in promote.switches:
            first = "never" if s.first_new_s is None else f"{s.first_new_s:.1f} s"
            last = "-" if s.last_old_s is None else f"{s.last_old_s:.1f} s"
            lines.append(
                f"- champion -> v{s.to_version} (alias move {s.alias_moved_s:.2f} s): first answer from "
                f"v{s.to_version} after {first}, last answer from the previous version ended at {last}"
            )
        lines.append(
            f"- registry restored (champion on v{promote.original}, copy deleted): "
            f"{'yes' if promote.restored else 'NO'} {promote.note}"
        )
        if promote.failures:
            lines.append("- failures: " + "; ".join(promote.failures))
    ours8, mlflow8, int8_8 = by.get(("ours", 8)), by.get(("mlflow", 8)), by.get(("ours-int8", 8))
    ours_results = [r for r in results if r.server in ("ours", "ours-int8")]
    targets = [
        (
            "ours >= 3x mlflow's throughput at 8 clients",
            None if not (ours8 and mlflow8) else ours8.throughput >= 3 * mlflow8.throughput,
            f"{ours8.throughput / mlflow8.throughput:.2f}x" if ours8 and mlflow8 and mlflow8.throughput else "-",
        ),
        (
            "ours at 8 clients >= 80% of the in-process ceiling",
            None if not ours8 else ours8.throughput >= 0.8 * ceiling_rate,
            f"{ours8.throughput / ceiling_rate:.0%}" if ours8 else "-",
        ),
        (
            "ours-int8 at 8 clients above ours (full) at 8 clients",
            None if not (ours8 and int8_8) else int8_8.throughput > ours8.throughput,
            f"{int8_8.throughput / ours8.throughput:.2f}x" if ours8 and int8_8 and ours8.throughput else "-",
        ),
        (
            "our p99 at 8 clients < 1 s",
            None if not ours8 else ours8.p99 < 1000,
            f"{ours8.p99:.0f} ms" if ours8 else "-",
        ),
        (
            "zero errors (our service, both flavours, every level)",
            None if not ours_results else all(r.errors == 0 for r in ours_results),
            f"{sum(r.errors for r in ours_results)}",
        ),
        (
            "zero failed requests during the promote, and the service followed both moves",
            None
            if promote is None
            else (
                promote.failed == 0 and all(s.first_new_s is not None for s in promote.switches) and promote.restored
            ),
            "-" if promote is None else f"{promote.failed} failed",
        ),
    ]
    lines.append("\nTargets:")
    for name, ok, value in targets:
        lines.append(f"- {verdict(ok)} — {name} ({value})")
    mlflow_errors = sum(r.errors for r in results if r.server == "mlflow")
    if mlflow_errors:
        lines.append(f"- (mlflow models serve had {mlflow_errors} errors)")
    print(f"server logs: {workdir}")
    return lines


if __name__ == "__main__":
    main()
