"""The upstream dataset under DVC: import it into ``data/``, read the version a ``.dvc`` file pins,
run DVC for the steps that version data (the corrections' export), and, in lab mode, push to and
pull from the DVC remote ``paths.dvc_remote`` (a clone elsewhere pulls exactly the versions a model
version's lineage tags name).

DVC runs as a subprocess of this environment's interpreter (``python -m dvc``): the same DVC the
lock file pins, whatever ``dvc`` is first on the PATH.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from hematovision.settings import Settings


class DataImportError(RuntimeError):
    pass


# --- import ---------------------------------------------------------------------------------------
def import_data(settings: Settings) -> dict[str, Any]:
    """Bring the upstream dataset into ``data/`` under DVC and report the version pinned.

    ``data.dvc`` records the upstream folder and the md5 of its content. When ``data/`` is missing
    (a fresh clone) or the upstream folder is another one, DVC (re)imports it; if the content then
    differs from what ``data.dvc`` pinned, that is a new data version and it is said loudly.
    """
    source = settings.path(settings.paths.data_source)
    data_dir = settings.path(settings.paths.data_dir)
    dvc_file = data_dir.with_name(data_dir.name + ".dvc")
    if not source.is_dir():
        raise DataImportError(
            f"the dataset folder {source} does not exist: set HEMATOVISION_DATA_SOURCE to your download "
            "of the Kaggle 'Blood Cell Images' dataset"
        )
    pinned = dvc_data_hash(dvc_file) if dvc_file.exists() else None
    recorded_source = _dvc_import_source(dvc_file)
    wanted_source = _relative(source, dvc_file.parent)
    if pinned and recorded_source == wanted_source:
        if not data_dir.exists() or run_dvc("status", str(dvc_file.name), cwd=dvc_file.parent).strip() not in (
            "",
            "Data and pipelines are up to date.",
        ):
            run_dvc("update", dvc_file.name, cwd=dvc_file.parent)
    else:
        run_dvc("import-url", "--force", wanted_source, data_dir.name, cwd=dvc_file.parent)
    current = dvc_data_hash(dvc_file)
    return {
        "source": str(source),
        "data_dir": str(data_dir),
        "data_hash": current,
        "pinned_hash": pinned,
        "changed": pinned is not None and pinned != current,
    }


def _dvc_import_source(dvc_file: Path) -> str | None:
    try:
        return str(yaml.safe_load(dvc_file.read_text())["deps"][0]["path"])
    except (OSError, KeyError, IndexError, TypeError):
        return None


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path, start.resolve())


def run_dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataImportError(f"dvc {' '.join(args)} failed:\n{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


def dvc_data_hash(dvc_file: Path = Path("data.dvc")) -> str:
    """The md5 of the dataset version pinned by a .dvc file ('unknown' when there is none)."""
    try:
        spec = yaml.safe_load(dvc_file.read_text())
        return str(spec["outs"][0]["md5"]).removesuffix(".dir")
    except (OSError, KeyError, IndexError, TypeError, yaml.YAMLError):
        return "unknown"


# --- the DVC remote (lab mode) --------------------------------------------------------------------
REMOTE_NAME = "hematovision"


def dvc_files(settings: Settings) -> dict[str, Path]:
    """The .dvc files that pin the platform's data: ``data`` (the upstream dataset) and
    ``corrections`` (the pathologists' exported corrections), by name."""
    data_dir = settings.path(settings.paths.data_dir)
    corrections_dir = settings.path(settings.paths.corrections_dataset_dir)
    return {
        "data": data_dir.with_name(data_dir.name + ".dvc"),
        "corrections": corrections_dir.with_name(corrections_dir.name + ".dvc"),
    }


def configure_remote(settings: Settings) -> str:
    """Name ``paths.dvc_remote`` as this checkout's DVC remote (in ``.dvc/config.local``, so the
    setting, not a committed file, decides); returns its URL. A plain path is made absolute."""
    url = settings.paths.dvc_remote.strip()
    if not url:
        raise DataImportError("no DVC remote: set HEMATOVISION_DVC_REMOTE to a folder or a URL DVC supports")
    if "://" not in url:
        url = str(settings.path(Path(url)))
    root = settings.path(settings.paths.project_dir)
    try:
        local_config = (root / ".dvc" / "config.local").read_text()
    except OSError:
        local_config = ""
    if f"""['remote "{REMOTE_NAME}"']\n    url = {url}\n""" not in local_config:  # DVC's own layout; else ask DVC
        run_dvc("remote", "add", "--local", "--force", REMOTE_NAME, url, cwd=root)
    return url


def push(settings: Settings, all_commits: bool = False) -> dict[str, Any]:
    """Push the data and corrections that ``data.dvc`` and ``corrections.dvc`` pin to the remote
    (with ``all_commits``, every version any git commit pins too); returns what was pushed."""
    url = configure_remote(settings)
    root = settings.path(settings.paths.project_dir)
    pinned = {name: path for name, path in dvc_files(settings).items() if path.exists()}
    if not pinned:
        raise DataImportError(f"nothing to push: neither {' nor '.join(map(str, dvc_files(settings).values()))} exists")
    args = ["push", "-r", REMOTE_NAME, *(["--all-commits"] if all_commits else []), *map(str, pinned.values())]
    output = run_dvc(*args, cwd=root)
    return {
        "remote": url,
        "pushed": {name: dvc_data_hash(path) for name, path in pinned.items()},
        "all_commits": all_commits,
        "dvc": output.strip(),
    }


def pin(dvc_file: Path, md5: str) -> bool:
    """Make ``dvc_file`` pin the folder version ``md5`` (a lineage tag's hash); returns whether it
    changed. An import keeps its source; a new file is a plain ``dvc add`` record."""
    if dvc_data_hash(dvc_file) == md5:
        return False
    out_name = dvc_file.name.removesuffix(".dvc")
    spec = yaml.safe_load(dvc_file.read_text()) if dvc_file.exists() else {"outs": [{"path": out_name}]}
    spec.pop("md5", None)  # the stage's own checksum: stale once the pin moves
    for entry in [*spec.get("deps", []), *spec["outs"]]:
        for stale in ("size", "nfiles"):
            entry.pop(stale, None)
        entry.update({"md5": f"{md5}.dir", "hash": "md5"})
    dvc_file.write_text(yaml.safe_dump(spec, sort_keys=False))
    return True


def pull(settings: Settings, versions: dict[str, str] | None = None) -> dict[str, Any]:
    """Bring the data and corrections from the remote into this checkout: the versions its .dvc
    files pin, or ``versions`` (``{"data": md5, "corrections": md5}``, e.g. a model version's
    lineage tags ``data_hash`` / ``corrections_hash``), which the .dvc files are first made to pin."""
    url = configure_remote(settings)
    root = settings.path(settings.paths.project_dir)
    files = dvc_files(settings)
    wanted = {name: md5 for name, md5 in (versions or {}).items() if md5 and md5 != "unknown"}
    repinned = [name for name, md5 in wanted.items() if pin(files[name], md5)]
    # A version asked for: exactly what it names (a first model has no corrections); else every pin.
    names = wanted if versions is not None else files
    targets = {name: files[name] for name in names if files[name].exists()}
    if not targets:
        raise DataImportError("nothing to pull: no .dvc file pins any data here, and no version was asked for")
    output = run_dvc("pull", "-r", REMOTE_NAME, "--force", *map(str, targets.values()), cwd=root)
    return {
        "remote": url,
        "pulled": {name: dvc_data_hash(path) for name, path in targets.items()},
        "repinned": repinned,
        "dvc": output.strip(),
    }
