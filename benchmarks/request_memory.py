"""How much memory one request can make the service take: the peak growth of the resident memory of
the whole service (``bentoml serve`` and its workers) while it answers one ``/predict_batch``.

    uv run --frozen python benchmarks/request_memory.py [--project DIR] [--src SRC] [--images 64] [--side 6300]

The project must have a champion (``hematovision run``). ``--src`` serves another checkout's
``src`` (e.g. a ``git worktree`` of an older commit) to compare before and after a change. The
images are flat PNGs: a few hundred kilobytes on the wire, ``side``² pixels each once decoded.
Predictions and images go to a temporary folder, not the project's prediction log. A measurement,
not a test: it takes minutes and the numbers depend on the machine; each run appends them to
``benchmarks/RESULTS.md`` with the date, the machine and the commit.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import subprocess
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import psutil
import requests
from PIL import Image
from training import machine, record

from hematovision.api.process import start_service, stop_service


def flat_png(side: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (side, side), (214, 190, 200)).save(buffer, "PNG")
    return buffer.getvalue()


def tree_rss(pid: int) -> int:
    """Resident memory of a process and all its descendants, in bytes."""
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for process in processes:
        try:
            total += process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def measure(url: str, pid: int, files: list, label: str) -> dict:
    baseline_samples = []
    for _ in range(20):
        baseline_samples.append(tree_rss(pid))
        time.sleep(0.05)
    baseline = statistics.median(baseline_samples)
    peak, done = baseline, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, tree_rss(pid))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    response = requests.post(f"{url}/predict_batch", files=files, timeout=600)
    elapsed = time.monotonic() - started
    time.sleep(0.5)
    done.set()
    sampler.join()
    after = tree_rss(pid)
    alive = requests.get(f"{url}/healthz", timeout=30).status_code
    result = {
        "case": label,
        "status": response.status_code,
        "answer": response.text[:160],
        "seconds": round(elapsed, 1),
        "baseline_mb": round(baseline / 2**20),
        "peak_growth_mb": round((peak - baseline) / 2**20),
        "after_growth_mb": round((after - baseline) / 2**20),
        "healthz": alive,
    }
    print(result, flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--project", type=Path, default=Path.cwd())
    parser.add_argument("--src", type=Path, default=None, help="serve this checkout's src/ instead")
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--side", type=int, default=6300)
    parser.add_argument("--under-budget", type=int, default=2, help="also send this many (0: skip)")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="request-memory-"))
    env = {
        **os.environ,
        "HEMATOVISION_PREDICTIONS_DB": str(work / "predictions.sqlite"),
        "HEMATOVISION_IMAGES_DIR": str(work / "images"),
        "HEMATOVISION_REVIEW_IMAGE_DAYS": "0",
        "HEMATOVISION_RETAIN_IMAGES_DAYS": "0",
        "BENTOML_HOME": str(work / "bentoml"),
        # predictions open to anyone (as for a public demo): this measures a batch's memory, not sign-in
        "HEMATOVISION_PREDICT_REQUIRES_TOKEN": "false",
    }
    if args.src is not None:
        env["PYTHONPATH"] = str(args.src.resolve())
    png = flat_png(args.side)
    print(f"{args.images} flat PNGs of {args.side}x{args.side}, {len(png) // 1024} KB each", flush=True)
    server, url = start_service(args.project.resolve(), work / "service.log", env, timeout=300)
    results = []
    try:
        files = [("images", (f"{i}.png", png, "image/png")) for i in range(args.images)]
        results.append(measure(url, server.pid, files, f"{args.images} images"))
        if args.under_budget:
            files = [("images", (f"{i}.png", png, "image/png")) for i in range(args.under_budget)]
            results.append(measure(url, server.pid, files, f"{args.under_budget} images"))
    finally:
        stop_service(server)
    source = args.src or Path(__file__).resolve().parents[1] / "src"
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=source, capture_output=True, text=True
    ).stdout.strip()
    lines = [
        f"\n## One request's memory: /predict_batch of flat PNGs — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
        f"- machine: {machine()}",
        f"- commit: {commit or 'unknown'} (src {source}); project {args.project.resolve()}; flat PNGs of "
        f"{args.side}x{args.side}, {len(png) // 1024} KB each",
        "",
        "| request | answer | seconds | peak growth of the service's RSS | growth after | /healthz after |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        answer = f"{r['status']}" + (f" {r['answer'][:60]}" if r["status"] != 200 else "")
        lines.append(
            f"| {r['case']} | {answer} | {r['seconds']} | {r['peak_growth_mb']} MB | "
            f"{r['after_growth_mb']} MB | {r['healthz']} |"
        )
    record(lines)


if __name__ == "__main__":
    main()
