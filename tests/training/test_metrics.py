"""Metrics that count cells, not augmented copies."""

import numpy as np

from hematovision.training.metrics import classification_metrics, flatten_for_mlflow

CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")


def one_hot(labels, confidence=0.9):
    p = np.full((len(labels), 4), (1 - confidence) / 3)
    p[np.arange(len(labels)), labels] = confidence
    return p


def test_cell_accuracy_votes_over_a_cells_images():
    # Cell A (monocyte): 2 of 3 images right -> the cell is right. Cell B (lymphocyte): 1 of 3 -> wrong.
    y_true = [2, 2, 2, 1, 1, 1]
    predicted = [2, 2, 3, 1, 0, 0]
    m = classification_metrics(y_true, one_hot(predicted), CLASSES, ["A", "A", "A", "B", "B", "B"], 200)
    assert m["accuracy"] == 0.5
    assert m["n_cells"] == 2
    assert m["cell_accuracy"] == 0.5
    assert m["confusion_matrix"][1][0] == 2


def test_interval_reflects_the_number_of_cells_not_images():
    rng = np.random.default_rng(0)
    y_true = np.repeat(rng.integers(0, 4, 10), 50)  # 10 cells, 50 copies each
    right = np.repeat(rng.random(10) < 0.7, 50)
    y_pred = np.where(right, y_true, (y_true + 1) % 4)
    m = classification_metrics(y_true, one_hot(y_pred), CLASSES, np.repeat([f"c{i}" for i in range(10)], 50), 500)
    low, high = m["accuracy_ci95"]
    # 500 images would give a ~±4-point interval; 10 cells give a far wider one.
    assert high - low > 0.3
    assert low <= m["accuracy"] <= high


def test_without_groups_there_is_no_cell_level_claim():
    m = classification_metrics([0, 1, 2, 3], one_hot([0, 1, 2, 0]), CLASSES)
    assert "cell_accuracy" not in m
    assert m["per_class"]["neutrophil"]["recall"] == 0.0
    flat = flatten_for_mlflow(m, "test")
    assert flat["test_accuracy"] == 0.75 and "test_f1_monocyte" in flat


def test_a_perfect_score_on_few_cells_still_has_an_honest_interval():
    y = np.repeat([0, 1, 2, 3], 5)
    m = classification_metrics(y, one_hot(y), CLASSES, np.repeat([f"c{i}" for i in range(4)], 5), 200)
    assert m["cell_accuracy"] == 1.0
    low, high = m["cell_accuracy_ci95"]
    assert high == 1.0 and 0.4 < low < 0.6  # 4 of 4 cells: Wilson lower bound ~0.51
