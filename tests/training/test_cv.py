"""Cross-validation over TRAIN's cells (``training/cv.py``, ``flows/cv.py``, ``hematovision cv``).

Unit tests on a synthetic manifest: folds never share a cell, every cell is held out once, TEST
rows are never used, classes spread over the folds, the same seed gives the same folds, too few
cells are refused; the summary's intervals. One end-to-end run of the flow on the session's tiny
project (quick parameters, two folds) checks the MLflow parent run, its child runs and the summary.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from hematovision.cli import app
from hematovision.training import cv

CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
runner = CliRunner()


def synthetic_manifest(cells_per_class=(30, 12, 7, 40), seed: int = 0) -> pd.DataFrame:
    """Cells of varied sizes (1-60 pictures) in train and val, and TEST cells that must stay out."""
    rng = np.random.default_rng(seed)
    rows = []
    for label, n in zip(CLASSES, cells_per_class):
        for j in range(n):
            split = "val" if j % 5 == 0 else "train"
            for c in range(int(rng.integers(1, 60))):
                rows.append((f"TRAIN/{label}/{j}_{c}.jpeg", split, label, f"train/{label}/cell{j}"))
        for j in range(3):
            for c in range(5):
                rows.append((f"TEST/{label}/{j}_{c}.jpeg", "test", label, f"test/{label}/cell{j}"))
    return pd.DataFrame(rows, columns=["path", "split", "label", "group"])


def test_folds_hold_out_every_train_cell_once_and_never_test():
    manifest = synthetic_manifest()
    folds = cv.fold_assignments(manifest, 5, seed=1)
    train = manifest[manifest.split.isin(["train", "val"])]
    assert set(folds.index) == set(train.index)  # every TRAIN row, no TEST row
    assert not manifest.loc[folds.index].split.eq("test").any()
    assert sorted(folds.unique()) == [0, 1, 2, 3, 4]
    # a cell is in exactly one fold: no two folds share a cell
    assert (folds.groupby(manifest.loc[folds.index].group).nunique() == 1).all()
    for fold in range(5):
        training, held_out = cv.fold_rows(manifest, folds, fold, 0.2, seed=1)
        assert not set(training.group) & set(held_out.group)
        assert set(training.group) | set(held_out.group) == set(train.group)
        assert set(training.split) == {"train", "val"}  # the inner split training selects on
        inner = training.groupby("group").split.nunique()
        assert (inner == 1).all()  # ... of whole cells too
        assert not held_out.path.str.startswith("TEST").any()


def test_folds_are_stratified_by_class_and_balanced_in_cells():
    manifest = synthetic_manifest()
    folds = cv.fold_assignments(manifest, 5, seed=3)
    rows = manifest.loc[folds.index].assign(fold=folds)
    per_class = rows.groupby(["label", "fold"]).group.nunique().unstack()
    assert (per_class.max(axis=1) - per_class.min(axis=1) <= 1).all(), per_class
    cells = rows.groupby("fold").group.nunique()
    assert cells.max() - cells.min() <= 1
    # images: as balanced as the cells' sizes allow; no fold gets twice another's
    images = rows.groupby("fold").size()
    assert images.max() < 2 * images.min(), images


def test_folds_are_deterministic_for_a_seed_and_change_with_it():
    manifest = synthetic_manifest()
    a = cv.fold_assignments(manifest, 5, seed=7)
    assert a.equals(cv.fold_assignments(manifest.sample(frac=1, random_state=0), 5, seed=7).loc[a.index])
    assert not a.equals(cv.fold_assignments(manifest, 5, seed=8))


def test_too_few_cells_are_refused_clearly():
    manifest = synthetic_manifest((2, 1, 1, 1))
    with pytest.raises(ValueError, match="5 cells cannot make 6 folds"):
        cv.fold_assignments(manifest, 6, seed=0)
    with pytest.raises(ValueError, match="class 'monocyte' has 3 cells"):
        cv.fold_assignments(synthetic_manifest((10, 10, 3, 10)), 2, seed=0)
    with pytest.raises(ValueError, match="at least 2 folds"):
        cv.fold_assignments(synthetic_manifest(), 1, seed=0)
    with pytest.raises(ValueError, match="no TRAIN rows"):
        cv.fold_assignments(synthetic_manifest().query("split == 'test'"), 2, seed=0)


def fold_result(fold: int, accuracy: float, monocyte_support: int = 3) -> dict:
    per_class = {c: {"f1": accuracy, "support": 3, "precision": 1.0, "recall": 1.0} for c in CLASSES}
    per_class["monocyte"]["support"] = monocyte_support
    return {
        "fold": fold,
        "metrics": {
            "accuracy": accuracy,
            "macro_f1": accuracy - 0.1,
            "cell_accuracy": accuracy,
            "ece": 0.05,
            "unknown_rate": 0.1,
            "per_class": per_class,
        },
        "timings": {"fold_s": 10.0 + fold},
        "answers_per_s_per_core": 5.0,
    }


def test_summary_has_mean_and_corrected_t_interval_per_metric():
    folds = [fold_result(i, a, monocyte_support=0 if i == 0 else 3) for i, a in enumerate([0.7, 0.8, 0.75, 0.85])]
    summary = cv.summarise(folds)
    acc = summary["accuracy"]
    assert acc["mean"] == pytest.approx(0.775)
    sd = np.std([0.7, 0.8, 0.75, 0.85], ddof=1)
    half = 3.182446 * sd * math.sqrt(1 / 4 + 1 / 3)  # t(0.975, 3), Nadeau-Bengio's 1/k + 1/(k-1)
    assert (acc["low"], acc["high"]) == pytest.approx((0.775 - half, 0.775 + half), abs=1e-5)
    assert summary["f1_monocyte"]["n"] == 3  # a fold without monocytes held out says nothing of them
    assert summary["f1_eosinophil"]["n"] == 4
    assert {"macro_f1", "cell_accuracy", "ece", "unknown_rate", "fold_s", "answers_per_s_per_core"} <= set(summary)
    assert summary["ece"]["low"] == pytest.approx(0.05)  # no spread, no width
    wide = cv.summarise([fold_result(0, 0.1), fold_result(1, 0.99)])  # two folds: t(0.975, 1) is 12.7
    assert wide["accuracy"]["low"] == 0.0 and wide["accuracy"]["high"] == 1.0  # a share stays a share
    assert wide["fold_s"]["low"] >= 0.0
    one = cv.interval([0.5])
    assert one["mean"] == 0.5 and math.isnan(one["low"])


def test_the_second_site_is_summarised_with_its_weakest_class():
    folds = [fold_result(i, a) for i, a in enumerate([0.8, 0.9, 0.85])]
    for fold, site_accuracy in zip(folds, [0.6, 0.7, 0.65]):
        per_class = {c: {"f1": 0.7, "support": 150} for c in CLASSES}
        per_class["monocyte"] = {"f1": site_accuracy - 0.4, "support": 150}
        per_class["basophil"] = {"f1": 0.0, "support": 0}  # a type the model lacks: no F1 of its own
        fold["site_metrics"] = {"accuracy": site_accuracy, "macro_f1": site_accuracy - 0.1, "per_class": per_class}
    summary = cv.summarise(folds)
    assert summary["site_accuracy"]["mean"] == pytest.approx(0.65)
    assert summary["site_min_f1"]["mean"] == pytest.approx(0.25)  # the monocytes, not the absent basophils
    better = [
        {**f, "site_metrics": {**f["site_metrics"], "accuracy": f["site_metrics"]["accuracy"] + 0.1}} for f in folds
    ]
    compared = cv.summarise_recipes({"default": folds, "stain": better}, k=3, seed=0)
    assert compared["vs_first"]["stain"]["site_accuracy"]["mean"] == pytest.approx(0.1)
    assert "site_accuracy" in compared["table"].splitlines()[0]
    assert "site_accuracy" not in cv.summarise([fold_result(0, 0.8), fold_result(1, 0.9)])  # no site: no column


def test_recipes_are_compared_paired_over_the_same_folds():
    base = [fold_result(i, a) for i, a in enumerate([0.8, 0.9, 0.85])]
    better = [fold_result(i, a + 0.05) for i, a in enumerate([0.8, 0.9, 0.85])]
    summary = cv.summarise_recipes({"default": base, "other": better}, k=3, seed=0)
    diff = summary["vs_first"]["other"]["accuracy"]
    assert diff["mean"] == pytest.approx(0.05) and diff["low"] == pytest.approx(0.05)
    assert summary["metrics"][:3] == ["accuracy", "macro_f1", "cell_accuracy"]
    table = summary["table"]
    assert table.splitlines()[0].startswith("| recipe | accuracy | macro_f1")
    assert "| other | 0.900 [" in table
    assert "other - default, paired over the same folds: accuracy +0.050" in table


def test_recipes_are_profiles_layered_on_the_base_profile(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"image_size": 192},
                "profiles": {
                    "quick": {"model": {"image_size": 96}, "train": {"head_epochs": 5}},
                    "big": {"model": {"image_size": 224}},
                },
            }
        )
    )
    assert cv.recipe_params(path, "default").model.image_size == 192
    assert cv.recipe_params(path, "default", "quick").model.image_size == 96
    layered = cv.recipe_params(path, "big", "quick")
    assert layered.model.image_size == 224 and layered.train.head_epochs == 5
    with pytest.raises(ValueError, match="unknown recipe 'nope'.*default, big, quick"):
        cv.recipe_params(path, "nope")
    assert cv.parse_recipes("default, big") == ["default", "big"]
    with pytest.raises(ValueError, match="named twice"):
        cv.parse_recipes("big,big")


def test_cv_command_refuses_an_unknown_recipe_before_starting_anything(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"profiles": {"quick": {}}}))
    result = runner.invoke(app, ["cv", "--recipes", "default,nonexistent", "--params", str(path)])
    assert result.exit_code == 2
    assert "unknown recipe 'nonexistent'" in result.output
    result = runner.invoke(app, ["cv", "--folds", "1", "--params", str(path)])
    assert result.exit_code == 2


@pytest.mark.e2e
def test_cv_flow_logs_folds_under_one_parent_run(project, trained):
    import mlflow

    from flows.cv import run_cv

    result = run_cv(["default"], folds=2, seed=0, parallel=2)
    summary = result["summary"]
    folds = result["folds"]["default"]
    assert [f["fold"] for f in folds] == [0, 1]
    held_out = [set(f["held_out_cells"]) for f in folds]
    assert held_out[0] and held_out[1] and not held_out[0] & held_out[1]  # folds never share a cell
    manifest = pd.read_csv(project / "prepared" / "manifest.csv")
    train_cells = set(manifest[manifest.split.isin(["train", "val"])].group)
    assert held_out[0] | held_out[1] == train_cells  # every TRAIN cell held out once, no TEST cell
    for f in folds:
        assert f["n_train_images"] > 0 and f["metrics"]["n_images"] == f["n_held_out_images"] > 0

    client = mlflow.MlflowClient()
    parent = client.get_run(result["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.tags["step"] == "cv"
    for metric in ("accuracy", "macro_f1", "cell_accuracy", "ece", "unknown_rate", "fold_s"):
        assert f"cv_default_{metric}_mean" in parent.data.metrics, metric
        assert parent.data.metrics[f"cv_default_{metric}_mean"] == pytest.approx(
            summary["by_recipe"]["default"][metric]["mean"]
        )
    assert "cv_default_accuracy_low" in parent.data.metrics and "cv_default_accuracy_high" in parent.data.metrics
    # Every fold's model also answered the second laboratory (the project's new-site folder).
    assert all(f["site_metrics"]["n_images"] > 0 for f in folds)
    assert "cv_default_site_accuracy_mean" in parent.data.metrics
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id, "cv")}
    assert {"cv/summary.json", "cv/table.md"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert sorted(c.data.params["cv.fold"] for c in children) == ["0", "1"]
    for child in children:
        assert child.info.status == "FINISHED"
        assert {"heldout_accuracy", "heldout_macro_f1", "site_accuracy", "time_fold_s"} <= set(child.data.metrics)
        assert child.data.params["model.image_size"] == "96"


def test_cv_command_prints_the_table(capsys):
    from hematovision.cli.evidence import print_summary

    base = [fold_result(i, a) for i, a in enumerate([0.8, 0.9, 0.85])]
    summary = cv.summarise_recipes({"default": base, "other": base}, k=3, seed=0)
    print_summary(summary, "abc123")
    out = capsys.readouterr().out
    assert "Cross-validation: 3 folds" in out and "other - default (paired, same folds)" in out
    assert "MLflow parent run: abc123" in out
