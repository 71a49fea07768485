"""The DVC remote: push the dataset and every corrections version; a clone elsewhere pulls exactly the
versions a model version's lineage tags name.

A real git + DVC project in a temporary folder imports a tiny upstream dataset and exports two
versions of the corrections, pushing each to a local-folder remote (what a shared mount or a bucket
is to DVC). A ``git clone`` of it, with the upstream folder gone and an empty DVC cache, then pulls
the first corrections version by its hash (as ``data pull --model-version`` does with a version's
``corrections_hash`` tag), then the second; ``hematovision data pull --model-version`` does the same
from a version's tags.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from hematovision import stores
from hematovision.cli import app
from hematovision.data import dvc
from hematovision.settings import ENV_PREFIX, Settings, get_settings


def git(*args: str, cwd: Path) -> None:
    subprocess.run(
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True, capture_output=True
    )


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def lab_settings(root: Path, upstream: Path, remote: Path) -> Settings:
    return Settings().with_changes(
        paths={
            "project_dir": root,
            "data_source": upstream,
            "data_dir": Path("data"),
            "corrections_dataset_dir": Path("corrections"),
            "dvc_remote": str(remote),
        }
    )


@pytest.fixture
def pushed(tmp_path) -> dict:
    """A project that imported the dataset and pushed two corrections versions; committed."""
    upstream, remote, root = tmp_path / "upstream", tmp_path / "remote", tmp_path / "lab"
    for name in ("EOSINOPHIL/a.jpeg", "LYMPHOCYTE/b.jpeg"):
        (upstream / name).parent.mkdir(parents=True, exist_ok=True)
        (upstream / name).write_text(f"pixels of {name}\n")
    root.mkdir()
    git("init", "-q", cwd=root)
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    settings = lab_settings(root, upstream, remote)
    data_hash = dvc.import_data(settings)["data_hash"]
    corrections = root / "corrections"
    hashes = []
    for version, name in enumerate(("eosinophil/one.jpg", "monocyte/two.jpg")):
        (corrections / name).parent.mkdir(parents=True, exist_ok=True)
        (corrections / name).write_text(f"correction {version}\n")
        dvc.run_dvc("add", "corrections", cwd=root)
        result = dvc.push(settings)
        assert result["pushed"] == {"data": data_hash, "corrections": dvc.dvc_data_hash(root / "corrections.dvc")}
        hashes.append(result["pushed"]["corrections"])
    git("add", "-A", cwd=root)
    git("commit", "-q", "-m", "data and corrections", cwd=root)
    assert remote.is_dir() and any(remote.rglob("*.dir"))
    shutil.move(upstream, tmp_path / "upstream-gone")  # the clone must not need the upstream folder
    return {"root": root, "remote": remote, "upstream": upstream, "data": data_hash, "corrections": hashes}


def test_no_remote_is_a_clear_error(tmp_path):
    settings = Settings().with_changes(paths={"project_dir": tmp_path, "dvc_remote": ""})
    with pytest.raises(dvc.DataImportError, match="HEMATOVISION_DVC_REMOTE"):
        dvc.push(settings)


@pytest.mark.e2e
def test_a_clone_pulls_exactly_the_versions_a_lineage_names(pushed, tmp_path, monkeypatch):
    clone = tmp_path / "elsewhere"
    git("clone", "-q", str(pushed["root"]), str(clone), cwd=tmp_path)
    assert not (clone / "data").exists() and not (clone / "corrections").exists()
    settings = lab_settings(clone, pushed["upstream"], pushed["remote"])
    first, second = pushed["corrections"]

    result = dvc.pull(settings, {"data": pushed["data"], "corrections": first})
    assert result["pulled"] == {"data": pushed["data"], "corrections": first}
    assert result["repinned"] == ["corrections"]  # the clone's commit pins the second version
    assert files_in(clone / "data") == {"EOSINOPHIL/a.jpeg", "LYMPHOCYTE/b.jpeg"}
    assert files_in(clone / "corrections") == {"eosinophil/one.jpg"}

    assert dvc.pull(settings, {"corrections": second})["pulled"] == {"corrections": second}
    assert files_in(clone / "corrections") == {"eosinophil/one.jpg", "monocyte/two.jpg"}

    # A first model names no corrections: only its data is pulled.
    assert dvc.pull(settings, {"data": pushed["data"], "corrections": None})["pulled"] == {"data": pushed["data"]}

    # The command: a registered version's lineage tags name the versions (here the first corrections).
    # The registry is a stand-in: reading tags from MLflow is tested in tests/registry.
    tags = {"data_hash": pushed["data"], "corrections_hash": pushed["corrections"][0]}
    version = SimpleNamespace(version="7", tags=tags)
    registry = SimpleNamespace(get_version=lambda v: version if v == "7" else None, version_by_alias=lambda a: None)
    monkeypatch.setattr(stores, "registry", lambda settings=None: registry)
    for key in list(os.environ):
        if key.startswith(ENV_PREFIX):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HEMATOVISION_PROJECT_DIR", str(clone))
    monkeypatch.setenv("HEMATOVISION_DVC_REMOTE", str(pushed["remote"]))
    get_settings.cache_clear()
    try:
        result = CliRunner().invoke(app, ["data", "pull", "--model-version", "7"])
    finally:
        get_settings.cache_clear()
    assert result.exit_code == 0, result.output
    assert files_in(clone / "corrections") == {"eosinophil/one.jpg"}
    assert files_in(clone / "data") == {"EOSINOPHIL/a.jpeg", "LYMPHOCYTE/b.jpeg"}
