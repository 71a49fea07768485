"""The lifecycle's steps over the project's folders: import -> prepare -> train -> evaluate ->
register -> promote.

Each step reads its inputs from and writes its outputs to the folders named in the settings, so the
CLI, the DVC stages (``dvc.yaml``) and the Prefect flows (``flows/``) are thin callers of the same
functions, and any step can be re-run alone.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np
import pandas as pd

from hematovision.params import Params
from hematovision.settings import Settings

if TYPE_CHECKING:
    from hematovision.registry.registry import Registry

Progress = Callable[[str, int, int], None]

TRAIN_REPORT = "train_report.json"
CLASSIFIER_DIR = "classifier"
METRICS_FILE = "metrics.json"


class DataImportError(RuntimeError):
    pass


# --- import ---------------------------------------------------------------------------------------
def import_data(settings: Settings) -> dict[str, Any]:
    """Bring the upstream dataset into ``data/`` under DVC and report the version pinned.

    ``data.dvc`` records the upstream folder and the md5 of its content. When ``data/`` is missing
    (a fresh clone) or the upstream folder is another one, DVC (re)imports it; if the content then
    differs from what ``data.dvc`` pinned, that is a new data version and it is said loudly.
    """
    source = settings.path(settings.data_source)
    data_dir = settings.path(settings.data_dir)
    dvc_file = data_dir.with_name(data_dir.name + ".dvc")
    if not source.is_dir():
        raise DataImportError(
            f"the dataset folder {source} does not exist: set HEMATOVISION_DATA_SOURCE to your download "
            "of the Kaggle 'Blood Cell Images' dataset"
        )
    from hematovision.registry.tracking import dvc_data_hash

    pinned = dvc_data_hash(dvc_file) if dvc_file.exists() else None
    recorded_source = _dvc_import_source(dvc_file)
    wanted_source = _relative(source, dvc_file.parent)
    if pinned and recorded_source == wanted_source:
        if not data_dir.exists() or run_dvc("status", str(dvc_file.name), cwd=dvc_file.parent).strip() not in ("", "Data and pipelines are up to date."):
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
    import yaml

    try:
        return str(yaml.safe_load(dvc_file.read_text())["deps"][0]["path"])
    except (OSError, KeyError, IndexError, TypeError):
        return None


def _relative(path: Path, start: Path) -> str:
    import os

    return os.path.relpath(path, start.resolve())


def run_dvc(*args: str, cwd: Path) -> str:
    result = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise DataImportError(f"dvc {' '.join(args)} failed:\n{result.stderr.strip() or result.stdout.strip()}")
    return result.stdout


# --- prepare --------------------------------------------------------------------------------------
def prepare_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    from hematovision.data.dataset import prepare

    grouping = params.prepare.cell_grouping
    if grouping not in ("content", "filename"):
        raise ValueError(f"prepare.cell_grouping must be 'content' or 'filename', not {grouping!r}")
    embed = _frozen_embedder(settings, params, progress) if grouping == "content" else None
    return prepare(settings.path(settings.data_dir), settings.path(settings.prepared_dir),
                   params.prepare.val_fraction, params.seed, embed, params.prepare.cell_max_distance)


def _frozen_embedder(settings: Settings, params: Params, progress: Progress | None):
    """Embeddings of the ImageNet backbone (not fine-tuned) at the training crop size, through the
    embedding cache: the training's first phase needs exactly these, so it reads them back."""
    from hematovision import CLASSES
    from hematovision.model.embeddings import EmbeddingCache, cached_embeddings
    from hematovision.model.classifier import Classifier, ClassifierConfig
    from hematovision.progress import counting

    def embed(paths: list[Path]) -> np.ndarray:
        classifier = Classifier.new(ClassifierConfig(classes=list(CLASSES), image_size=params.model.image_size))
        cache = EmbeddingCache(settings.path(settings.cache_dir) / "embeddings.sqlite")
        step = counting(_reporting(progress, "finding cells (embedding crops)"), len(paths))
        try:
            return cached_embeddings(classifier, paths, cache, progress=step)
        finally:
            cache.close()

    return embed


def load_manifest(settings: Settings) -> pd.DataFrame:
    path = settings.path(settings.prepared_dir) / "manifest.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `hematovision prepare` first")
    return pd.read_csv(path)


def official_test_rows(manifest: pd.DataFrame, params: Params) -> pd.DataFrame:
    """The manifest's TEST rows, capped per class by ``evaluate.max_images_per_class`` (quick runs)."""
    test_rows = manifest[manifest.split == "test"]
    if params.evaluate.max_images_per_class > 0:
        test_rows = test_rows.groupby("label", group_keys=False).apply(
            lambda g: g.sample(min(len(g), params.evaluate.max_images_per_class), random_state=params.seed))
    return test_rows


