"""Scoring a classifier on a labelled image set: the official TEST split, another laboratory's
images, or any folder of class-named subfolders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hematovision.data.dataset import label_indices, scan_class_folders, validate_images
from hematovision.model.classifier import Answers, Classifier
from hematovision.model.embeddings import EmbeddingCache, cached_embeddings
from hematovision.model.open_set import expected_calibration_error
from hematovision.progress import counting
from hematovision.registry.paired import answers_frame
from hematovision.training.metrics import classification_metrics, plot_confusion_matrix


def answer_paths(
    classifier: Classifier,
    paths: list[Path],
    cache: EmbeddingCache | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Answers:
    """The model's answers for image files, as it answers in service: its test-time views, its
    temperature and open set (through the embedding cache where one is given)."""
    views = classifier.config.tta_views
    if cache is not None:
        embeddings = cached_embeddings(
            classifier, paths, cache, progress=counting(progress, len(paths), views), views=views
        )
        return classifier.answer(embeddings, views)
    answers = classifier.predict_answers(classifier.crops(paths))
    if progress:
        progress(len(paths), len(paths))
    return answers


def open_set_metrics(
    classifier: Classifier, answers: Answers, labels: list[str], known_labels: np.ndarray | None = None
) -> dict[str, Any]:
    """Share answered ``unknown`` overall and per label, the expected calibration error on the
    model's own classes, and the open-set AUROC between cells of its classes and of other types
    (when both are present and the model has an open set)."""
    labels_array = np.asarray(labels)
    is_known = np.isin(labels_array, classifier.classes)
    out: dict[str, Any] = {
        "unknown_rate": float(answers.unknown[is_known].mean()) if is_known.any() else None,
        "unknown_rate_by_label": {
            label: float(answers.unknown[labels_array == label].mean()) for label in sorted(set(labels))
        },
        "open_set": classifier.open_set is not None,
    }
    if is_known.any():
        indices = np.array([classifier.classes.index(label) for label in labels_array[is_known]])
        out["ece"] = expected_calibration_error(answers.probabilities[is_known], indices)
    if classifier.open_set is not None and is_known.any() and (~is_known).any():
        from sklearn.metrics import roc_auc_score

        out["open_set_auroc"] = float(roc_auc_score(~is_known, answers.open_set_scores))
        out["unknown_rate_other_types"] = float(answers.unknown[~is_known].mean())
    return out


def evaluate_rows(
    classifier: Classifier,
    rows: pd.DataFrame,
    image_root: Path,
    cache: EmbeddingCache | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Metrics of ``classifier`` on manifest-style rows (path relative to ``image_root``, label,
    optional group): classification metrics on the rows of its classes, how many of every label
    it answered ``unknown`` (rows of types it lacks included), calibration and open-set AUROC.
    ``progress(done, total)`` counts images."""
    return score_rows(classifier, rows, image_root, cache, bootstrap_samples, seed, progress)[0]


def score_rows(
    classifier: Classifier,
    rows: pd.DataFrame,
    image_root: Path,
    cache: EmbeddingCache | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[dict[str, Any], pd.DataFrame]:
    """:func:`evaluate_rows`' metrics and the per-image answers behind them on the rows of the
    model's classes (``path, group, label, predicted``: its class, whatever the open-set verdict),
    which the promotion gate pairs."""
    answers = answer_paths(classifier, [image_root / p for p in rows.path], cache, progress)
    is_known = rows.label.isin(classifier.classes).to_numpy()
    known = rows[is_known]
    groups = list(known.group) if "group" in known and known.group.notna().all() else None
    metrics = (
        classification_metrics(
            label_indices(known.label, classifier.classes),
            answers.probabilities[is_known],
            classifier.classes,
            groups,
            bootstrap_samples,
            seed,
        )
        if is_known.any()
        else {"n_images": 0}
    )
    metrics["n_skipped_unknown_label"] = int(len(rows) - len(known))
    metrics.update(open_set_metrics(classifier, answers, list(rows.label)))
    predicted = (
        [classifier.classes[i] for i in answers.probabilities[is_known].argmax(axis=1)] if is_known.any() else []
    )
    return metrics, answers_frame(known, predicted)


def evaluate_folder(
    classifier: Classifier,
    folder: Path,
    cache: EmbeddingCache | None = None,
    bootstrap_samples: int = 1000,
    max_images_per_class: int = 0,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Metrics on a folder of class-named subfolders (names case-insensitive); unknown folders and
    unreadable images are reported in the result, not fatal. ``progress(done, total)`` counts
    the readable images."""
    rows, unknown = scan_class_folders(folder, tuple(classifier.classes))
    if unknown:  # folders of types the model lacks: answered too, to count how many come back unknown
        rows, _ = scan_class_folders(folder, [*classifier.classes, *unknown])
    if max_images_per_class > 0:
        rows = rows.groupby("label", group_keys=False).apply(
            lambda g: g.sample(min(len(g), max_images_per_class), random_state=seed)
        )
    rows, bad = validate_images(rows, folder)
    if rows.empty:
        raise ValueError(f"{folder} holds no readable images in folders named after {', '.join(classifier.classes)}")
    metrics = evaluate_rows(classifier, rows, folder, cache, bootstrap_samples, seed, progress)
    metrics["unknown_folders"] = list(unknown)
    metrics["unreadable_images"] = (
        [{"path": str(r.path), "error": f"{r.error_code}: {r.error_message}"} for r in bad.itertuples()]
        if not bad.empty
        else []
    )
    return metrics


def save_confusion_plot(metrics: dict[str, Any], classes: list[str], title: str, path: Path) -> Path:
    return plot_confusion_matrix(metrics["confusion_matrix"], classes, title, path)
