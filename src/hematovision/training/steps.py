"""The main job's steps over the project's folders: prepare -> train -> evaluate -> register ->
promote (the data import before them is ``data/dvc.py``).

Each step reads its inputs from and writes its outputs to the folders named in the settings, so the
CLI, the DVC stages (``dvc.yaml``) and the Prefect flow (``flows/training.py``) are thin callers of
the same functions, and any step can be re-run alone. TensorFlow-heavy code (``training/train.py``,
``registry/packaging.py``) is imported inside the steps that run it.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hematovision import CLASSES, stores
from hematovision.data.dataset import limit_per_cell, prepare
from hematovision.data.dvc import dvc_data_hash
from hematovision.model.classifier import Classifier, ClassifierConfig
from hematovision.model.embeddings import cached_embeddings
from hematovision.model.export import FULL, Int8Classifier, export_int8
from hematovision.monitoring.drift import log_reference
from hematovision.params import Params, load_params
from hematovision.progress import counting
from hematovision.registry import gate
from hematovision.registry.paired import pair_answers
from hematovision.registry.registry import CHAMPION, TRAINED_ON_ARTIFACT
from hematovision.registry.tracking import configure_mlflow, git_commit
from hematovision.settings import Settings
from hematovision.training.evaluate import evaluate_folder, evaluate_rows, save_confusion_plot, score_rows
from hematovision.training.metrics import flatten_for_mlflow

logger = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]

TRAIN_REPORT = "train_report.json"
CLASSIFIER_DIR = "classifier"
METRICS_FILE = "metrics.json"


# --- prepare --------------------------------------------------------------------------------------
def prepare_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Validate every image, find the cells, write the grouped split (``prepared/``)."""
    grouping = params.prepare.cell_grouping
    if grouping not in ("content", "filename"):
        raise ValueError(f"prepare.cell_grouping must be 'content' or 'filename', not {grouping!r}")
    embed = _frozen_embedder(settings, params, progress) if grouping == "content" else None
    return prepare(
        settings.path(settings.paths.data_dir),
        settings.path(settings.paths.prepared_dir),
        params.prepare.val_fraction,
        params.seed,
        embed,
        params.prepare.cell_max_distance,
    )


def _frozen_embedder(settings: Settings, params: Params, progress: Progress | None):
    """Embeddings of the ImageNet backbone (not fine-tuned) at the training crop size, through the
    embedding cache: the training's first phase needs exactly these, so it reads them back."""

    def embed(paths: list[Path]) -> np.ndarray:
        classifier = Classifier.new(ClassifierConfig(classes=list(CLASSES), image_size=params.model.image_size))
        step = counting(_reporting(progress, "finding cells (embedding crops)"), len(paths))
        with stores.embedding_cache(settings) as cache:
            return cached_embeddings(classifier, paths, cache, progress=step)

    return embed


def load_manifest(settings: Settings) -> pd.DataFrame:
    path = settings.path(settings.paths.prepared_dir) / "manifest.csv"
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `hematovision prepare` first")
    return pd.read_csv(path)


def official_test_rows(manifest: pd.DataFrame, params: Params) -> pd.DataFrame:
    """The manifest's TEST rows, capped per class by ``evaluate.max_images_per_class`` (quick runs)."""
    test_rows = manifest[manifest.split == "test"]
    if params.evaluate.max_images_per_class > 0:
        test_rows = test_rows.groupby("label", group_keys=False).apply(
            lambda g: g.sample(min(len(g), params.evaluate.max_images_per_class), random_state=params.seed)
        )
    return test_rows


