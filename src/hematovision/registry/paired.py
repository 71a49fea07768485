"""Two models compared *paired*: their answers on the same images, the difference of a metric
(challenger - champion) and a percentile interval for it from a bootstrap that resamples cells.

Both models answer the same pictures, so most of the noise of a small validation set (which cells
happen to be in it) is shared and cancels out of the difference; what is left is measured by
resampling whole cells (groups) with replacement, never single augmented copies of a cell.

A model's answers are a frame with the columns ``path``, ``group`` (the cell), ``label`` (the truth)
and ``predicted`` (a class name). :func:`pair_answers` joins two of them on ``path``; everything
here needs numpy and pandas only.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

ANSWER_COLUMNS = ("path", "group", "label", "predicted")
METRICS = ("accuracy", "macro_f1")


@dataclass(frozen=True)
class PairedDifference:
    """A metric of both models on the same images, and the interval of the difference."""

    metric: str  # e.g. "val_macro_f1": split prefix + metric, as the runs log it
    champion: float
    challenger: float
    low: float  # percentile interval of challenger - champion over resampled cells
    high: float
    confidence: float
    n_cells: int
    n_images: int
    samples: int

    @property
    def difference(self) -> float:
        return self.challenger - self.champion

    def describe(self) -> str:
        return (
            f"{self.metric} {self.challenger:.4f} vs champion {self.champion:.4f}: difference "
            f"{self.difference:+.4f}, {self.confidence:.0%} interval [{self.low:+.4f}, {self.high:+.4f}] "
            f"(paired bootstrap, {self.samples} resamples of {self.n_cells} cells, {self.n_images} images)"
        )

    def figures(self) -> dict[str, float]:
        """Scalars for an MLflow run: ``gate_<metric>_difference``, ``_low``, ``_high``, ``_cells``."""
        name = f"gate_{self.metric}"
        return {
            f"{name}_champion": self.champion,
            f"{name}_challenger": self.challenger,
            f"{name}_difference": self.difference,
            f"{name}_low": self.low,
            f"{name}_high": self.high,
            f"{name}_cells": float(self.n_cells),
        }


def answers_frame(rows: pd.DataFrame, predicted: Sequence[str]) -> pd.DataFrame:
    """A model's answers: the rows' path, group (cell) and label beside its predicted class."""
    return pd.DataFrame(
        {
            "path": [str(p) for p in rows.path],
            "group": [str(g) for g in rows.group] if "group" in rows else [str(p) for p in rows.path],
            "label": list(rows.label),
            "predicted": list(predicted),
        }
    )


def pair_answers(champion: pd.DataFrame, challenger: pd.DataFrame) -> pd.DataFrame:
    """Both models' answers on one frame (``path, group, label, champion, challenger``), joined on the
    image. An image only one of them answered (a class the other does not know) keeps the other's
    answer empty; the comparison uses the images both answered, a new class the challenger's alone."""
    left = champion.loc[:, list(ANSWER_COLUMNS)].rename(columns={"predicted": "champion"})
    right = challenger.loc[:, list(ANSWER_COLUMNS)].rename(columns={"predicted": "challenger"})
    merged = right.merge(left, on="path", how="outer", suffixes=("", "_champion"))
    merged["group"] = merged.group.fillna(merged.pop("group_champion"))
    merged["label"] = merged.label.fillna(merged.pop("label_champion"))
    return merged[["path", "group", "label", "champion", "challenger"]].reset_index(drop=True)


def shared_rows(paired: pd.DataFrame, classes: Sequence[str]) -> pd.DataFrame:
    """The images of ``classes`` that both models answered."""
    return paired[paired.label.isin(list(classes)) & paired.champion.notna() & paired.challenger.notna()]


