"""Retraining's fast path: a new head on the parent's unchanged backbone, from cached embeddings.

The raw training pictures come back from the embedding cache (the parent's backbone embedded them
before); only the correction images are new, embedded in several dihedral views. Each source gets
its share of the sample weight (``retrain.corrections_share``), the classes equal within it, so a
few hundred corrections are heard beside thousands of raw pictures without drowning them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from hematovision.data.dataset import label_indices
from hematovision.model.classifier import Classifier
from hematovision.model.embeddings import EmbeddingCache, cached_embeddings
from hematovision.params import Params
from hematovision.progress import counting

Progress = Callable[[str, int, int], None]


def train_head(
    classifier: Classifier, manifest: pd.DataFrame, params: Params, cache: EmbeddingCache, report: Progress
) -> dict[str, Any]:
    """A new head on the parent's frozen backbone: raw rows from the embedding cache, correction
    images embedded in ``correction_views`` dihedral views (each view cached under its own key)."""
    import keras

    rp = params.retrain
    keras.utils.set_random_seed(params.seed)
    timings: dict[str, float] = {}
    # Raw validation cells stay unseen: the training flow's gate scores the champion on them, and a
    # retrained champion that had learned them would look better there than any new model can.
    raw = manifest[(manifest.source == "raw") & (manifest.split == "train")]
    fixes = manifest[(manifest.source == "corrections") & (manifest.split == "train")]

    started = time.perf_counter()

    def step(what: str, total: int):
        return counting(lambda done, of: report(what, done, of), total)

    emb_raw = cached_embeddings(
        classifier, [Path(p) for p in raw.path], cache, progress=step("embedding raw data (cached)", len(raw))
    )
    timings["embed_raw_s"] = time.perf_counter() - started
    started = time.perf_counter()
    views = rp.correction_views
    emb_fix = cached_embeddings(
        classifier,
        [Path(p) for p in fixes.path],
        cache,
        progress=step("embedding corrections", views * len(fixes)),
        views=views,
    )
    n = len(fixes)
    timings["embed_corrections_s"] = time.perf_counter() - started

    x = np.concatenate([emb_raw, emb_fix]).astype(np.float32)
    y = np.concatenate(
        [label_indices(raw.label, classifier.classes), np.tile(label_indices(fixes.label, classifier.classes), views)]
    )
    source = np.array(["raw"] * len(raw) + ["corrections"] * len(emb_fix))
    weights = balanced_weights(y, source, {"raw": 1.0 - rp.corrections_share, "corrections": rp.corrections_share})

    started = time.perf_counter()
    head = classifier.head
    head.compile(
        optimizer=keras.optimizers.Adam(rp.head_learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    fit = head.fit(
        x, y, sample_weight=weights, epochs=rp.head_epochs, batch_size=params.train.batch_size, shuffle=True, verbose=0
    )
    report("training the head", rp.head_epochs, rp.head_epochs)
    timings["head_s"] = time.perf_counter() - started
    return {
        "timings": timings,
        "n_train_images": int(len(x)),
        "n_raw_images": int(len(raw)),
        "n_correction_images": int(n),
        "correction_views": views,
        "final_loss": float(fit.history["loss"][-1]),
        "final_accuracy": float(fit.history["accuracy"][-1]),
    }


def balanced_weights(y: np.ndarray, source: np.ndarray, shares: dict[str, float]) -> np.ndarray:
    """Sample weights giving each source its share of the total weight, classes equal within it;
    mean weight 1 (so the learning rate means the same whatever the mix)."""
    weights = np.zeros(len(y), np.float64)
    present = {s: share for s, share in shares.items() if (source == s).any() and share > 0}
    total_share = sum(present.values()) or 1.0
    for s, share in present.items():
        in_source = source == s
        classes = np.unique(y[in_source])
        for c in classes:
            mask = in_source & (y == c)
            weights[mask] = share / total_share / len(classes) / mask.sum()
    return (weights * len(y)).astype(np.float32)