# --- train ----------------------------------------------------------------------------------------
def train_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Train, save the classifier under ``models/``, and log the run (params, validation metrics,
    lineage, the model) to MLflow. Returns the training report, which carries the run id."""
    import mlflow

    from hematovision.registry.packaging import log_classifier  # heavy: imports MLflow's pyfunc
    from hematovision.training.train import train  # heavy: imports Keras

    configure_mlflow(settings)
    manifest = load_manifest(settings)
    models_dir = settings.path(settings.paths.models_dir)
    data_hash = dvc_data_hash(settings.path(settings.paths.data_dir).with_suffix(".dvc"))
    commit = git_commit(settings.paths.project_dir)
    started = time.perf_counter()
    with (
        stores.embedding_cache(settings) as cache,
        mlflow.start_run(run_name=f"train-{time.strftime('%Y%m%d-%H%M%S')}") as run,
    ):
        mlflow.set_tags({"data_hash": data_hash, "git_commit": commit, "step": "train"})
        mlflow.log_params(params.flat())
        mlflow.log_text("\n".join(sorted(manifest.loc[manifest.split == "train", "path"])), TRAINED_ON_ARTIFACT)
        result = train(manifest, settings.path(settings.paths.data_dir), params, cache, progress)
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
            "classes": list(result.classifier.classes),
            "val": result.val_metrics,
            "history": result.history,
            "timings": {**result.timings, "total_s": time.perf_counter() - started},
        }
    (models_dir / TRAIN_REPORT).write_text(json.dumps(report, indent=2))
    return report


def load_train_report(settings: Settings) -> dict[str, Any]:
    path = settings.path(settings.paths.models_dir) / TRAIN_REPORT
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: run `hematovision train` first")
    return json.loads(path.read_text())


# --- evaluate -------------------------------------------------------------------------------------
def evaluate_step(settings: Settings, params: Params, progress: Progress | None = None) -> dict[str, Any]:
    """Score the trained model on TEST and on the new site; write ``reports/`` and log both to the
    training run in MLflow."""
    import mlflow

    configure_mlflow(settings)
    report = load_train_report(settings)
    classifier = Classifier.load(settings.path(settings.paths.models_dir) / CLASSIFIER_DIR)
    reports_dir = settings.path(settings.paths.reports_dir)
    reports_dir.mkdir(parents=True, exist_ok=True)
    manifest = load_manifest(settings)
    test_rows = official_test_rows(manifest, params)
    results: dict[str, Any] = {}
    started = time.perf_counter()
    new_site = settings.path(settings.paths.new_site_source)
    with stores.embedding_cache(settings) as cache:
        results["test"] = evaluate_rows(
            classifier,
            test_rows,
            settings.path(settings.paths.data_dir),
            cache,
            params.evaluate.bootstrap_samples,
            params.seed,
            _reporting(progress, "evaluating on TEST"),
        )
        if new_site.is_dir():
            results["new_site"] = evaluate_folder(
                classifier,
                new_site,
                cache,
                params.evaluate.bootstrap_samples,
                params.evaluate.max_images_per_class,
                params.seed,
                _reporting(progress, "evaluating on the new site"),
            )
    results["timings"] = {"evaluate_s": time.perf_counter() - started}
    (reports_dir / METRICS_FILE).write_text(json.dumps(results, indent=2))
    with mlflow.start_run(run_id=report["run_id"]):
        for name in ("test", "new_site"):
            if name not in results:
                continue
            mlflow.log_metrics(flatten_for_mlflow(results[name], name))
            plot = save_confusion_plot(
                results[name], classifier.classes, f"{name}: confusion", reports_dir / f"confusion_{name}.png"
            )
            mlflow.log_artifact(str(plot), "evaluation")
        mlflow.log_artifact(str(reports_dir / METRICS_FILE), "evaluation")
        # The drift monitor's reference profile travels with the model version (drift.py).
        log_reference(
            classifier,
            manifest,
            settings.path(settings.paths.data_dir),
            reports_dir,
            settings.monitoring.reference_max_images,
            params.seed,
        )
    return results


def _reporting(progress: Progress | None, what: str) -> Callable[[int, int], None] | None:
    """An evaluation's ``(done, total)`` progress, reported as the step ``what``."""
    return None if progress is None else (lambda done, total: progress(what, done, total))


