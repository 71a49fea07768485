"""The real service as a child process: ``bentoml serve hematovision.api.service:HematoVision`` on a free
local port, ready once it answers ``/readyz``. Used by the demo and by the tests; :func:`with_workers`
is how ``hematovision serve`` and this module give BentoML the worker count (``serving.workers``)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil

SERVICE_NAME = "hematovision"  # @bentoml.service(name=...) in api/service.py
OVERRIDES = "BENTOML_CONFIG_OVERRIDES"  # BentoML's JSON config overrides, merged over the decorator's


def with_workers(env: dict[str, str], workers: int) -> dict[str, str]:
    """``env`` with BentoML told to start ``workers`` worker processes for the service (the
    decorator's ``workers=1`` is only its default); other overrides in ``env`` are kept."""
    overrides = json.loads(env.get(OVERRIDES) or "{}")
    overrides.setdefault("services", {}).setdefault(SERVICE_NAME, {})["workers"] = workers
    return {**env, OVERRIDES: json.dumps(overrides)}


class ServiceStartError(RuntimeError):
    """The service exited or did not become ready in time (the message ends with its log)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(
    project_dir: Path,
    log: Path,
    env: dict | None = None,
    timeout: float = 180,
    host: str = "127.0.0.1",
    port: int | None = None,
    workers: int = 1,
) -> tuple[subprocess.Popen, str]:
    """Start ``bentoml serve`` in ``project_dir`` (its own process group, output to ``log``) with
    ``workers`` worker processes and wait until ``/readyz`` answers 200; returns the process and the
    base URL."""
    port = port or free_port()
    bentoml = str(Path(sys.executable).parent / "bentoml")
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as out:
        server = subprocess.Popen(
            [bentoml, "serve", "hematovision.api.service:HematoVision", "--host", host, "--port", str(port)],
            cwd=project_dir,
            env=with_workers(env if env is not None else dict(os.environ), workers),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://{host}:{port}"
    deadline = time.monotonic() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"{url}/readyz", timeout=5).status == 200:
                return server, url
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_service(server)
            raise ServiceStartError(f"the service did not become ready:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(1)


def stop_service(server: subprocess.Popen, kill: bool = False) -> None:
    """Stop the server and its workers. BentoML starts each worker in a session of its own, so the
    server's process group does not reach them: on SIGTERM the server stops them itself, but a
    SIGKILLed server would leave them running (holding memory and a model), so they are killed too."""
    try:
        workers = psutil.Process(server.pid).children(recursive=True) if kill else []
        os.killpg(server.pid, signal.SIGKILL if kill else signal.SIGTERM)
    except (ProcessLookupError, psutil.NoSuchProcess):
        return
    for worker in workers:
        try:
            worker.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        server.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(10)
