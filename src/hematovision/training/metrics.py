"""Classification metrics an expert would trust on a dataset of few distinct cells.

The blood-cells TEST split is ~2,500 images of only 71 real cells, so every interval here is a
*cluster* bootstrap: cells (groups) are resampled, never individual augmented copies, otherwise the
interval would pretend to 2,500 independent observations.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support


def classification_metrics(
    y_true: Sequence[int],
    probabilities: np.ndarray,
    classes: Sequence[str],
    groups: Sequence[str | None] | None = None,
    bootstrap_samples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Image-level accuracy/macro-F1/per-class scores, the confusion matrix and, where groups are
    known, cell-level accuracy (one vote per cell: mean probability over its images) with 95% intervals
    (image level: cluster bootstrap over cells; cell level: Wilson)."""
    y_true = np.asarray(y_true, dtype=int)
    probabilities = np.asarray(probabilities, dtype=float)
    y_pred = probabilities.argmax(axis=1)
    labels = list(range(len(classes)))
    precision, recall, f1, support = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out: dict[str, Any] = {
        "n_images": int(len(y_true)),
        "accuracy": float((y_pred == y_true).mean()) if len(y_true) else float("nan"),
        "macro_f1": float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        "per_class": {
            name: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, name in enumerate(classes)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
    }
    if groups is None or any(g is None or g == "" for g in groups):
        return out

    groups_arr = np.asarray(groups)
    cell_ids, cell_index = np.unique(groups_arr, return_inverse=True)
    n_cells = len(cell_ids)
    cell_prob = np.zeros((n_cells, len(classes)))
    np.add.at(cell_prob, cell_index, probabilities)
    cell_true = np.zeros(n_cells, dtype=int)
    cell_true[cell_index] = y_true
    cell_correct = cell_prob.argmax(axis=1) == cell_true
    image_correct_per_cell = np.bincount(cell_index, weights=(y_pred == y_true), minlength=n_cells)
    images_per_cell = np.bincount(cell_index, minlength=n_cells)

    rng = np.random.default_rng(seed)
    boot_image = []
    for _ in range(bootstrap_samples):
        pick = rng.integers(0, n_cells, n_cells)
        boot_image.append(image_correct_per_cell[pick].sum() / images_per_cell[pick].sum())
    out.update(
        {
            "n_cells": int(n_cells),
            "cell_accuracy": float(cell_correct.mean()),
            "cell_accuracy_ci95": wilson_interval(int(cell_correct.sum()), n_cells),
            "accuracy_ci95": _interval(boot_image),
            "cells_per_class": {name: int((cell_true == i).sum()) for i, name in enumerate(classes)},
        }
    )
    return out


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for a proportion of independent trials (cells). Unlike a percentile
    bootstrap it stays honest at 0% or 100%: 71 of 71 cells right gives [0.949, 1.0], not [1, 1]."""
    if trials == 0:
        return [float("nan"), float("nan")]
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * ((p * (1 - p) / trials + z * z / (4 * trials * trials)) ** 0.5) / (1 + z * z / trials)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def _interval(samples: list[float]) -> list[float]:
    if not samples:
        return [float("nan"), float("nan")]
    low, high = np.percentile(samples, [2.5, 97.5])
    return [float(low), float(high)]


def flatten_for_mlflow(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    """Scalar metrics as MLflow wants them: ``{prefix}_accuracy``, ``{prefix}_f1_monocyte`` ..."""
    flat: dict[str, float] = {}
    for key in ("accuracy", "macro_f1", "cell_accuracy"):
        if key in metrics:
            flat[f"{prefix}_{key}"] = metrics[key]
    for key in ("accuracy_ci95", "cell_accuracy_ci95"):
        if key in metrics:
            flat[f"{prefix}_{key}_low"], flat[f"{prefix}_{key}_high"] = metrics[key]
    for name, scores in metrics.get("per_class", {}).items():
        for score in ("precision", "recall", "f1"):
            flat[f"{prefix}_{score}_{name}"] = scores[score]
    # the open set and calibration (model/open_set.py)
    for key in ("unknown_rate", "ece", "ece_uncalibrated", "open_set_auroc", "temperature", "open_set_threshold"):
        if metrics.get(key) is not None:
            flat[f"{prefix}_{key}"] = float(metrics[key])
    for label, rate in metrics.get("unknown_rate_by_label", {}).items():
        flat[f"{prefix}_unknown_rate_{label}"] = float(rate)
    return flat


def plot_confusion_matrix(matrix: Sequence[Sequence[int]], classes: Sequence[str], title: str, path: Path) -> Path:
    """Write a confusion-matrix PNG with counts and row-normalised shading."""
    import matplotlib

    matplotlib.use("Agg")  # no display on servers and CI
    import matplotlib.pyplot as plt

    counts = np.asarray(matrix)
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros_like(counts, dtype=float), where=rows > 0)
    fig, ax = plt.subplots(figsize=(5.5, 4.8), dpi=110)
    ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(classes)), classes, rotation=30, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(counts.shape[0]):
        for j in range(counts.shape[1]):
            ax.text(
                j,
                i,
                f"{counts[i, j]}\n{share[i, j]:.0%}",
                ha="center",
                va="center",
                color="white" if share[i, j] > 0.5 else "black",
                fontsize=8,
            )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
