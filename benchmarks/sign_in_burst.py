"""Does a burst of sign-ins stall the event loop? /healthz latency while 200 sign-ins with made-up
names arrive at once.

    uv run --frozen python benchmarks/sign_in_burst.py [--sign-ins 200] [--concurrency 200]

The service's account, model and ops routes (the real ``account_routes``: Argon2id at 64 MiB per
verification, the sign-in limit and the audit log in a throwaway lab database) and an async
``/healthz`` on one FastAPI app, served by uvicorn (one worker, one event loop, as a BentoML
worker serves them) in a child process. The probe, in this process, asks /healthz one request
after another (10 ms apart) for a few seconds before the burst (baseline) and during it; the burst
comes from a third process, ``--concurrency`` connections at once. Prints p50/p99/max of /healthz in
both phases and how long the burst took, and appends them to ``benchmarks/RESULTS.md`` with the date,
the machine and the commit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime

import requests
from training import machine, record

P99_TARGET_MS = 100.0


def serve(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI

    from hematovision.api import account_routes, errors, model_routes, ops_routes

    app = FastAPI()
    for routes in (account_routes, model_routes, ops_routes):
        app.include_router(routes.router)
    errors.install(app)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"ok": True}

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", workers=1)


def burst(url: str, sign_ins: int, concurrency: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        body = {"username": f"madeup{i:05d}{os.getpid()}", "password": "not the password at all"}
        return requests.post(f"{url}/login", data=body, timeout=600).status_code

    started = time.monotonic()
    with ThreadPoolExecutor(concurrency) as pool:
        codes = list(pool.map(one, range(sign_ins)))
    print(json.dumps({"seconds": time.monotonic() - started, "codes": {c: codes.count(c) for c in set(codes)}}))


def probe(url: str, stop: threading.Event, out: list[float]) -> None:
    session = requests.Session()
    while not stop.is_set():
        started = time.perf_counter()
        assert session.get(f"{url}/healthz", timeout=60).status_code == 200
        out.append((time.perf_counter() - started) * 1000)
        time.sleep(0.01)


def summary(latencies: list[float]) -> str:
    q = statistics.quantiles(latencies, n=100)
    return f"n={len(latencies)} p50={q[49]:.1f} ms p99={q[98]:.1f} ms max={max(latencies):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sign-ins", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--baseline-seconds", type=float, default=3.0)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--burst", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        return serve(args.serve)
    if args.burst:
        return burst(args.burst, args.sign_ins, args.concurrency)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    project = tempfile.mkdtemp(prefix="hv-sign-in-burst-")
    env = {**os.environ, "HEMATOVISION_PROJECT_DIR": project, "HEMATOVISION_LOGIN_ATTEMPTS": "1000000"}
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], env=env)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                requests.get(f"{url}/healthz", timeout=1)
                break
            except requests.RequestException:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.2)
        for _ in range(20):  # warm-up: the lab database made, Argon2 paid once
            requests.get(f"{url}/healthz", timeout=5)
        requests.post(f"{url}/login", data={"username": "warmup", "password": "x" * 12}, timeout=60)

        stop, baseline, during = threading.Event(), [], []
        thread = threading.Thread(target=probe, args=(url, stop, baseline))
        thread.start()
        time.sleep(args.baseline_seconds)
        stop.set()
        thread.join()

        stop = threading.Event()
        thread = threading.Thread(target=probe, args=(url, stop, during))
        thread.start()
        attack = subprocess.run(
            [sys.executable, __file__, "--burst", url, "--sign-ins", str(args.sign_ins)]
            + ["--concurrency", str(args.concurrency)],
            capture_output=True,
            text=True,
            check=True,
        )
        stop.set()
        thread.join()
        result = json.loads(attack.stdout.strip().splitlines()[-1])
        p99 = statistics.quantiles(during, n=100)[98]
        print(f"cores: {os.cpu_count()}, load average before: {os.getloadavg()[0]:.2f}")
        print(f"/healthz before the burst: {summary(baseline)}")
        print(
            f"/healthz during {args.sign_ins} sign-ins ({args.concurrency} at once, "
            f"{result['seconds']:.1f} s, answers {result['codes']}): {summary(during)}"
        )
        print(
            f"p99 during the burst {p99:.1f} ms: {'PASS' if p99 <= P99_TARGET_MS else 'FAIL'} (target {P99_TARGET_MS} ms)"
        )
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        record(
            [
                f"\n## Sign-in burst: /healthz latency — {datetime.now(UTC):%Y-%m-%d %H:%M} UTC",
                f"- machine: {machine()}; load average before: {os.getloadavg()[0]:.2f}",
                f"- commit: {commit or 'unknown'}; the account, model and ops routes and an async /healthz under "
                "uvicorn (one worker), a throwaway lab database",
                f"- /healthz before the burst: {summary(baseline)}",
                f"- /healthz during {args.sign_ins} sign-ins with made-up names ({args.concurrency} at once, "
                f"{result['seconds']:.1f} s, answers {result['codes']}): {summary(during)}",
                f"- p99 during the burst {p99:.1f} ms against the target of {P99_TARGET_MS:.0f} ms: "
                f"{'met' if p99 <= P99_TARGET_MS else 'NOT met'}",
            ]
        )
    finally:
        server.terminate()
        server.wait(30)
        shutil.rmtree(project, ignore_errors=True)


if __name__ == "__main__":
    main()
