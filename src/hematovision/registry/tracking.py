"""MLflow store set-up and the lineage every run records (git commit, DVC data hash)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from hematovision.settings import Settings, get_settings


def configure_mlflow(settings: Settings | None = None) -> str:
    """Point MLflow at the configured store and make sure the experiment exists; returns the URI."""
    import mlflow

    settings = settings or get_settings()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        # sqlite needs its folder to exist; relative paths are relative to the working directory.
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    if mlflow.get_experiment_by_name(settings.experiment_name) is None:
        artifacts = settings.path(settings.mlflow_artifact_location)
        artifacts.mkdir(parents=True, exist_ok=True)
        mlflow.create_experiment(settings.experiment_name, artifact_location=artifacts.as_uri())
    mlflow.set_experiment(settings.experiment_name)
    return uri


def git_commit(project_dir: Path = Path(".")) -> str:
    """The commit the code came from, with '-dirty' when the tree has uncommitted changes."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project_dir, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=project_dir,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}-dirty" if dirty else sha


def dvc_data_hash(dvc_file: Path = Path("data.dvc")) -> str:
    """The md5 of the dataset version pinned by a .dvc file ('unknown' when there is none)."""
    try:
        spec = yaml.safe_load(dvc_file.read_text())
        return str(spec["outs"][0]["md5"]).removesuffix(".dir")
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"
