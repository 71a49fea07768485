"""The training lifecycle end to end on a few real images: the CLI's main job runs the Prefect flow
(DVC import, prepare, train, evaluate, register, promote) against a real MLflow store, and the DVC
pipeline reproduces the same steps and then does nothing when nothing changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from hematovision import stores
from hematovision.cli import app
from hematovision.registry.registry import CHAMPION
from hematovision.registry.tracking import configure_mlflow
from hematovision.settings import get_settings

from conftest import true_cell

runner = CliRunner()


@pytest.mark.e2e
def test_main_job_registers_a_champion_with_its_lineage(project, trained):
    settings = get_settings()
    registry = stores.registry(settings)
    champion = registry.version_by_alias(CHAMPION)
    assert champion is not None
    assert trained["version"] == str(champion.version)
    assert trained["gate"]["passed"]
    assert set(trained["timings_s"]) == {"import", "push", "prepare", "train", "evaluate", "register", "promote"}
    pinned = yaml.safe_load((project / "data.dvc").read_text())["outs"][0]["md5"].removesuffix(".dir")
    assert champion.tags["data_hash"] == pinned
    assert len(champion.tags["git_commit"]) >= 40
    assert "PASSED" in champion.tags["gate"]

    run = mlflow.get_run(champion.run_id)
    for metric in (
        "val_macro_f1",
        "test_accuracy",
        "test_cell_accuracy_ci95_low",
        "new_site_accuracy",
        "test_f1_monocyte",
    ):
        assert metric in run.data.metrics, metric
    assert run.data.params["model.image_size"] == "96"
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(champion.run_id, "evaluation")}
    assert "evaluation/confusion_test.png" in artifacts


def test_run_refuses_an_unknown_profile_before_starting_anything(project):
    result = runner.invoke(app, ["run", "--profile", "nonexistent"])
    assert result.exit_code == 2
    assert "unknown profile 'nonexistent'" in result.output


@pytest.mark.e2e
def test_prepare_reports_the_bad_image_and_splits_by_cell(project, trained):
    bad = pd.read_csv(project / "prepared" / "bad_images.csv")
    assert any(p.endswith("_99_1.jpeg") for p in bad.path)
    manifest = pd.read_csv(project / "prepared" / "manifest.csv")
    assert not manifest.path.str.endswith("_99_1.jpeg").any()
    train_groups = set(manifest[manifest.split == "train"].group)
    val_groups = set(manifest[manifest.split == "val"].group)
    assert train_groups and val_groups and not train_groups & val_groups
    # The subset's file names scramble which picture shows which cell, as the real dataset's do:
    # the groups must be the true cells, found from the pictures alone.
    truth = manifest.path.map(true_cell)
    assert (manifest.groupby(truth).group.nunique() == 1).all(), "a cell's pictures in several groups"
    assert (truth.groupby(manifest.group).nunique() == 1).all(), "two cells in one group"
    assert (manifest.groupby(truth).name_group.nunique() > 1).any()  # the names alone would get it wrong
    assert set(manifest[manifest.split == "val"].label) == {"eosinophil", "lymphocyte", "monocyte", "neutrophil"}
    assert set(manifest.split) == {"train", "val", "test"}


@pytest.mark.e2e
def test_evaluation_reports_test_and_new_site(project, trained):
    metrics = json.loads((project / "reports" / "metrics.json").read_text())
    assert metrics["test"]["n_cells"] == 8  # 2 cells per class, not 16 images
    assert metrics["new_site"]["unknown_folders"] == ["basophil"]
    assert metrics["new_site"]["n_images"] == 12


@pytest.mark.e2e
def test_evaluate_command_prints_json_for_any_class_folder(project, trained, tmp_path):
    source = Path(os.environ["HEMATOVISION_NEW_SITE_SOURCE"])
    shutil.copytree(source / "monocyte", tmp_path / "MONOCYTE")
    shutil.copytree(source / "lymphocyte", tmp_path / "Lymphocyte")
    (tmp_path / "platelets").mkdir()
    (tmp_path / "MONOCYTE" / "broken.jpg").write_bytes(b"not an image")
    result = runner.invoke(
        app, ["evaluate", "--model", "models:/hematovision@champion", "--data", str(tmp_path), "--json"]
    )
    assert result.exit_code == 0, result.output
    metrics = json.loads(result.stdout)
    assert metrics["n_images"] == 6
    assert metrics["per_class"]["monocyte"]["support"] == 3
    assert metrics["unknown_folders"] == ["platelets"]
    assert metrics["unreadable_images"][0]["path"].endswith("broken.jpg")

    missing = runner.invoke(
        app, ["evaluate", "--model", "models:/hematovision@champion", "--data", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 1 and "not a folder" in missing.output


@pytest.mark.e2e
def test_evaluation_through_the_cache_scores_the_model_as_it_answers(project, trained, tmp_path):
    """The flow evaluates through the embedding cache; it must score every test-time view the
    service averages, not only the plain crop (it once did: recorded figures were one view's)."""
    from hematovision.model.embeddings import EmbeddingCache
    from hematovision.registry.packaging import load_classifier
    from hematovision.training.evaluate import evaluate_folder

    configure_mlflow()
    classifier = load_classifier("models:/hematovision@champion")
    views = classifier.config.tta_views
    assert views > 1
    source = Path(os.environ["HEMATOVISION_NEW_SITE_SOURCE"])
    direct = evaluate_folder(classifier, source, bootstrap_samples=0)  # predict_images: the service's path
    cache = EmbeddingCache(tmp_path / "embeddings.sqlite")
    calls: list[tuple[int, int]] = []
    cold = evaluate_folder(classifier, source, cache, bootstrap_samples=0, progress=lambda *a: calls.append(a))
    warm = evaluate_folder(classifier, source, cache, bootstrap_samples=0)
    # Every image is answered, the basophil folder's too (to count how many come back unknown).
    answered = direct["n_images"] + direct["n_skipped_unknown_label"]
    assert direct["n_skipped_unknown_label"] > 0 and "basophil" in direct["unknown_rate_by_label"]
    assert cache.db.execute("SELECT COUNT(*) FROM embedding").fetchone()[0] == views * answered
    # Progress counts images against the folder's total (it once showed "n/n" all along).
    assert calls[-1] == (answered, answered)
    assert all(total == answered for _, total in calls)
    for metrics in (cold, warm):
        assert metrics["confusion_matrix"] == direct["confusion_matrix"]
        assert metrics["macro_f1"] == pytest.approx(direct["macro_f1"])
        assert metrics["unknown_rate_by_label"] == pytest.approx(direct["unknown_rate_by_label"])


@pytest.mark.e2e
def test_the_gate_scores_the_champion_on_this_runs_validation_split(project, trained):
    """The promote step re-scores the champion on the new run's validation split (a champion made
    by retraining logged no validation metrics, and "beat -inf" once let any model through).
    Scored this way, the session's model gets what its training run logged."""
    from hematovision.params import load_params
    from hematovision.training.steps import scored_on_validation

    settings = get_settings()
    registry = stores.registry(settings)
    logged = registry.metrics_of(trained["version"])
    rescored = scored_on_validation(
        settings,
        load_params(project / "params.yaml"),
        f"models:/{settings.registry.registered_model}/{trained['version']}",
    )
    assert rescored["val_macro_f1"] == pytest.approx(logged["val_macro_f1"], abs=0.02)
    for name in ("eosinophil", "lymphocyte", "monocyte", "neutrophil"):
        assert rescored[f"val_f1_{name}"] == pytest.approx(logged[f"val_f1_{name}"], abs=0.05)
    assert scored_on_validation(settings, load_params(project / "params.yaml"), "models:/no-such-model/1") is None


@pytest.mark.e2e
def test_the_gate_will_not_compare_a_champion_on_cells_it_trained_on(project, trained):
    """After the split changes (cells found differently, another seed), the old champion may have
    trained on the new validation cells and would score them from memory: no fair comparison."""
    from hematovision.registry.gate import champion_saw_validation
    from hematovision.training.steps import load_manifest

    settings = get_settings()
    registry = stores.registry(settings)
    manifest = load_manifest(settings)
    champion = trained["version"]
    assert registry.trained_on(champion) == set(manifest.path[manifest.split == "train"])
    assert (
        champion_saw_validation(registry.trained_on(champion), champion, manifest, "99") is None
    )  # this run's own split

    one_train_cell = manifest.group[manifest.split == "train"].iloc[0]
    moved = manifest.assign(split=manifest.split.mask(manifest.group == one_train_cell, "val"))
    why = champion_saw_validation(registry.trained_on(champion), champion, moved, "99")
    assert why is not None and "pictures of 1 of this run's" in why and "promote 99 --force" in why


@pytest.mark.e2e
def test_dvc_repro_runs_the_stages_then_does_nothing(project, trained):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    first = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Running stage 'train'" in first.stdout
    assert (project / "dvc.lock").exists()
    second = subprocess.run(["dvc", "repro"], cwd=project, capture_output=True, text=True, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "Running stage" not in second.stdout
    assert "didn't change, skipping" in second.stdout
