"""A laboratory teaches the model a new type: pathologists' basophil corrections (real basophils
from the second laboratory) make retraining add a class, the five-class model is registered with
its class list, the running service swaps to it while requests are in flight and back again on a
rollback across the class change, and a model's open set answers a type it never saw ``unknown``.

The retraining here uses its own corrections store, DVC folder and output (nothing of the
session's corrections), and leaves the champion where it found it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
import yaml

from hematovision import CLASSES, stores
from hematovision.params import PromoteParams
from hematovision.registry.gate import promote
from hematovision.registry.packaging import load_classifier
from hematovision.registry.registry import CHAMPION
from hematovision.settings import get_settings

from conftest import PBC

OTHER = PBC.parent / "pbc-other"


def wait_for_version(url: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        status = requests.get(f"{url}/model", timeout=10).json()
        if status["version"] == version and not status["loading"]:
            return
        assert time.monotonic() < deadline, f"the service never served v{version}: {status}"
        time.sleep(0.5)


@pytest.fixture
def own_corrections(project, tmp_path, monkeypatch):
    """A corrections store, DVC folder and retraining output of this test's own; a basophil becomes
    a class at 6 agreed corrections."""
    subprocess.run([sys.executable, "-m", "dvc", "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    for name, value in {
        "HEMATOVISION_LAB_DB": tmp_path / "lab.sqlite",
        "HEMATOVISION_CORRECTIONS_IMAGES_DIR": tmp_path / "corrections-images",
        "HEMATOVISION_CORRECTIONS_DATASET_DIR": tmp_path / "corrections",
        "HEMATOVISION_RETRAIN_DIR": tmp_path / "retrain",
        "HEMATOVISION_NEW_CLASS_MIN_CORRECTIONS": 6,
    }.items():
        monkeypatch.setenv(name, str(value))
    get_settings.cache_clear()
    yield stores.corrections(get_settings())
    get_settings.cache_clear()


@pytest.mark.e2e
def test_basophil_corrections_add_a_class_and_the_service_swaps_to_it_under_load(
    project, trained, prefect_harness, service_url, own_corrections
):
    from flows.retraining import retraining_flow

    registry = stores.registry()
    parent = str(registry.version_by_alias(CHAMPION).version)
    for cls in CLASSES:
        for path in sorted((PBC / cls).iterdir())[40:52]:
            own_corrections.submit("rita", cls, path.read_bytes(), comment="new-class test")
    basophils = sorted((PBC / "basophil").iterdir())
    for path in basophils[:16]:
        own_corrections.submit("rita", "basophil", path.read_bytes(), comment="new-class test")
    for path in sorted((OTHER / "platelet").iterdir())[:3]:  # too few to become a class: left waiting
        own_corrections.submit("rita", "platelet", path.read_bytes(), comment="new-class test")

    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["retrain"].update(guard_tolerance=1.0, per_class_tolerance=1.0)  # 16 TEST images: one is 6 points
    params = project / "params-new-class.yaml"
    params.write_text(yaml.safe_dump(raw))
    summary = retraining_flow(params_file=str(params))
    version = summary["version"]
    try:
        tags = registry.get_version(version).tags
        assert tags["classes"] == ",".join([*CLASSES, "basophil"]) and tags["parent_version"] == parent
        challenger = load_classifier(f"models:/{registry.name}/{version}")
        assert challenger.classes == [*CLASSES, "basophil"]
        assert "basophil" in challenger.open_set.classes  # the new type is familiar to the open set too
        context = yaml.safe_load((get_settings().path(get_settings().paths.retrain_dir) / "context.json").read_text())
        assert context["new_classes"] == ["basophil"] and context["waiting_types"] == {"platelet": 3}
        # The gate compared the classes both models know and reported the new one.
        assert "basophil" in tags["gate"], tags["gate"]

        stop, outcomes = threading.Event(), []
        data = basophils[-1].read_bytes()

        def client() -> None:
            while not stop.is_set():
                response = requests.post(f"{service_url}/predict", files={"image": ("b.jpg", data, "image/jpeg")})
                body = response.json()
                outcomes.append(
                    (response.status_code, body.get("model_version"), sorted(body.get("probabilities", {})))
                )

        if summary["promoted"]:  # back to the parent first: the swap is watched under load below
            assert registry.rollback()[1] == parent
        wait_for_version(service_url, parent)
        clients = [threading.Thread(target=client) for _ in range(3)]
        for t in clients:
            t.start()
        try:
            time.sleep(1)
            promote(registry, version, PromoteParams(), force=True)  # the gate passed it above, or is tested elsewhere
            wait_for_version(service_url, version)
            time.sleep(1)
            assert registry.rollback()[1] == parent  # back across the class change
            wait_for_version(service_url, parent)
            time.sleep(1)
        finally:
            stop.set()
            for t in clients:
                t.join()
        assert outcomes and all(code == 200 for code, _, _ in outcomes), [o for o in outcomes if o[0] != 200][:5]
        by_version = {v: classes for _, v, classes in outcomes}
        assert by_version[version] == sorted([*CLASSES, "basophil"])
        assert by_version[parent] == sorted(CLASSES)
    finally:
        if str(registry.version_by_alias(CHAMPION).version) != parent:
            registry.rollback()
    assert str(registry.version_by_alias(CHAMPION).version) == parent


@pytest.mark.e2e
def test_a_model_with_a_fitted_open_set_answers_types_it_never_saw_unknown(project, trained):
    """The session's champion (trained on a few dozen blood-cells pictures) against real cells of
    types it never saw (the second laboratory's immature granulocytes, erythroblasts, platelets)
    beside its own TEST cells. A model this small separates them only roughly, and its training is
    not bit-for-bit repeatable, so the test holds it to what any working open set must do: many
    strangers answered unknown, far more often than its own kind, and a ranking far better than chance."""
    import pandas as pd

    from hematovision.training.evaluate import evaluate_rows

    classifier = load_classifier(f"models:/{stores.registry().name}@{CHAMPION}")
    assert classifier.open_set is not None and 0 < classifier.open_set.threshold < float("inf")
    test = Path(os.environ["HEMATOVISION_DATA_SOURCE"]) / "dataset2-master" / "images" / "TEST"
    known = [(p, p.parent.name.lower()) for p in sorted(test.rglob("*.jpeg"))]
    strangers = [(p, kind) for kind in ("ig", "erythroblast", "platelet") for p in sorted((OTHER / kind).iterdir())[:8]]
    rows = pd.DataFrame([{"path": str(p), "label": label, "group": str(p)} for p, label in known + strangers])
    scores = evaluate_rows(classifier, rows, Path("/"), bootstrap_samples=0)
    assert scores["n_images"] == len(known) and scores["n_skipped_unknown_label"] == len(strangers)
    assert scores["unknown_rate_other_types"] >= 0.4, scores["unknown_rate_by_label"]
    assert scores["unknown_rate_other_types"] >= scores["unknown_rate"] + 0.25, scores["unknown_rate_by_label"]
    assert scores["open_set_auroc"] >= 0.75
