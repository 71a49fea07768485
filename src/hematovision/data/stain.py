"""Stain: how a laboratory's Romanowsky/Giemsa stain, scanner and light colour a cell, and how the
platform takes that difference out (normalisation, at training and serving alike) or trains through
it (augmentation, while fine-tuning).

Crops are (N, H, W, 3) float32 arrays in 0..255, as the backbone takes them.
"""

from __future__ import annotations

import numpy as np

METHODS = ("none",)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown stain normalisation {method!r} (known: {', '.join(METHODS)})")
    return method


def normalise(crops: np.ndarray, method: str) -> np.ndarray:
    """``crops`` with the stain mapped onto the method's fixed reference; deterministic, so a crop
    gets the same pixels at serving time as it got at training time."""
    check_method(method)
    return crops
