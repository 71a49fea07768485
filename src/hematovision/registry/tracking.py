"""Pointing MLflow at the configured store, and the code version every run records.

MLflow is imported inside the functions: it takes seconds to import, and commands that never touch
the registry (``hematovision predict`` on a local folder, the web pages' tests) should not pay it.
"""

from __future__ import annotations

import subprocess
from pathlib import Path
from urllib.parse import urlparse

from hematovision.settings import Settings, get_settings

SERVER_SCHEMES = frozenset({"http", "https"})


def point_mlflow(settings: Settings | None = None) -> str:
    """Point MLflow's process-wide tracking and registry URIs at the configured store; returns it."""
    import mlflow

    settings = settings or get_settings()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        # sqlite needs its folder to exist; relative paths are relative to the working directory.
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return uri


def is_tracking_server(uri: str) -> bool:
    """Whether the store is an MLflow tracking server reached over HTTP (``mlflow server``): it then
    keeps the artifacts too (``--artifacts-destination``, clients see ``mlflow-artifacts:`` URIs)."""
    return urlparse(uri).scheme.lower() in SERVER_SCHEMES


def configure_mlflow(settings: Settings | None = None) -> str:
    """Point MLflow at the configured store and make sure the experiment runs are logged to exists;
    returns the URI.

    A local store (sqlite, a folder) gets its artifacts under ``registry.mlflow_artifact_location``;
    a tracking server chooses itself (its proxied artifact store), so nothing is written on this
    machine and any other machine that reaches the server can read what this one logged."""
    import mlflow

    settings = settings or get_settings()
    uri = point_mlflow(settings)
    if mlflow.get_experiment_by_name(settings.registry.experiment_name) is None:
        if is_tracking_server(uri):
            mlflow.create_experiment(settings.registry.experiment_name)
        else:
            artifacts = settings.path(settings.registry.mlflow_artifact_location)
            artifacts.mkdir(parents=True, exist_ok=True)
            mlflow.create_experiment(settings.registry.experiment_name, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(settings.registry.experiment_name)
    return uri


def git_commit(project_dir: Path = Path(".")) -> str:
    """The commit the code came from, with '-dirty' when the tree has uncommitted changes."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=project_dir,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha
