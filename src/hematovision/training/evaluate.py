"""Scoring a classifier on a labelled image set: the official TEST split, another laboratory's
images, or any folder of class-named subfolders."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pandas as pd

from hematovision.data.dataset import label_indices, scan_class_folders, validate_images
from hematovision.model.classifier import Classifier
from hematovision.model.embeddings import EmbeddingCache, cached_embeddings
from hematovision.progress import counting
from hematovision.training.metrics import classification_metrics, plot_confusion_matrix


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
    optional group). Rows whose label the model does not know are left out and counted.
    ``progress(done, total)`` counts images."""
    known = rows[rows.label.isin(classifier.classes)]
    paths = [image_root / p for p in known.path]
    if cache is not None:  # the model as it answers: its test-time views, from the cache where possible
        views = classifier.config.tta_views
        embeddings = cached_embeddings(
            classifier, paths, cache, progress=counting(progress, len(paths), views), views=views
        )
        probabilities = classifier.classify_embeddings(embeddings).reshape(views, len(paths), -1).mean(axis=0)
    else:
        probabilities = classifier.predict_images(paths)
        if progress:
            progress(len(paths), len(paths))
    groups = list(known.group) if "group" in known and known.group.notna().all() else None
    metrics = classification_metrics(
        label_indices(known.label, classifier.classes),
        probabilities,
        classifier.classes,
        groups,
        bootstrap_samples,
        seed,
    )
    metrics["n_skipped_unknown_label"] = int(len(rows) - len(known))
    return metrics


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
