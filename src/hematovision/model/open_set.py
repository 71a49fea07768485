"""Cells the model does not know, and confidence that means what it says.

Two things fitted with the model and saved beside it (``open_set.npz``):

* **An open-set score**: the Mahalanobis distance of a cell's embedding (the mean over the model's
  test-time views) to the nearest class, with one covariance shared by the classes (shrunk towards
  a multiple of the identity, since a few hundred cells cannot fill a 1280-dimensional covariance).
  A softmax head must spread all of its probability over the classes it has, so an erythroblast gets
  "neutrophil 0.95"; a distance in the model's own representation grows for what it never saw.
  ``benchmarks/open_set.py`` measures it (``benchmarks/RESULTS.md``): once a new site's corrections
  are in the statistics, basophils and immature granulocytes sit as close to the classes as the
  site's own cells do, which is why a laboratory adds frequent types as classes.
* **A temperature** for the head's probabilities, fitted on validation by likelihood, so that
  "0.9" is right about nine times in ten (the expected calibration error is reported).

The threshold above which a cell is answered ``unknown`` is a quantile of the scores of
*validation* cells (``open_set.known_quantile``): the share of cells of known types, from sources
the model trained on, that will be called unknown. The class statistics are kept as sufficient
statistics (counts, means, pooled scatter) so that retraining adds corrections, or a whole new
class, without the original training images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

UNKNOWN = "unknown"
OPEN_SET_FILE = "open_set.npz"


@dataclass
class OpenSet:
    classes: list[str]
    counts: np.ndarray  # (C,) embeddings seen per class
    means: np.ndarray  # (C, D)
    scatter: np.ndarray  # (D, D) pooled within-class sum of squares
    shrinkage: float
    threshold: float = float("inf")
    temperature: float = 1.0
    known_quantile: float = 0.95
    _precision: np.ndarray | None = None

    # --- fitting ---------------------------------------------------------------------------------
    @classmethod
    def fit(cls, embeddings: np.ndarray, labels: np.ndarray, classes: list[str]) -> OpenSet:
        """Class means and the pooled covariance of ``embeddings`` (labels are class indices)."""
        from sklearn.covariance import ledoit_wolf_shrinkage

        embeddings = np.asarray(embeddings, np.float64)
        dim = embeddings.shape[1]
        counts = np.zeros(len(classes))
        means = np.zeros((len(classes), dim))
        scatter = np.zeros((dim, dim))
        for index in range(len(classes)):
            members = embeddings[labels == index]
            counts[index] = len(members)
            if len(members):
                means[index] = members.mean(axis=0)
                centred = members - means[index]
                scatter += centred.T @ centred
        centred_all = embeddings - means[labels]
        shrinkage = float(ledoit_wolf_shrinkage(centred_all, assume_centered=True))
        return cls(list(classes), counts, means, scatter, shrinkage)

    def add(self, embeddings: np.ndarray, labels: list[str]) -> OpenSet:
        """These statistics with more labelled embeddings merged in (Chan et al.'s pairwise update);
        a label that is not yet a class becomes one. Threshold and temperature are kept: calibrate
        again afterwards."""
        classes = list(self.classes) + sorted({label for label in labels} - set(self.classes))
        dim = self.means.shape[1]
        counts = np.concatenate([self.counts, np.zeros(len(classes) - len(self.classes))])
        means = np.concatenate([self.means, np.zeros((len(classes) - len(self.classes), dim))])
        scatter = self.scatter.copy()
        embeddings = np.asarray(embeddings, np.float64)
        labels_array = np.asarray(labels)
        for index, name in enumerate(classes):
            members = embeddings[labels_array == name]
            if not len(members):
                continue
            new_mean = members.mean(axis=0)
            centred = members - new_mean
            n_old, n_new = counts[index], len(members)
            delta = new_mean - means[index]
            scatter += centred.T @ centred + np.outer(delta, delta) * (n_old * n_new / (n_old + n_new))
            means[index] = means[index] + delta * n_new / (n_old + n_new)
            counts[index] = n_old + n_new
        return OpenSet(
            classes, counts, means, scatter, self.shrinkage, self.threshold, self.temperature, self.known_quantile
        )

    def calibrate(
        self, embeddings: np.ndarray, probabilities: np.ndarray, labels: np.ndarray, known_quantile: float
    ) -> OpenSet:
        """Threshold at the ``known_quantile`` of these validation cells' scores, and the temperature
        that makes the head's probabilities most likely on them."""
        self.known_quantile = known_quantile
        scores = self.score(embeddings)
        self.threshold = float(np.quantile(scores, known_quantile)) if len(scores) else float("inf")
        self.temperature = fit_temperature(probabilities, labels)
        return self

    # --- answering -------------------------------------------------------------------------------
    @property
    def precision(self) -> np.ndarray:
        if self._precision is None:
            dim = self.means.shape[1]
            covariance = self.scatter / max(self.counts.sum() - len(self.classes), 1.0)
            target = np.trace(covariance) / dim
            shrunk = (1 - self.shrinkage) * covariance + self.shrinkage * target * np.eye(dim)
            self._precision = np.linalg.inv(shrunk).astype(np.float32)
        return self._precision

    def score(self, embeddings: np.ndarray) -> np.ndarray:
        """Squared Mahalanobis distance to the nearest class mean; larger is less familiar."""
        embeddings = np.asarray(embeddings, np.float32)
        if not len(embeddings):
            return np.zeros(0, np.float32)
        present = self.counts > 0
        means = self.means[present].astype(np.float32)
        projected = embeddings @ self.precision
        # (x - m)' P (x - m) = x'Px - 2 m'Px + m'Pm, for every class at once
        own = np.einsum("ij,ij->i", projected, embeddings)
        cross = projected @ means.T
        centres = np.einsum("ij,jk,ik->i", means, self.precision, means)
        return np.maximum(own[:, None] - 2 * cross + centres[None, :], 0).min(axis=1)

    def unknown(self, scores: np.ndarray) -> np.ndarray:
        return np.asarray(scores) > self.threshold

    def calibrated(self, probabilities: np.ndarray) -> np.ndarray:
        return temperature_scaled(probabilities, self.temperature)

    # --- persistence -----------------------------------------------------------------------------
    def save(self, directory: Path) -> None:
        np.savez_compressed(
            Path(directory) / OPEN_SET_FILE,
            counts=self.counts,
            means=self.means.astype(np.float32),
            scatter=self.scatter.astype(np.float32),
            meta=np.array(
                json.dumps(
                    {
                        "classes": self.classes,
                        "shrinkage": self.shrinkage,
                        "threshold": self.threshold,
                        "temperature": self.temperature,
                        "known_quantile": self.known_quantile,
                    }
                )
            ),
        )

    @classmethod
    def load(cls, directory: Path) -> OpenSet | None:
        """The saved statistics, or None for a model saved before open-set answers existed (it
        answers only with its classes, as it always did)."""
        path = Path(directory) / OPEN_SET_FILE
        if not path.exists():
            return None
        with np.load(path) as saved:
            meta = json.loads(str(saved["meta"]))
            return cls(
                meta["classes"],
                saved["counts"].astype(np.float64),
                saved["means"].astype(np.float64),
                saved["scatter"].astype(np.float64),
                meta["shrinkage"],
                meta["threshold"],
                meta["temperature"],
                meta["known_quantile"],
            )


def temperature_scaled(probabilities: np.ndarray, temperature: float) -> np.ndarray:
    """softmax(log p / T): the same ranking, confidence made softer (T > 1) or sharper (T < 1)."""
    if temperature == 1.0 or not len(probabilities):
        return probabilities
    logits = np.log(np.clip(probabilities, 1e-12, 1.0)) / temperature
    logits -= logits.max(axis=1, keepdims=True)
    scaled = np.exp(logits)
    return scaled / scaled.sum(axis=1, keepdims=True)


def fit_temperature(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of ``labels`` (class indices)."""
    from scipy.optimize import minimize_scalar

    if not len(labels):
        return 1.0
    labels = np.asarray(labels)

    def nll(log_t: float) -> float:
        scaled = temperature_scaled(probabilities, float(np.exp(log_t)))
        return -float(np.log(np.clip(scaled[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())

    found = minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(found.x))


def expected_calibration_error(probabilities: np.ndarray, labels: np.ndarray, bins: int = 15) -> float:
    """Mean gap between confidence and accuracy over equal-width confidence bins, weighted by the
    bins' sizes (Guo et al. 2017)."""
    if not len(labels):
        return 0.0
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == np.asarray(labels)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(confidence, edges[1:-1]), 0, bins - 1)
    error = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            error += members.mean() * abs(confidence[members].mean() - correct[members].mean())
    return float(error)
