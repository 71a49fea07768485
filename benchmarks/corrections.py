"""Corrections benchmark: how many corrections per second the real service takes from 8 reviewers
at once, and whether every acknowledged one is in the store.

    uv run --frozen python benchmarks/corrections.py [--reviewers 8] [--duration 20]

Starts ``bentoml serve`` of the registry's champion (as `hematovision serve` does) with a
throwaway lab database, corrections folder and prediction log, creates ``--reviewers``
pathologist accounts with API tokens, and has each reviewer POST /feedback in a closed loop for
``--duration`` seconds (at most ``--max-corrections`` in all): a real TEST image each time, a
class and a comment, as a pathologist's correction that is not tied to a kept prediction.
Afterwards the rows in the store are counted against the answers acknowledged with 201: any
acknowledged correction missing from the store is a lost one (the target is zero).

Appends a dated section to benchmarks/RESULTS.md (``--no-record`` to only print).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import requests
from serving import BIN, ROOT, SERVICE, Server, free_port, percentile, read_images
from training import machine, record

from hematovision import CLASSES, stores
from hematovision.settings import TELEMETRY_OFF, get_settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reviewers", type=int, default=8)
    parser.add_argument("--duration", type=float, default=20, help="measured seconds (default 20)")
    parser.add_argument("--max-corrections", type=int, default=5000)
    parser.add_argument("--no-record", action="store_true", help="print the section, do not append it to RESULTS.md")
    args = parser.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="hematovision-corrections-bench-"))
    lab_db, corrections_dir = workdir / "lab.sqlite", workdir / "corrections"
    # The throwaway lab database the service is pointed at below, opened here the way the service opens it.
    scratch = get_settings().with_changes(lab={"lab_db": lab_db, "corrections_images_dir": corrections_dir})
    tokens = []
    accounts = stores.accounts(scratch)
    for n in range(args.reviewers):
        accounts.add_user(f"reviewer{n}", "benchmark password 123", ["pathologist"])
        tokens.append(accounts.create_token(f"reviewer{n}", "benchmark"))
    images = read_images(400)

    port = free_port()
    env = {
        **os.environ,
        **TELEMETRY_OFF,
        "HEMATOVISION_LAB_DB": str(lab_db),
        "HEMATOVISION_CORRECTIONS_IMAGES_DIR": str(corrections_dir),
        "HEMATOVISION_PREDICTIONS_DB": str(workdir / "predictions.sqlite"),
        "HEMATOVISION_IMAGES_DIR": str(workdir / "images"),
    }
    base = f"http://127.0.0.1:{port}"
    server = Server(
        "bentoml (ours)",
        [str(BIN / "bentoml"), "serve", SERVICE, "--host", "127.0.0.1", "--port", str(port)],
        env,
        f"{base}/readyz",
        workdir / "bentoml.log",
    )
    acknowledged: list[str] = []
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def reviewer(index: int) -> None:
        session = requests.Session()
        session.headers["Authorization"] = f"Bearer {tokens[index]}"
        n = index
        while not stop.is_set():
            name, data = images[n % len(images)]
            data += n.to_bytes(8, "big")  # bytes after the JPEG's end: a distinct image (and file) every time
            true_class = CLASSES[n % len(CLASSES)]
            n += args.reviewers
            started = time.perf_counter()
            try:
                response = session.post(
                    f"{base}/feedback",
                    files={"image": (name, data)},
                    data={"true_class": true_class, "comment": "benchmark"},
                    timeout=30,
                )
            except requests.RequestException as error:
                with lock:
                    errors.append(type(error).__name__)
                continue
            elapsed = time.perf_counter() - started
            with lock:
                if response.status_code == 201:
                    acknowledged.append(response.json()["id"])
                    latencies.append(elapsed * 1000)
                    if len(acknowledged) >= args.max_corrections:
                        stop.set()
                else:
                    errors.append(str(response.status_code))

    try:
        startup = server.wait_ready()
        print(f"service ready in {startup:.0f} s; {args.reviewers} reviewers for {args.duration:.0f} s", flush=True)
        threads = [threading.Thread(target=reviewer, args=(i,)) for i in range(args.reviewers)]
        started = time.perf_counter()
        for t in threads:
            t.start()
        stop.wait(args.duration)
        stop.set()
        for t in threads:
            t.join()
        elapsed = time.perf_counter() - started
    finally:
        server.stop()

    stored = {row["id"] for row in stores.corrections(scratch).all()}
    lost = len(set(acknowledged) - stored)
    rate = len(acknowledged) / elapsed
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT
    ).stdout.strip()
    lines = [
        f"\n## Corrections benchmark — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit}; {args.reviewers} concurrent reviewers (API tokens), POST /feedback with a real TEST "
        f"image each, closed loop for {elapsed:.0f} s, into a throwaway lab database",
        f"- corrections acknowledged: {len(acknowledged)} ({rate:.1f}/s); latency p50 {percentile(latencies, 50):.0f} ms, "
        f"p95 {percentile(latencies, 95):.0f} ms, p99 {percentile(latencies, 99):.0f} ms; errors {len(errors)}"
        + (f" ({', '.join(sorted(set(errors)))})" if errors else ""),
        f"- in the store afterwards: {len(stored)}; acknowledged but missing (lost): {lost} "
        f"— {'PASS' if lost == 0 and len(stored) == len(acknowledged) else 'FAIL'} (target: zero lost)",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not args.no_record:
        record(lines)


if __name__ == "__main__":
    main()