# --- register and promote -------------------------------------------------------------------------
def register_step(settings: Settings, params: Params | None = None) -> dict[str, Any]:
    """Register the trained run's model as a new version (alias ``challenger``), tagged with its
    lineage and headline metrics; with ``export.int8``, build its int8 flavour and decide which
    flavour serves (:func:`int8_flavour_step`). ``params``: the project's ``params.yaml`` unless given."""
    params = params or load_params(settings.path(Path("params.yaml")), None)
    report = load_train_report(settings)
    metrics_path = settings.path(settings.paths.reports_dir) / METRICS_FILE
    evaluation = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
    tags = {
        "data_hash": report["data_hash"],
        "git_commit": report["git_commit"],
        "run_id": report["run_id"],
        "classes": ",".join(report.get("classes", CLASSES)),
    }
    for split, key in (
        ("val", "accuracy"),
        ("val", "macro_f1"),
        ("test", "accuracy"),
        ("test", "macro_f1"),
        ("test", "cell_accuracy"),
        ("new_site", "accuracy"),
    ):
        source = report["val"] if split == "val" else evaluation.get(split, {})
        if key in source:
            tags[f"{split}_{key}"] = f"{source[key]:.4f}"
    version = stores.registry(settings).register(report["model_uri"], tags)
    registered: dict[str, Any] = {"version": version, "tags": tags}
    if params.export.int8:
        registered["flavour"] = int8_flavour_step(settings, params, version)
    return registered


CALIBRATION_IMAGES_PER_CLASS = 32  # real training crops that calibrate the int8 export's ranges


def int8_flavour_step(settings: Settings, params: Params, version: str) -> dict[str, Any]:
    """Export ``version``'s backbone to int8 (calibrated on training crops of the prepared split),
    answer this run's validation cells with both flavours, and record which one serves: int8 only
    when the paired interval of (int8 - full) accuracy lies above ``-export.max_accuracy_loss``
    (``packaging.choose_flavour``). The version is registered whatever happens here: a failed
    export leaves it serving its full model, with the reason on its ``serving_flavour_evidence`` tag."""
    from hematovision.registry.packaging import FlavourDecision, load_classifier

    registry = stores.registry(settings)
    started = time.perf_counter()
    try:
        classifier = load_classifier(f"models:/{registry.name}/{version}")
        manifest = load_manifest(settings)
        export = int8_export(settings, params, classifier, manifest)
        decision = compare_flavours(settings, params, classifier, export, manifest)
    except Exception as error:  # the version stands; only its cheaper flavour is lost
        logger.warning("no int8 flavour for version %s: %s", version, error, exc_info=True)
        export, decision = None, FlavourDecision(FULL, f"full: the int8 export failed: {type(error).__name__}: {error}")
    try:
        registry.record_flavour(version, decision, export)
    except Exception as error:  # untagged, the version serves its full model; registering again would duplicate it
        logger.warning("could not record version %s's flavour: %s", version, error, exc_info=True)
        return {"flavour": FULL, "reason": f"not recorded: {type(error).__name__}: {error}"}
    logger.info("version %s serves %s (%.0f s)", version, decision.reason, time.perf_counter() - started)
    return {"flavour": decision.flavour, "reason": decision.reason, **decision.figures()}


def int8_export(settings: Settings, params: Params, classifier: Classifier, manifest: pd.DataFrame) -> bytes:
    """``classifier``'s int8 export, calibrated on real training crops of the prepared split
    (``CALIBRATION_IMAGES_PER_CLASS`` of each class, drawn with the run's seed)."""

    shuffled = manifest[manifest.split == "train"].sample(frac=1.0, random_state=params.seed)
    calibration = shuffled.groupby("label").head(CALIBRATION_IMAGES_PER_CLASS)
    data_dir = settings.path(settings.paths.data_dir)
    return export_int8(classifier, classifier.crops([data_dir / p for p in calibration.path]))


