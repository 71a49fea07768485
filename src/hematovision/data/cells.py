"""Find which pictures show the same real cell, by what they look like.

The blood-cells dataset holds dozens to hundreds of rotated/shifted/flipped copies of every real
cell. Its README says the `_<k>_` in a file name is the cell's index, but in this copy it is not:
an image's nearest neighbour shares its `_<k>_` no more often than a random image of its class
does, so a split by `_<k>_` puts copies of one cell on both sides and validation leaks. The copies
of one cell do look alike, though: the crop around the nucleus is the same cell whatever the
rotation, and its ImageNet embedding moves little. Clustering those embeddings (per split and
class) recovers cells: the group counts come close to the README's cell counts, and an image's
nearest neighbour nearly always shares its group (``benchmarks/error_analysis.py`` measures both;
the figures are in ``benchmarks/RESULTS.md``).

Merging two real cells into one group costs a little validation data; splitting one cell into two
groups leaks it. So the distance is generous, at the price of some merged cells; validation then
scores no higher than TEST, which says little leaks.
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
    raw = AgglomerativeClustering(
        n_clusters=None, distance_threshold=max_distance, metric="cosine", linkage="average"
    ).fit_predict(np.asarray(embeddings, dtype=np.float64))
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
