"""Each DVC stage depends on exactly the code it runs: a change re-runs the stages it affects, no more.

A temporary git + DVC project holds the repository's ``dvc.yaml``, ``params.yaml`` and ``src/``; small
stand-in outputs and ``dvc commit --force`` record a ``dvc.lock`` without running the real (slow)
commands. Then every file under ``src/hematovision``, and a few parameters, are changed one at a time,
and ``dvc status`` must name exactly the stages expected here (the file is restored after each).
A new file in ``training/``, ``registry/`` or ``monitoring/`` (packages a stage uses file by file)
must be added to ``FILE_STAGES``: deciding which stages it affects is the point.
"""

from __future__ import annotations

import shutil
import subprocess
from contextlib import chdir
from pathlib import Path

import pytest
import yaml

from conftest import REPO

ALL = frozenset({"prepare", "train", "evaluate"})
NONE: frozenset[str] = frozenset()

# Packages every file of which affects the same stages (the stages depend on the whole folder).
PACKAGE_STAGES = {
    "data": ALL,
    "model": ALL,
    "serving": NONE,
    "lab": NONE,
    "api": NONE,
    "web": NONE,
    "cli": NONE,  # the commands' glue and printing: the steps they call are the dependencies
    "migrations": NONE,  # the lab database's schema: no stage opens it
}
# Top-level modules, and the files of the packages stages use one file at a time.
FILE_STAGES = {
    "__init__.py": ALL,  # CLASSES: the model's outputs
    "params.py": ALL,  # the parameters' embedded defaults
    "settings.py": ALL,  # the folders the stages read and write, the MLflow store
    "demo.py": NONE,
    "database.py": NONE,
    "image_store.py": NONE,  # kept and corrected images: serving and the lab, no stage reads them
    "progress.py": NONE,
    "stores.py": NONE,
    "training/__init__.py": NONE,
    "training/steps.py": ALL,
    "training/train.py": {"train"},
    "training/calibrate.py": {"train"},  # the open set and temperature fitted at the end of training
    "training/metrics.py": {"train", "evaluate"},
    "training/evaluate.py": {"evaluate"},
    "training/retrain.py": NONE,
    "training/head.py": NONE,
    "training/cv.py": NONE,  # cross-validation (`hematovision cv`): no stage runs it
    "training/corrections_data.py": NONE,  # retraining's rows from the corrections
    "registry/__init__.py": NONE,
    "registry/packaging.py": {"train"},
    "registry/tracking.py": {"train", "evaluate"},
    "registry/registry.py": NONE,  # registering and promoting run after the pipeline
    "registry/gate.py": NONE,
    "registry/paired.py": NONE,  # the gate's paired comparison: promoting runs after the pipeline
    "monitoring/__init__.py": NONE,
    "monitoring/drift.py": {"evaluate"},  # evaluate logs the drift reference
    "monitoring/monitor.py": NONE,
    "monitoring/state.py": NONE,
    "monitoring/workspace.py": NONE,  # the monitor's Evidently workspaces: no stage writes snapshots
}
PARAM_STAGES = {
    "seed": ALL,
    "prepare.val_fraction": {"prepare"},
    "prepare.cell_max_distance": {"prepare"},
    "model.image_size": {"prepare", "train"},
    "model.dropout": {"train"},
    "train.head_epochs": {"train"},
    "evaluate.bootstrap_samples": {"train", "evaluate"},  # train's validation intervals use it too
    "evaluate.max_images_per_class": {"evaluate"},
    "promote.floor": NONE,
    "retrain.head_epochs": NONE,
    "profiles.quick.train.head_epochs": NONE,
}
# Small stand-ins for what the stages write (dvc.yaml's outs, metrics and plots).
STAND_IN_OUTPUTS = {
    "prepared/manifest.csv": "path,label,split,group\n",
    "models/train_report.json": "{}\n",
    "reports/metrics.json": "{}\n",
    "reports/confusion_test.png": "png\n",
    "reports/confusion_new_site.png": "png\n",
}


def source_files() -> list[str]:
    root = REPO / "src" / "hematovision"
    return sorted(
        p.relative_to(root).as_posix()
        for p in root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"
    )


