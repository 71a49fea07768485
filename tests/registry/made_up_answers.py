"""Made-up answers of two models on the same images, for the gate's tests: cells of each class,
several augmented copies a cell, and a model that is right on every cell but those named."""

from __future__ import annotations

import pandas as pd

from hematovision.registry.paired import answers_frame, pair_answers

CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")


def cells(n_per_class: int = 15, images: int = 4, classes=CLASSES, prefix: str = "c") -> pd.DataFrame:
    """``n_per_class`` cells of each class, ``images`` augmented copies of each."""
    rows = [
        {"path": f"{cls}/{prefix}{j}_{i}.jpeg", "group": f"{cls}/{prefix}{j}", "label": cls}
        for cls in classes
        for j in range(n_per_class)
        for i in range(images)
    ]
    return pd.DataFrame(rows)


def answering(rows: pd.DataFrame, wrong: set[str], classes=CLASSES) -> pd.DataFrame:
    """A model's answers: right on every cell but those in ``wrong`` (all their images answered as the
    next class)."""
    predicted = [
        classes[(classes.index(label) + 1) % len(classes)] if group in wrong else label
        for label, group in zip(rows.label, rows.group)
    ]
    return answers_frame(rows, predicted)


def pair(rows, champion_wrong, challenger_wrong) -> dict[str, pd.DataFrame]:
    return {"val": pair_answers(answering(rows, set(champion_wrong)), answering(rows, set(challenger_wrong)))}


def groups(rows: pd.DataFrame, label: str, count: int, start: int = 0) -> list[str]:
    """``count`` cells of ``label``, from the ``start``-th on (in the order they were made)."""
    return list(dict.fromkeys(rows.group[rows.label == label]))[start : start + count]
