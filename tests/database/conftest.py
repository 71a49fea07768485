"""Fixtures of the database tests: a real PostgreSQL server for the session (``tests/postgres.py``)
and, per test, fresh stores on either backend (``backend`` runs a test once on sqlite files and once
on a database of its own in that server)."""

from __future__ import annotations

from pathlib import Path

import pytest

from postgres import PostgresServer, postgres_bindir


@pytest.fixture(scope="session")
def postgres():
    """The session's PostgreSQL server, running at the start of every test that asks for it."""
    bindir = postgres_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL binaries (apt-get install postgresql; .ci/run installs them)")
    server = PostgresServer(bindir)
    server.start()
    yield server
    server.destroy()


@pytest.fixture
def postgres_url(postgres) -> str:
    """A fresh database in the running server (a test that stopped the server gets it back)."""
    if not postgres.running():
        postgres.start()
    return postgres.new_database()


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request, tmp_path) -> dict[str, str | Path]:
    """Where each store lives for this run: its own sqlite file, or one fresh PostgreSQL database."""
    if request.param == "sqlite":
        return {
            "lab": tmp_path / "lab.sqlite",
            "predictions": tmp_path / "predictions.sqlite",
            "monitoring": tmp_path / "monitor.sqlite",
        }
    url = request.getfixturevalue("postgres_url")
    return dict.fromkeys(("lab", "predictions", "monitoring"), url)
