"""Fitting a model's open set and temperature (``model/open_set.py``): class statistics from the
cells it trained on, threshold and temperature from validation cells only. Training, head
retraining and full retraining all end here."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hematovision.model.classifier import Classifier, dihedral_view
from hematovision.model.embeddings import EmbeddingCache, cached_embeddings
from hematovision.model.open_set import OpenSet, expected_calibration_error
from hematovision.params import OpenSetParams


def view_embeddings(classifier: Classifier, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Embeddings of the model's test-time views of ``crops``, view-major (rows ``v * N + i``)."""
    if not len(crops):
        return np.zeros((0, classifier.backbone.output_shape[-1]), np.float32)
    return np.concatenate(
        [
            classifier.embed(dihedral_view(crops[start : start + 512], view), batch_size)
            for view in range(classifier.config.tta_views)
            for start in range(0, len(crops), 512)
        ]
    )


def mean_of_views(view_embeddings: np.ndarray, views: int) -> np.ndarray:
    return view_embeddings.reshape(views, len(view_embeddings) // views, -1).mean(axis=0)


def calibrate(
    classifier: Classifier,
    open_set: OpenSet,
    val_view_embeddings: np.ndarray,
    val_labels: np.ndarray,
    params: OpenSetParams,
) -> dict[str, float]:
    """Give ``classifier`` ``open_set`` calibrated on validation (class indices ``val_labels``);
    returns the calibration's figures (ECE before/after, temperature, threshold, unknown rate)."""
    views = classifier.config.tta_views
    classifier.open_set = None
    raw = classifier.answer(val_view_embeddings, views).probabilities
    open_set.calibrate(mean_of_views(val_view_embeddings, views), raw, val_labels, params.known_quantile)
    classifier.open_set = open_set
    calibrated = classifier.answer(val_view_embeddings, views)
    return {
        "ece_uncalibrated": expected_calibration_error(raw, val_labels),
        "ece": expected_calibration_error(calibrated.probabilities, val_labels),
        "temperature": open_set.temperature,
        "open_set_threshold": open_set.threshold,
        "unknown_rate": float(calibrated.unknown.mean()) if len(calibrated.unknown) else 0.0,
    }


def fit_open_set(
    classifier: Classifier,
    fit_crops: np.ndarray,
    fit_labels: np.ndarray,
    val_crops: np.ndarray,
    val_labels: np.ndarray,
    params: OpenSetParams,
) -> dict[str, float]:
    """Class statistics from ``fit_crops`` (the training cells), calibrated on ``val_crops``."""
    views = classifier.config.tta_views
    statistics = OpenSet.fit(
        mean_of_views(view_embeddings(classifier, fit_crops), views), fit_labels, classifier.classes
    )
    return calibrate(classifier, statistics, view_embeddings(classifier, val_crops), val_labels, params)


def extend_open_set(
    classifier: Classifier,
    add_paths: list[Path],
    add_labels: list[str],
    val_paths: list[Path],
    val_labels: list[str],
    cache: EmbeddingCache,
    params: OpenSetParams,
) -> dict[str, float]:
    """Retraining on an unchanged backbone: the parent's class statistics with ``add_paths`` (the
    corrections trained on) merged in, a type the parent lacked becoming a class, then calibrated
    again on ``val_paths`` (raw validation cells and the corrections' holdout). Embeddings come
    through the cache: training and evaluation embed the same views."""
    views = classifier.config.tta_views
    added = mean_of_views(cached_embeddings(classifier, add_paths, cache, views=views), views)
    open_set = classifier.open_set.add(added, add_labels)
    labels = np.array([classifier.classes.index(label) for label in val_labels])
    return calibrate(classifier, open_set, cached_embeddings(classifier, val_paths, cache, views=views), labels, params)
