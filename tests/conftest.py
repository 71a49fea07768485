"""Shared fixtures: one temporary project per test session, built from a few real images.

The project is a real git + DVC repository with a Kaggle-layout dataset of a handful of real
cells per class (plus one corrupt file), a tiny new-site folder, its own sqlite MLflow store, and
the ``quick`` parameters. One Prefect test harness serves the whole session (each costs ~16 s).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from PIL import Image

from hematovision.api import process as service_process
from hematovision.api.process import free_port, stop_service  # noqa: F401 - tests import them from here
from hematovision.settings import TELEMETRY_OFF, get_settings

REPO = Path(__file__).resolve().parents[1]
SHARED = (REPO / ".." / "shared" / "datasets").resolve()
BLOOD_CELLS = SHARED / "blood-cells" / "dataset2-master" / "images"
PBC = SHARED / "pbc-sample"
KAGGLE_CLASSES = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")

os.environ.update(TELEMETRY_OFF)
# The throwaway PostgreSQL's fixtures (postgres_server, postgres_url, backend) for every test folder.
pytest_plugins = ["postgres"]


def copy_cells(split: str, cls: str, dest: Path, cells: int, per_cell: int) -> None:
    """``cells`` real cells, ``per_cell`` pictures of each (the real file, then flipped copies).

    Named like the real dataset, ``_<k>_<n>.jpeg``, and like it the ``k`` does not name the cell:
    picture ``c`` of cell ``j`` is ``_<(j + c) % cells>_<1000 + 10 j + c>``, so only the pictures'
    content tells which belong together (``true_cell`` reads the truth back from ``n``)."""
    dest.mkdir(parents=True, exist_ok=True)
    files = sorted((BLOOD_CELLS / split / cls).iterdir())
    flips = [None, Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM, Image.Transpose.ROTATE_180]
    for j, original in enumerate(files[: cells * 37 : 37]):  # spread out over the class's files
        for c, flip in enumerate(flips[:per_cell]):
            name = f"_{(j + c) % cells}_{1000 + 10 * j + c}.jpeg"
            if flip is None:
                shutil.copy(original, dest / name)
            else:
                Image.open(original).transpose(flip).save(dest / name, quality=95)


def true_cell(path: str) -> str:
    """The cell a picture made by ``copy_cells`` shows: its folder and ``j``."""
    folder, name = path.rsplit("/", 1)
    return f"{folder}/{(int(name.split('_')[2].split('.')[0]) - 1000) // 10}"


def build_kaggle_subset(root: Path, train_cells: int = 4, test_cells: int = 2, per_cell: int = 2) -> Path:
    images = root / "dataset2-master" / "images"
    for cls in KAGGLE_CLASSES:
        copy_cells("TRAIN", cls, images / "TRAIN" / cls, train_cells, per_cell)
        copy_cells("TEST", cls, images / "TEST", 0, 0)
        copy_cells("TEST", cls, images / "TEST" / cls, test_cells, per_cell)
    # A corrupt file among the training images: prepare must report it, not crash.
    (images / "TRAIN" / "NEUTROPHIL" / "_99_1.jpeg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return root


def build_new_site_subset(root: Path, per_class: int = 3) -> Path:
    for cls in ("eosinophil", "lymphocyte", "monocyte", "neutrophil", "basophil"):
        dest = root / cls
        dest.mkdir(parents=True, exist_ok=True)
        for f in sorted((PBC / cls).iterdir())[:per_class]:
            shutil.copy(f, dest / f.name)
    return root


def quick_params() -> dict:
    """The repository's params.yaml with the ``quick`` profile folded in (DVC stages take no profile)."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    quick = raw.pop("profiles")["quick"]
    for section, values in quick.items():
        raw[section].update(values)
    raw["prepare"]["val_fraction"] = 0.5  # a handful of cells per class: half of them validate
    return raw


def add_user(name: str, *roles: str, password: str) -> None:
    """An account made through the CLI, as an administrator would."""
    from typer.testing import CliRunner

    from hematovision.cli import app

    args = ["users", "add", name, "--password-stdin"] + [a for r in roles for a in ("--role", r)]
    result = CliRunner().invoke(app, args, input=password + "\n")
    assert result.exit_code == 0, result.output