# --- train ----------------------------------------------------------------------------------------
def train_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Train, save the classifier under ``models/``, and log the run (params, validation metrics,
    lineage, the model) to MLflow. Returns the training report, which carries the run id."""
    import mlflow

    from hematovision.model.embeddings import EmbeddingCache
    from hematovision.registry.packaging import log_classifier
    from hematovision.registry.registry import TRAINED_ON_ARTIFACT
    from hematovision.registry.tracking import configure_mlflow, dvc_data_hash, git_commit
    from hematovision.training.metrics import flatten_for_mlflow
    from hematovision.training.train import train

    configure_mlflow(settings)
    manifest = load_manifest(settings)
    models_dir = settings.path(settings.models_dir)
    cache = EmbeddingCache(settings.path(settings.cache_dir) / "embeddings.sqlite")
    data_hash = dvc_data_hash(settings.path(settings.data_dir).with_suffix(".dvc"))
    commit = git_commit(settings.project_dir)
    started = time.perf_counter()
    with mlflow.start_run(run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}") as run:
        mlflow.set_tags({"data_hash": data_hash, "git_commit": commit, "step": "train"})
        mlflow.log_params(params.flat())
        mlflow.log_text("\n".join(sorted(manifest.loc[manifest.split == "train", "path"])), TRAINED_ON_ARTIFACT)
        result = train(manifest, settings.path(settings.data_dir), params, cache, progress)
        classifier_dir = models_dir / CLASSIFIER_DIR
        if classifier_dir.exists():
            shutil.rmtree(classifier_dir)
        result.classifier.save(classifier_dir)
        mlflow.log_metrics(flatten_for_mlflow(result.val_metrics, "val"))
        mlflow.log_metrics({f"time_{k}": v for k, v in result.timings.items()})
        mlflow.log_dict({"history": result.history, "val": result.val_metrics}, "training/history.json")
        model_uri = log_classifier(classifier_dir)
        report = {
            "run_id": run.info.run_id,
            "model_uri": model_uri,
            "data_hash": data_hash,
            "git_commit": commit,
            "n_train_images": result.n_train_images,
            "n_train_cells": result.n_train_cells,
            "val": result.val_metrics,
            "history": result.history,
            "timings": {**result.timings, "total_s": time.perf_counter() - started},
        }
    cache.close()
    (models_dir / TRAIN_REPORT).write_text(json.dumps(report, indent=2))
    return report


def load_train_report(settings: Settings) -> dict[str, Any]:
    path = settings.path(settings.models_dir) / TRAIN_REPORT
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `hematovision train` first")
    return json.loads(path.read_text())


# --- evaluate -------------------------------------------------------------------------------------
def evaluate_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Score the trained model on TEST and on the new site; write ``reports/`` and log both to the
    training run in MLflow."""
    import mlflow

    from hematovision.model.embeddings import EmbeddingCache
    from hematovision.training.evaluate import evaluate_folder, evaluate_rows, save_confusion_plot
    from hematovision.training.metrics import flatten_for_mlflow
    from hematovision.model.classifier import Classifier
    from hematovision.registry.tracking import configure_mlflow

    configure_mlflow(settings)
    report = load_train_report(settings)
    classifier = Classifier.load(settings.path(settings.models_dir) / CLASSIFIER_DIR)
    cache = EmbeddingCache(settings.path(settings.cache_dir) / "embeddings.sqlite")
    reports_dir = settings.path(settings.reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(settings)
    test_rows = official_test_rows(manifest, params)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    results["test"] = evaluate_rows(classifier, test_rows, settings.path(settings.data_dir), cache,
                                    params.evaluate.bootstrap_samples, params.seed,
                                    _reporting(progress, "evaluating on TEST"))
    new_site = settings.path(settings.new_site_source)
    if new_site.is_dir():
        results["new_site"] = evaluate_folder(classifier, new_site, cache, params.evaluate.bootstrap_samples,
                                              params.evaluate.max_images_per_class, params.seed,
                                              _reporting(progress, "evaluating on the new site"))
    cache.close()
    results["timings"] = {"evaluate_s": time.perf_counter() - started}
    (reports_dir / METRICS_FILE).write_text(json.dumps(results, indent=2))
    with mlflow.start_run(run_id=report["run_id"]):
        for name in ("test", "new_site"):
            if name not in results:
                continue
            mlflow.log_metrics(flatten_for_mlflow(results[name], name))
            plot = save_confusion_plot(results[name], classifier.classes, f"{name}: confusion",
                                       reports_dir / f"confusion_{name}.png")
            mlflow.log_artifact(str(plot), "evaluation")
        mlflow.log_artifact(str(reports_dir / METRICS_FILE), "evaluation")
        # The drift monitor's reference profile travels with the model version (drift.py).
        from hematovision.monitoring.drift import log_reference

        log_reference(classifier, manifest, settings.path(settings.data_dir), reports_dir,
                      settings.reference_max_images, params.seed)
    return results


def _reporting(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    """An evaluation's ``(done, total)`` progress, reported as the step ``what``."""
    return None if progress is None else (lambda done, total: progress(what, done, total))


# --- register and promote -------------------------------------------------------------------------
def register_step(settings: Settings) -> dict[str, Any]:
    """Register the trained run's model as a new version (alias ``challenger``), tagged with its
    lineage and headline metrics."""
    from hematovision.registry.registry import Registry
    from hematovision.registry.tracking import configure_mlflow

    uri = configure_mlflow(settings)
    report = load_train_report(settings)
    metrics_path = settings.path(settings.reports_dir) / METRICS_FILE
    evaluation = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    tags = {"data_hash": report["data_hash"], "git_commit": report["git_commit"], "run_id": report["run_id"]}
    for split, key in (("val", "accuracy"), ("val", "macro_f1"), ("test", "accuracy"), ("test", "macro_f1"),
                       ("test", "cell_accuracy"), ("new_site", "accuracy")):
        source = report["val"] if split == "val" else evaluation.get(split, {})
        if key in source:
            tags[f"{split}_{key}"] = f"{source[key]:.4f}"
    registry = Registry(settings.registered_model, uri)
    version = registry.register(report["model_uri"], tags)
    return {"version": version, "tags": tags}


def promote_step(settings: Settings, params: Params, version: str, force: bool = False):
    """The gate between the new version and the champion, both scored on this run's validation
    split: the champion's own logged figures may come from another split (an older data version)
    or lack the metric altogether (a champion made by retraining is scored on its holdout)."""
    from hematovision.registry.registry import CHAMPION, Registry
    from hematovision.registry.tracking import configure_mlflow

    registry = Registry(settings.registered_model, configure_mlflow(settings))
    champion = registry.version_by_alias(CHAMPION)
    champion_metrics, not_comparable = None, None
    if champion is not None and str(champion.version) != str(version):
        not_comparable = champion_saw_validation(registry, str(champion.version), load_manifest(settings), str(version))
        if not_comparable is None:
            champion_metrics = scored_on_validation(settings, params, f"models:/{settings.registered_model}@{CHAMPION}")
    return registry.promote(version, params.promote, force, champion_metrics=champion_metrics,
                            not_comparable=not_comparable)


def champion_saw_validation(registry: "Registry", champion: str, manifest: pd.DataFrame, challenger: str) -> str | None:
    """Why the champion cannot be compared on this run's validation split, or None if it can.

    A champion trained on pictures of a validation cell scores that cell from memory (after the
    switch to cells found by content, an old champion scored 1.000 on the new validation split).
    A champion whose training images nobody recorded is compared as before."""
    trained = registry.trained_on(champion)
    if trained is None:
        return None
    val = manifest[manifest.split == "val"]
    seen = val.group[val.path.isin(trained)].nunique()
    if seen == 0:
        return None
    return (f"champion v{champion} was trained on pictures of {seen} of this run's {val.group.nunique()} validation "
            f"cells, so validation cannot compare the two; compare them on TEST and promote by hand if the "
            f"challenger is better: hematovision promote {challenger} --force")


def scored_on_validation(settings: Settings, params: Params, model_uri: str) -> dict[str, float] | None:
    """A registered model's validation metrics on this run's split, named as the training run logs
    them (None, with a warning, if it cannot be loaded: the gate then uses its logged figures)."""
    import logging

    from hematovision.model.embeddings import EmbeddingCache
    from hematovision.training.evaluate import evaluate_rows
    from hematovision.training.metrics import flatten_for_mlflow
    from hematovision.registry.packaging import load_classifier
    from hematovision.training.train import limit_per_cell

    try:
        classifier = load_classifier(model_uri)
    except Exception as error:  # noqa: BLE001 - a broken champion must not block a good challenger
        logging.getLogger("hematovision.training.steps").warning("could not load %s to score it: %s", model_uri, error)
        return None
    manifest = load_manifest(settings)
    val_rows = limit_per_cell(manifest[manifest.split == "val"], params.train.max_images_per_cell, params.seed)
    cache = EmbeddingCache(settings.path(settings.cache_dir) / "embeddings.sqlite")
    try:
        metrics = evaluate_rows(classifier, val_rows, settings.path(settings.data_dir), cache, 0, params.seed)
    finally:
        cache.close()
    return flatten_for_mlflow(metrics, "val")