def expected_stages(relative: str) -> frozenset[str]:
    if relative in FILE_STAGES:
        return frozenset(FILE_STAGES[relative])
    package = relative.split("/")[0] if "/" in relative else None
    if package in PACKAGE_STAGES:
        return PACKAGE_STAGES[package]
    raise AssertionError(
        f"src/hematovision/{relative} is new: add it to FILE_STAGES (or its package to "
        f"PACKAGE_STAGES) in {Path(__file__).name} with the stages a change to it must re-run, "
        "and make dvc.yaml agree"
    )


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """A git + DVC project with the repository's pipeline, every stage recorded as up to date."""
    from dvc.repo import Repo

    root = tmp_path_factory.mktemp("pipeline")
    for name in ("dvc.yaml", "params.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for relative, content in {"data/TRAIN/cell.jpeg": "not really an image\n", **STAND_IN_OUTPUTS}.items():
        (root / relative).parent.mkdir(parents=True, exist_ok=True)
        (root / relative).write_text(content)
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    with chdir(root):  # DVC resolves the stages' paths from the working directory
        Repo.init(".").close()
        with Repo(".") as repo:
            repo.commit(force=True)  # records dvc.lock from the stand-ins, no command runs
    assert changed_stages(root) == NONE, "the freshly committed pipeline should be up to date"
    return root


def changed_stages(root: Path) -> frozenset[str]:
    """The stages ``dvc status`` reports, each only for changed dependencies."""
    from dvc.repo import Repo

    with chdir(root), Repo(".") as repo:
        status = repo.status()
    for stage, changes in status.items():
        kinds = {kind for change in changes for kind in (change if isinstance(change, dict) else {change: None})}
        assert kinds == {"changed deps"}, f"{stage}: {changes}"
    return frozenset(name.split(":")[-1] for name in status)


def names(stages) -> str:
    return ", ".join(sorted(stages)) or "none"


@pytest.mark.parametrize("relative", source_files())
def test_a_change_to_the_code_reruns_exactly_the_stages_that_run_it(pipeline, relative):
    expected = expected_stages(relative)
    path = pipeline / "src" / "hematovision" / relative
    original = path.read_bytes()
    try:
        path.write_bytes(original + b"\n/* changed */\n")
        changed = changed_stages(pipeline)
    finally:
        path.write_bytes(original)
    assert changed == expected, (
        f"changing src/hematovision/{relative} re-runs {names(changed)}, expected {names(expected)}"
    )


def _changed_value(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value + 1
    return f"{value}-changed"


@pytest.mark.parametrize("key", list(PARAM_STAGES))
def test_a_parameter_reruns_exactly_the_stages_that_read_it(pipeline, key):
    path = pipeline / "params.yaml"
    original = path.read_text()
    params = yaml.safe_load(original)
    *parents, leaf = key.split(".")
    section = params
    for part in parents:
        section = section[part]
    assert leaf in section, f"{key} is not in params.yaml"
    section[leaf] = _changed_value(section[leaf])
    try:
        path.write_text(yaml.safe_dump(params, sort_keys=False))
        changed = changed_stages(pipeline)
    finally:
        path.write_text(original)
    assert changed == frozenset(PARAM_STAGES[key]), (
        f"changing {key} re-runs {names(changed)}, expected {names(PARAM_STAGES[key])}"
    )


def test_new_data_reruns_every_stage(pipeline):
    extra = pipeline / "data" / "TRAIN" / "another.jpeg"
    extra.write_text("another picture\n")
    try:
        assert changed_stages(pipeline) == ALL
    finally:
        extra.unlink()
    assert changed_stages(pipeline) == NONE


def test_every_stage_names_only_paths_that_exist():
    """A dependency at a stale path (after a move) would make `dvc repro` fail before running anything."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    outputs = {o if isinstance(o, str) else next(iter(o)) for s in stages.values() for o in s.get("outs", [])}
    missing = [
        f"{name}: {dep}"
        for name, stage in stages.items()
        for dep in stage["deps"]
        if dep.startswith("src/") and not (REPO / dep).exists()
    ]
    assert not missing, "dvc.yaml depends on paths that do not exist:\n" + "\n".join(missing)
    for name, stage in stages.items():
        for dep in stage["deps"]:
            if not dep.startswith("src/"):
                assert dep in {"data"} | outputs or any(dep.startswith(o + "/") for o in outputs), f"{name}: {dep}"
