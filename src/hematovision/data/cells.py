"""Find which pictures show the same real cell, by what they look like.

The blood-cells dataset holds dozens to hundreds of rotated/shifted/flipped copies of every real
cell. Its README says the `_<k>_` in a file name is the cell's index, but in this copy it is not:
an image's nearest neighbour shares its `_<k>_` no more often than a random image of its class
does (benchmarks/error_analysis.py), so a split by `_<k>_` puts copies of one cell on both sides
and validation scores ~0.999 on every run. The copies of one cell do look alike, though: the crop
around the nucleus is the same cell whatever the rotation, and its ImageNet embedding moves little.
Clustering those embeddings (per split and class) recovers cells: at the default distance TRAIN
comes out as 75 eosinophil groups for the README's 75 cells, lymphocyte 32 for 27, monocyte 23 for
16, neutrophil 128 for 159 (benchmarks/RESULTS.md, training runs of 2026-11-25), and an image's
nearest neighbour shares its group 0.91-0.99 of the time (benchmarks/error_analysis.py).

Merging two real cells into one group costs a little validation data; splitting one cell into two
groups leaks it. So the distance is generous, at the price of some merged cells; that validation
now scores no higher than TEST (it scored 0.999 with the names' groups) says little leaks.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def cluster_cells(embeddings: np.ndarray, max_distance: float) -> np.ndarray:
    """Cluster index (0, 1, ...) of each embedding: average-linkage clustering on cosine distance,
    cut where clusters are further apart than ``max_distance``. Numbered in order of first
    appearance, so the same rows in the same order always get the same numbers."""
    from sklearn.cluster import AgglomerativeClustering

    n = len(embeddings)
    if n < 2:
        return np.zeros(n, dtype=int)
    raw = AgglomerativeClustering(n_clusters=None, distance_threshold=max_distance, metric="cosine",
                                  linkage="average").fit_predict(np.asarray(embeddings, dtype=np.float64))
    _, first, inverse = np.unique(raw, return_index=True, return_inverse=True)
    rank = np.argsort(np.argsort(first))  # cluster -> its number by first appearance
    return rank[inverse]


def group_by_content(rows: pd.DataFrame, embeddings: np.ndarray, max_distance: float) -> pd.Series:
    """A cell group for each row, ``"<split>/<label>/cell<j>"``, clustering within each (split,
    label): copies of one cell never share a split with another class or another split's cells."""
    embeddings = np.asarray(embeddings)
    if len(embeddings) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(embeddings)} embeddings")
    groups = pd.Series("", index=rows.index, dtype=object, name="group")
    for (split, label), part in rows.groupby(["split", "label"], sort=True):
        positions = rows.index.get_indexer(part.index)
        ids = cluster_cells(embeddings[positions], max_distance)
        groups.loc[part.index] = [f"{split}/{label}/cell{i}" for i in ids]
    return groups
