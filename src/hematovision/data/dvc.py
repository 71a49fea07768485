"""The upstream dataset under DVC: import it into ``data/``, read the version a ``.dvc`` file pins,
and run DVC for the steps that version data (the corrections' export).

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
