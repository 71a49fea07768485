"""Lab mode's registry: a real ``mlflow server`` (sqlite backend, proxied artifacts) reached over HTTP only.

The client runs in a folder of its own with nothing but the tracking URI set (as another machine
would): the run, its model, the registered version, its lineage tags and the ``champion`` alias go
to the server and come back from it, the artifacts as ``mlflow-artifacts:`` URIs served by the
server from its ``--artifacts-destination``, and nothing is written under the client's ``mlruns/``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hematovision import stores
from hematovision.registry.registry import CHAMPION
from hematovision.registry.tracking import configure_mlflow, is_tracking_server
from hematovision.settings import ENV_PREFIX, TELEMETRY_OFF, get_settings

from conftest import free_port, stop_service


def test_only_http_stores_are_tracking_servers():
    assert is_tracking_server("http://mlflow.lab:5000")
    assert is_tracking_server("HTTPS://mlflow.lab")
    for local in ("sqlite:///mlruns/mlflow.db", "file:///srv/mlruns", "mlruns", "postgresql://db/mlflow"):
        assert not is_tracking_server(local)


@pytest.fixture
def mlflow_server(tmp_path) -> str:
    """``mlflow server`` on a free 127.0.0.1 port, sqlite backend, artifacts proxied from a folder."""
    home = tmp_path / "server"
    home.mkdir()
    port = free_port()
    env = {**os.environ, **TELEMETRY_OFF, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # 2 processes, not 10
    log = (home / "server.log").open("wb")
    server = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{home}/mlflow.db",
            "--artifacts-destination",
            str(home / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=home,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while True:
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            stop_service(server)
            pytest.fail(f"mlflow server did not start:\n{(home / 'server.log').read_text()[-3000:]}")
        time.sleep(0.5)
    yield url
    stop_service(server)
    log.close()


@pytest.mark.e2e
def test_a_version_and_its_champion_alias_over_http_only(mlflow_server, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient

    client_dir = tmp_path / "client"
    client_dir.mkdir()
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("HEMATOVISION_PROJECT_DIR", str(client_dir))
    monkeypatch.setenv("HEMATOVISION_MLFLOW_TRACKING_URI", mlflow_server)
    monkeypatch.setenv("HEMATOVISION_REGISTERED_MODEL", "tracking-server-test")
    monkeypatch.chdir(client_dir)
    previous_uri = mlflow.get_tracking_uri()
    get_settings.cache_clear()
    try:
        settings = get_settings()
        assert configure_mlflow(settings) == mlflow_server
        experiment = mlflow.get_experiment_by_name(settings.registry.experiment_name)
        assert experiment.artifact_location.startswith("mlflow-artifacts:"), experiment.artifact_location

        class Doubler(mlflow.pyfunc.PythonModel):
            def predict(self, context, model_input, params=None):
                return model_input * 2

        with mlflow.start_run() as run:
            mlflow.log_metric("val_macro_f1", 0.9)
            info = mlflow.pyfunc.log_model(name="model", python_model=Doubler(), pip_requirements=["mlflow"])
        assert run.info.artifact_uri.startswith("mlflow-artifacts:"), run.info.artifact_uri
        registry = stores.registry(settings)
        version = registry.register(info.model_uri, {"data_hash": "d" * 32, "corrections_hash": "c" * 32})
        registry.move_champion(version)

        # Read back by a fresh client that knows nothing but the server's address.
        reader = MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)
        champion = reader.get_model_version_by_alias("tracking-server-test", CHAMPION)
        assert str(champion.version) == version
        assert champion.tags["data_hash"] == "d" * 32
        assert reader.get_run(champion.run_id).data.metrics["val_macro_f1"] == 0.9
        model = mlflow.pyfunc.load_model(f"models:/tracking-server-test@{CHAMPION}")  # artifacts over HTTP
        assert model.predict(pd.DataFrame({"x": [1.5]}))["x"].tolist() == [3.0]
    finally:
        mlflow.set_tracking_uri(previous_uri)
        get_settings.cache_clear()

    assert not (client_dir / "mlruns").exists(), list(client_dir.rglob("*"))
    served = tmp_path / "server" / "artifacts"
    assert any(p.name == "MLmodel" for p in served.rglob("*")), "the server did not keep the model's artifacts"
