"""The retraining loop with the real tools: corrections exported as a DVC version, a challenger trained
on raw data + corrections (the holdout never trained on), registered with its lineage, and promoted
only through the gate. The session's registry is shared: every test leaves the champion where it was."""

from __future__ import annotations

import pytest
import yaml
from mlflow import MlflowClient

from hematovision import CLASSES, stores
from hematovision.data.dvc import dvc_data_hash
from hematovision.lab.corrections import Corrections
from hematovision.monitoring.drift import fetch_reference
from hematovision.monitoring.monitor import MonitorState
from hematovision.registry.registry import CHALLENGER, CHAMPION, Registry
from hematovision.settings import get_settings
from hematovision.training.corrections_data import is_holdout
from hematovision.training.retrain import export_step, load_retrain_manifest

from conftest import PBC

PER_CLASS = 14  # new-site images corrected per class


def registry() -> Registry:
    return stores.registry()


def champion_version() -> str:
    return str(registry().version_by_alias(CHAMPION).version)


def params_file(project, name: str, **retrain) -> str:
    """The session's parameters with some of ``retrain:`` changed."""
    raw = yaml.safe_load((project / "params.yaml").read_text())
    raw["retrain"].update(retrain)
    path = project / f"params-{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


@pytest.fixture(scope="module")
def corrected(project, trained):
    """A pathologist's corrections of new-site images (labels from the folder names)."""
    store = Corrections(project / "monitoring" / "lab.sqlite", project / "monitoring" / "corrections")
    for cls in CLASSES:
        for path in sorted((PBC / cls).iterdir())[10 : 10 + PER_CLASS]:
            store.submit("rita", cls, path.read_bytes(), comment="retraining test")
    return store


def test_holdout_split_is_a_fixed_function_of_the_image():
    shas = [f"{i:064x}" for i in range(0, 2**64, 2**58)] + ["f" * 64, "0" * 64]
    assert [is_holdout(s, 0.25) for s in shas] == [is_holdout(s, 0.25) for s in shas]
    assert is_holdout("0" * 64, 0.25) and not is_holdout("f" * 64, 0.25)
    assert not any(is_holdout(s, 0.0) for s in shas)


@pytest.mark.e2e
def test_exporting_twice_changes_nothing(project, corrected):
    first = export_step(get_settings())
    assert first["images"] >= 4 * PER_CLASS
    pinned = (project / "corrections.dvc").read_text()
    second = export_step(get_settings())
    assert second["added"] == 0 and second["removed"] == 0
    assert (project / "corrections.dvc").read_text() == pinned and second["md5"] == first["md5"]


@pytest.mark.e2e
def test_retraining_promotes_a_winner_with_its_lineage_and_never_trains_on_the_holdout(
    project, corrected, prefect_harness
):
    from flows.retraining import retraining_flow

    parent = champion_version()
    # The session's TEST is 16 images of 8 cells scored by a model trained on 32 images: one image is
    # 6 points, so the TEST guard is switched off here (its logic is tested on its own above).
    summary = retraining_flow(params_file=params_file(project, "wins", guard_tolerance=1.0, per_class_tolerance=1.0))
    try:
        assert summary["parent_version"] == parent
        assert summary["challenger"]["holdout_accuracy"] > summary["champion"]["holdout_accuracy"], summary
        assert summary["promoted"], summary["gate"]
        assert champion_version() == summary["version"]
        assert registry().version_by_alias(CHALLENGER) is None  # the challenger became the champion

        version = registry().get_version(summary["version"])
        assert version.tags["data_hash"] == dvc_data_hash(project / "data.dvc") != "unknown"
        assert version.tags["corrections_hash"] == dvc_data_hash(project / "corrections.dvc") != "unknown"
        assert version.tags["parent_version"] == parent
        assert len(version.tags["git_commit"].removesuffix("-dirty")) == 40
        from hematovision.registry.packaging import load_classifier

        assert load_classifier(f"models:/{registry().name}/{summary['version']}").classes == list(CLASSES)
        assert version.tags["gate"].startswith("gate PASSED") and "holdout_accuracy" in version.tags["gate"]
        run = MlflowClient(tracking_uri=get_settings().tracking_uri).get_run(summary["run_id"])
        assert run.data.tags["gate_decision"] == "promoted" and run.data.tags["parent_version"] == parent
        assert "champion_holdout_accuracy" in run.data.metrics and "holdout_accuracy" in run.data.metrics

        manifest = load_retrain_manifest(get_settings())
        fixes = manifest[manifest.source == "corrections"]
        held, trained_on = fixes[fixes.split == "holdout"], fixes[fixes.split == "train"]
        assert len(held) >= 4 and len(trained_on) >= 4 * PER_CLASS // 2
        assert not set(held.sha256) & set(trained_on.sha256)
        assert all(is_holdout(s, 0.25) for s in held.sha256) and not any(is_holdout(s, 0.25) for s in trained_on.sha256)
        assert fixes.group.is_unique  # each correction image is its own cell
        assert summary["corrections"]["holdout"] == len(held)
        assert not set(manifest[manifest.split.isin(["train", "val"])].path) & set(held.path)
        # The raw validation cells are not learned either: the training flow's gate scores a
        # champion on them, so a retrained one must not have seen them.
        raw = manifest[manifest.source == "raw"]
        assert (raw.split == "val").any()
        assert summary["training"]["n_raw_images"] == int((raw.split == "train").sum())
    finally:
        if champion_version() != parent:
            registry().rollback()
    assert champion_version() == parent


