"""Fitting a model's open set and temperature (``model/open_set.py``): class statistics from the
cells it trained on, threshold and temperature from validation cells only. Training, head
retraining and full retraining all end here."""

from __future__ import annotations

import numpy as np

from hematovision.model.classifier import Classifier, dihedral_view
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
