"""Helpers for tests that run the lab's servers as processes on 127.0.0.1: the Prefect REST API,
waiting for something to happen (a liveness bound, never a measured duration) and a ``prefect
server``. Imported by the tests under ``tests/deploy`` (``pytest`` puts ``tests/`` on the path)."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from hematovision.api.process import stop_service

BIN = Path(sys.executable).parent  # the hematovision, prefect and mlflow CLIs of this environment


# What Prefect's own client retries: a server briefly unable to answer (on sqlite, a write lock held
# by its background services on a busy machine answers 503), not a refusal.
RETRIED_STATUSES = (429, 502, 503)


def api(base: str, path: str, body: dict | None = None, method: str | None = None) -> dict | list | None:
    """One call to a JSON API (Prefect's REST API): GET without a body, POST with one; retried as
    Prefect's client retries it (a few times, backing off) while the server answers it is busy."""
    request = urllib.request.Request(
        f"{base}{path}",
        data=None if body is None else json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method=method or ("GET" if body is None else "POST"),
    )
    for attempt in range(6):
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                content = answer.read()
                return json.loads(content) if content else None
        except urllib.error.HTTPError as error:
            if error.code not in RETRIED_STATUSES or attempt == 5:
                raise
            time.sleep(2**attempt)
    raise AssertionError("unreachable")


def wait_for(what: str, check: Callable[[], object], timeout: float, logs: list[Path]) -> object:
    """``check()`` until it returns something true; fails with the logs' tails after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
        except OSError:
            result = None
        if result:
            return result
        if time.monotonic() > deadline:
            tails = "\n".join(f"--- {p}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists())
            pytest.fail(f"{what} did not happen within {timeout} s\n{tails}")
        time.sleep(0.5)


@contextlib.contextmanager
def prefect_server(
    home: Path, port: int, env: dict[str, str], *, scheduler: bool, timeout: float = 90
) -> Iterator[Path]:
    """A ``prefect server start`` answering on the port (working directory ``home``); yields its log
    file, stops it afterwards."""
    server_log = home / "prefect-server.log"
    with server_log.open("wb") as out:
        server = subprocess.Popen(
            [BIN / "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port), "--no-ui"]
            + ([] if scheduler else ["--no-scheduler"])
            + ["--analytics-off"],
            cwd=home,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for("the Prefect server answering", lambda: api(env["PREFECT_API_URL"], "/health"), timeout, [server_log])
        yield server_log
    finally:
        stop_service(server)