@pytest.mark.e2e
def test_gate_refuses_a_challenger_that_does_not_win(project, corrected, prefect_harness):
    from flows.retraining import retraining_flow

    parent = champion_version()
    # Nothing can beat the champion by more than 1.0 accuracy: the gate must refuse and say why.
    # (Through the full fine-tuning path, the params switch away from the head-only fast path.)
    summary = retraining_flow(params_file=params_file(project, "loses", min_improvement=1.0, mode="finetune"))
    assert not summary["promoted"] and summary["mode"] == "finetune"
    assert registry().get_version(summary["version"]).tags["retrain_mode"] == "finetune"
    assert champion_version() == parent
    version = registry().get_version(summary["version"])
    assert version.tags["gate"].startswith("gate REFUSED") and "does not beat champion" in version.tags["gate"]
    assert str(registry().version_by_alias(CHALLENGER).version) == summary["version"]
    run = MlflowClient(tracking_uri=get_settings().tracking_uri).get_run(summary["run_id"])
    assert run.data.tags["gate_decision"] == "refused" and "does not beat" in run.data.tags["gate_reasons"]
    # Only the refused challenger's alias remains; the champion is untouched.
    registry().client.delete_registered_model_alias(registry().name, CHALLENGER)


@pytest.mark.e2e
def test_demo_tells_the_whole_story_on_the_real_service(project, trained, prefect_harness, tmp_path_factory):
    from hematovision.demo import DemoConfig, run_demo

    parent = champion_version()
    lines: list[str] = []
    # Tiny TEST and holdout (a few images a class) on a tiny model: one image moves the figures a lot,
    # so only the holdout decides here; the story, the swap and the figures are what is checked.
    # The monitor judges windows of 10 predictions in a state of its own, and 20 corrections
    # raise its corrections alert: the demo approves it and the monitor starts the retraining.
    monitored = tmp_path_factory.mktemp("demo-monitor")
    log = monitored / "predictions.sqlite"  # the demo's traffic alone, not the other tests'
    settings = get_settings().with_changes(
        serving={"predictions_db": log},
        monitoring={
            "window_size": 10,
            "retrain_min_corrections": 20,
            "retrain_trigger": "approval",
            "state_db": monitored / "monitor.sqlite",
            "reports_dir": monitored / "reports",
            "workspace": monitored / "workspace",
            "references_dir": monitored / "references",
        },
    )
    config = DemoConfig(
        params_file=params_file(project, "demo", guard_tolerance=1.0, per_class_tolerance=1.0),
        test_images=16,
        new_site_images=40,
        corrections=40,
        eval_images=16,
        new_site_dir=PBC,
        swap_timeout_s=90,
        service_env={
            "HEMATOVISION_ALIAS_POLL_SECONDS": "1",
            "HEMATOVISION_PREDICTIONS_DB": str(log),
            "HEMATOVISION_IMAGES_DIR": str(monitored / "images"),
            "BENTOML_HOME": str(tmp_path_factory.mktemp("demo-bentoml")),
        },
    )
    try:
        result = run_demo(settings, config, say=lines.append)
        assert result["version_before"] == parent
        assert result["promoted"] and result["swapped"], result["gate"]
        assert result["version_after"] == result["challenger"] != parent
        assert result["retrain_holdout"]["challenger"] > result["retrain_holdout"]["champion"], result
        assert 0.0 <= result["new_site_accuracy_after"] <= 1.0 and result["new_site_images_scored"] == 16
        assert result["corrections"] == 40
        text = "\n".join(lines)
        print(text)
        assert "Summary" in text and "new-site accuracy" in text and "TEST accuracy" in text
        drift = result["drift"]
        assert drift["in_distribution"]["windows"] == 1 and drift["new_site"]["windows"] >= 4  # 16 TEST images here
        alerts = MonitorState(monitored / "monitor.sqlite").alerts(50)
        assert "corrections" in {a["kind"] for a in alerts}
        assert all(a["status"] == "retrained" and a["decided_by"] == "demo-engineer" for a in alerts)
        [retraining] = [a for a in alerts if "retraining" in a["detail"]]  # one run answers every approved alert
        assert retraining["detail"]["retraining"]["version"] == result["challenger"]
        # The new champion brings the drift monitor a reference of its own (raw cells + corrections).
        reference = fetch_reference(settings, result["challenger"])
        assert len(reference) > 0 and reference.filter(like="emb_").shape[1] == 1280
        assert "approves alert" in text and "drift on new-site traffic" in text
        # The demo's own account (its token fed the microscope's traffic) ends disabled.
        demo_accounts = [u for u in stores.accounts().list_users() if u["username"].startswith("demo-pathologist-")]
        assert demo_accounts and all(u["disabled"] for u in demo_accounts)
    finally:
        if champion_version() != parent:
            registry().rollback()
    assert champion_version() == parent