def paired_difference(
    paired: pd.DataFrame,
    metric: str,
    classes: Sequence[str],
    samples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> PairedDifference:
    """``metric`` (``<split>_accuracy`` or ``<split>_macro_f1``) of both models on the images of
    ``classes`` both answered, and the percentile interval of the difference over ``samples``
    resamples of the cells (the same resampled cells for both models: that is the pairing).
    An answer outside ``classes`` counts as wrong. Deterministic for a given ``seed``."""
    kind = metric.split("_", 1)[1] if "_" in metric else metric
    if kind not in METRICS:
        raise ValueError(f"the paired gate computes {' or '.join(METRICS)}, not {metric!r}")
    classes = list(classes)
    rows = shared_rows(paired, classes)
    if rows.empty:
        nan = float("nan")
        return PairedDifference(metric, nan, nan, nan, nan, confidence, 0, 0, samples)
    cells, cell_index = np.unique(rows.group.astype(str).to_numpy(), return_inverse=True)
    truth = _indices(rows.label, classes)
    counts = {
        who: _cell_counts(truth, _indices(rows[who], classes), cell_index, len(cells), len(classes))
        for who in ("champion", "challenger")
    }

    def score(weights: np.ndarray, who: str) -> np.ndarray:
        images, correct, tp, fp, fn = (weights @ c for c in counts[who])
        if kind == "accuracy":
            return correct / np.maximum(images, 1)
        denominator = 2 * tp + fp + fn
        f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
        return f1.mean(axis=-1)

    whole = np.ones((1, len(cells)))
    champion, challenger = float(score(whole, "champion")[0]), float(score(whole, "challenger")[0])
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(len(cells), np.full(len(cells), 1.0 / len(cells)), size=max(samples, 1)).astype(float)
    differences = score(weights, "challenger") - score(weights, "champion")
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(differences, [tail, 100 - tail])
    return PairedDifference(
        metric, champion, challenger, float(low), float(high), confidence, len(cells), len(rows), samples
    )


def per_class_f1(paired: pd.DataFrame, classes: Sequence[str], who: str) -> dict[str, float]:
    """F1 of ``who`` for each of ``classes`` on the images of those classes both models answered."""
    rows = shared_rows(paired, classes)
    truth, predicted = rows.label.to_numpy(), rows[who].to_numpy()
    return {name: _f1(truth, predicted, name)[0] for name in classes}


def class_figures(paired: pd.DataFrame, name: str, who: str = "challenger") -> dict[str, float]:
    """F1, recall, images and cells of one class for ``who`` over every image ``who`` answered
    (how a class the other model lacks is reported)."""
    rows = paired[paired[who].notna()]
    f1, recall = _f1(rows.label.to_numpy(), rows[who].to_numpy(), name)
    own = rows[rows.label == name]
    return {"f1": f1, "recall": recall, "n_images": int(len(own)), "n_cells": int(own.group.nunique())}


def _f1(truth: np.ndarray, predicted: np.ndarray, name: str) -> tuple[float, float]:
    tp = int(((truth == name) & (predicted == name)).sum())
    fp = int(((truth != name) & (predicted == name)).sum())
    fn = int(((truth == name) & (predicted != name)).sum())
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return float(f1), float(recall)


def _indices(labels: pd.Series, classes: list[str]) -> np.ndarray:
    lookup = {name: i for i, name in enumerate(classes)}
    return np.array([lookup.get(label, -1) for label in labels], dtype=int)


def _cell_counts(
    truth: np.ndarray, predicted: np.ndarray, cell_index: np.ndarray, n_cells: int, n_classes: int
) -> tuple[np.ndarray, ...]:
    """Per cell: images, correct answers, and per class true positives, false positives, false negatives."""
    images = np.bincount(cell_index, minlength=n_cells).astype(float)
    correct = np.bincount(cell_index, weights=(truth == predicted).astype(float), minlength=n_cells)
    tp, fp, fn = (np.zeros((n_cells, n_classes)) for _ in range(3))
    for k in range(n_classes):
        np.add.at(tp[:, k], cell_index, (truth == k) & (predicted == k))
        np.add.at(fp[:, k], cell_index, (truth != k) & (predicted == k))
        np.add.at(fn[:, k], cell_index, (truth == k) & (predicted != k))
    return images, correct, tp, fp, fn