def run(cmd: list[str], cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, f"{' '.join(cmd)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(autouse=True)
def settings_read_afresh(monkeypatch):
    """Settings are cached per process: a test that changes the environment (monkeypatch) would
    otherwise leave its values to every later test. Cleared before its monkeypatch is undone, so the
    next read sees the restored environment."""
    yield
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def project(tmp_path_factory) -> Path:
    """A temporary HematoVision project, made the working directory for the session."""
    root = tmp_path_factory.mktemp("project")
    upstream = build_kaggle_subset(tmp_path_factory.mktemp("upstream") / "blood-cells")
    new_site = build_new_site_subset(tmp_path_factory.mktemp("new-site") / "pbc")
    for name in ("dvc.yaml", ".dvcignore"):
        shutil.copy(REPO / name, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(quick_params()))
    (root / ".gitignore").write_text((REPO / ".gitignore").read_text())
    shutil.copytree(REPO / "src", root / "src")  # dvc.yaml names the code as dependencies
    run(["git", "init", "-q"], root)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "--allow-empty", "-m", "init"], root)
    env = {**os.environ}
    run([str(Path(os.sys.executable).parent / "dvc"), "init", "-q"], root, env)
    os.environ.update(
        {
            "HEMATOVISION_PROJECT_DIR": str(root),
            "HEMATOVISION_DATA_SOURCE": str(upstream),
            "HEMATOVISION_NEW_SITE_SOURCE": str(new_site),
            "HEMATOVISION_MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlruns/mlflow.db",
            "HEMATOVISION_MLFLOW_ARTIFACT_LOCATION": str(root / "mlruns" / "artifacts"),
            "KERAS_HOME": str(root / ".keras"),
        }
    )
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    get_settings.cache_clear()
    previous = Path.cwd()
    os.chdir(root)
    yield root
    os.chdir(previous)


@pytest.fixture(scope="session")
def prefect_harness():
    from prefect.testing.utilities import prefect_test_harness

    # Prefect waits 30 s for its test server by default: on 2 cores busy with other work it takes longer.
    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="session")
def trained(project, prefect_harness):
    """The main job's flow, run once per session: a champion in the session's registry."""
    # In-process under the session's Prefect harness (CliRunner's swapped streams and Prefect's
    # log handlers do not mix); `hematovision run` is a thin printer around this call.
    from flows.training import training_flow

    return training_flow()


SERVICE_MAX_REQUEST_BYTES = 3 * 1024 * 1024  # small, so the oversized-upload case is cheap to send
SERVICE_REVIEW_THRESHOLD = 0.99


def start_service(project: Path, log: Path, env: dict, timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """``bentoml serve`` of the project's champion on a free port, once it answers /readyz."""
    try:
        return service_process.start_service(project, log, env, timeout)
    except service_process.ServiceStartError as error:
        pytest.fail(str(error))


def service_env(tmp_path_factory) -> dict:
    return {
        **os.environ,
        "HEMATOVISION_ALIAS_POLL_SECONDS": "1",
        # Nearly every answer of the tiny test model then needs review: the review queue fills.
        "HEMATOVISION_REVIEW_THRESHOLD": str(SERVICE_REVIEW_THRESHOLD),
        "HEMATOVISION_MAX_REQUEST_BYTES": str(SERVICE_MAX_REQUEST_BYTES),
        "BENTOML_HOME": str(tmp_path_factory.mktemp("bentoml-home")),
        # Opened explicitly, as for a public demo: dozens of tests predict anonymously against this
        # service to test predicting, not signing in. The default (sign-in or token required) is
        # tested in tests/api/test_predict_sign_in.py and, on a service of its own, in tests/web.
        "HEMATOVISION_PREDICT_REQUIRES_TOKEN": "false",
    }


@pytest.fixture(scope="session")
def service_url(project, trained, tmp_path_factory):
    """A real ``bentoml serve`` of the session's champion on 127.0.0.1, polling the alias every second."""
    log = tmp_path_factory.mktemp("service") / "service.log"
    server, url = start_service(project, log, service_env(tmp_path_factory))
    yield url
    stop_service(server)


@pytest.fixture
def serving_champion(service_url) -> str:
    """The session's service once it answers with the registry's current champion.

    Tests before this one may have moved the alias and moved it back (a retrain, a rollback); the
    service follows within a poll or two, and a test that compares answers must not straddle that
    swap."""
    import requests

    from hematovision import stores
    from hematovision.registry.registry import CHAMPION

    champion = str(stores.registry().version_by_alias(CHAMPION).version)
    deadline = time.monotonic() + 120
    while True:
        status = requests.get(f"{service_url}/model", timeout=10).json()
        if status["version"] == champion and not status["loading"]:
            return service_url
        assert time.monotonic() < deadline, f"the service never served the champion v{champion}: {status}"
        time.sleep(0.5)