def compare_flavours(settings: Settings, params: Params, classifier: Classifier, export: bytes, manifest: pd.DataFrame):
    """Both flavours of ``classifier`` on the manifest's validation cells (the rows the gate scores;
    the full model's answers through the embedding cache, the export's under its own fingerprint),
    paired: the full model as the champion, the export as the challenger."""
    from hematovision.registry.packaging import choose_flavour

    val_rows = limit_per_cell(manifest[manifest.split == "val"], params.train.max_images_per_cell, params.seed)
    answers = {}
    with stores.embedding_cache(settings) as cache:
        for who, model in (("full", classifier), ("int8", Int8Classifier.from_classifier(classifier, export))):
            answers[who] = score_rows(model, val_rows, settings.path(settings.paths.data_dir), cache, 0, params.seed)[1]
    paired = pair_answers(answers["full"], answers["int8"])
    return choose_flavour(paired, classifier.classes, params.export, params.promote)


def promote_step(settings: Settings, params: Params, version: str, force: bool = False) -> gate.GateDecision:
    """The gate between the new version and the champion, both scored alike on this run's
    validation split and compared paired, image by image (their logged figures may come from
    another split, an older data version, or lack the metric: a champion made by retraining is
    scored on its holdout)."""
    registry = stores.registry(settings)
    champion = registry.version_by_alias(CHAMPION)
    paired, classes, not_comparable = None, None, None
    if champion is not None and str(champion.version) != str(version):
        not_comparable = gate.champion_saw_validation(
            registry.trained_on(champion.version), str(champion.version), load_manifest(settings), str(version)
        )
        if not_comparable is None:
            name = settings.registry.registered_model
            scored = {}
            for who, number in (("champion", champion.version), ("challenger", version)):
                scored[who] = validation_answers(settings, params, f"models:/{name}/{number}")
                if scored[who] is None:
                    not_comparable = (
                        f"the {who} v{number} could not be loaded to score it on this run's validation split "
                        "(see the log): promote by hand if the challenger is better (--force)"
                    )
            if not_comparable is None:
                paired = {"val": pair_answers(scored["champion"][2], scored["challenger"][2])}
                classes = (scored["champion"][0], scored["challenger"][0])
    return gate.promote(
        registry, version, params.promote, force, paired=paired, classes=classes, not_comparable=not_comparable
    )


def scored_on_validation(settings: Settings, params: Params, model_uri: str) -> dict[str, float] | None:
    """A registered model's validation metrics on this run's split, named as the training run logs
    them (None, with a warning, if it cannot be loaded)."""
    scored = validation_answers(settings, params, model_uri)
    return None if scored is None else flatten_for_mlflow(scored[1], "val")


def validation_answers(
    settings: Settings, params: Params, model_uri: str
) -> tuple[list[str], dict[str, Any], pd.DataFrame] | None:
    """A registered model on this run's validation split (the rows training validated on): its
    classes, metrics and per-image answers (None, with a warning, if it cannot be loaded). The
    embedding cache keeps its backbone's answers: a challenger scored here is not scored again
    when it is the champion."""
    from hematovision.registry.packaging import load_classifier  # heavy: imports MLflow's pyfunc

    try:
        classifier = load_classifier(model_uri)
    except Exception as error:  # noqa: BLE001 - reported to the gate, which refuses with the reason
        logger.warning("could not load %s to score it: %s", model_uri, error)
        return None
    manifest = load_manifest(settings)
    val_rows = limit_per_cell(manifest[manifest.split == "val"], params.train.max_images_per_cell, params.seed)
    with stores.embedding_cache(settings) as cache:
        metrics, answers = score_rows(
            classifier, val_rows, settings.path(settings.paths.data_dir), cache, 0, params.seed
        )
    return list(classifier.classes), metrics, answers
