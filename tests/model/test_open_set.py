"""The open set and temperature (model/open_set.py) on made-up embeddings whose answers are known:
four tight classes in 32 dimensions, and cells of a fifth type far from all of them."""

from __future__ import annotations

import numpy as np
import pytest

from hematovision.model.open_set import (
    UNKNOWN,
    OpenSet,
    expected_calibration_error,
    fit_temperature,
    temperature_scaled,
)

CLASSES = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
DIM = 32


def cells(rng, centre: np.ndarray, n: int, spread: float = 1.0) -> np.ndarray:
    return centre + rng.normal(0, spread, (n, DIM))


@pytest.fixture
def world():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 6, (5, DIM))  # the fifth is a type the model never saw
    train = np.concatenate([cells(rng, centres[i], 200) for i in range(4)])
    labels = np.repeat(np.arange(4), 200)
    val = np.concatenate([cells(rng, centres[i], 100) for i in range(4)])
    val_labels = np.repeat(np.arange(4), 100)
    return rng, centres, train, labels, val, val_labels


def confident_probabilities(labels: np.ndarray, right: float, rng) -> np.ndarray:
    """Softmax outputs that always claim 0.99 but are right only ``right`` of the time."""
    probabilities = np.full((len(labels), 4), 0.01 / 3)
    answer = np.where(rng.random(len(labels)) < right, labels, (labels + 1) % 4)
    probabilities[np.arange(len(labels)), answer] = 0.99
    return probabilities


def test_a_type_the_model_never_saw_is_beyond_the_threshold_and_known_cells_are_not(world):
    rng, centres, train, labels, val, val_labels = world
    open_set = OpenSet.fit(train, labels, CLASSES)
    open_set.calibrate(val, confident_probabilities(val_labels, 0.9, rng), val_labels, known_quantile=0.95)
    fresh_known = np.concatenate([cells(rng, centres[i], 100) for i in range(4)])
    stranger = cells(rng, centres[4], 100)
    assert open_set.unknown(open_set.score(fresh_known)).mean() <= 0.10
    assert open_set.unknown(open_set.score(stranger)).mean() >= 0.95
    # the threshold is the validation quantile: about 5% of validation cells fall beyond it
    assert open_set.unknown(open_set.score(val)).mean() == pytest.approx(0.05, abs=0.01)


def test_adding_corrections_of_a_new_type_makes_it_familiar_and_keeps_the_old_statistics(world):
    rng, centres, train, labels, val, val_labels = world
    open_set = OpenSet.fit(train, labels, CLASSES)
    open_set.calibrate(val, confident_probabilities(val_labels, 0.9, rng), val_labels, known_quantile=0.95)
    extended = open_set.add(cells(rng, centres[4], 150), ["basophil"] * 150)
    assert extended.classes == [*CLASSES, "basophil"] and extended.counts[-1] == 150
    assert open_set.classes == CLASSES  # the parent's statistics are not changed in place
    basophils = cells(rng, centres[4], 100)
    assert extended.unknown(extended.score(basophils)).mean() <= 0.10
    # merging by sufficient statistics gives what fitting on everything at once gives
    everything = OpenSet.fit(
        np.concatenate([train, cells(np.random.default_rng(1), centres[4], 150)]),
        np.concatenate([labels, np.full(150, 4)]),
        [*CLASSES, "basophil"],
    )
    again = OpenSet.fit(train, labels, CLASSES).add(
        cells(np.random.default_rng(1), centres[4], 150), ["basophil"] * 150
    )
    np.testing.assert_allclose(again.means, everything.means, atol=1e-9)
    np.testing.assert_allclose(again.scatter, everything.scatter, rtol=1e-9, atol=1e-6)


def test_the_temperature_makes_overconfident_probabilities_honest(world):
    rng, *_, val_labels = world
    probabilities = confident_probabilities(val_labels, 0.7, rng)
    temperature = fit_temperature(probabilities, val_labels)
    assert temperature > 1.5  # claims of 0.99 that are right 70% of the time must be softened
    scaled = temperature_scaled(probabilities, temperature)
    assert expected_calibration_error(scaled, val_labels) < expected_calibration_error(probabilities, val_labels) / 3
    np.testing.assert_array_equal(scaled.argmax(axis=1), probabilities.argmax(axis=1))  # same answers
    np.testing.assert_allclose(scaled.sum(axis=1), 1.0)


def test_expected_calibration_error_of_a_perfectly_calibrated_and_an_overconfident_model():
    labels = np.zeros(10, int)
    honest = np.tile([0.8, 0.2], (10, 1))  # says 0.8, right in 8 of 10
    labels_honest = np.array([0] * 8 + [1] * 2)
    assert expected_calibration_error(honest, labels_honest) == pytest.approx(0.0)
    overconfident = np.tile([1.0, 0.0], (10, 1))
    assert expected_calibration_error(overconfident, np.array([0] * 5 + [1] * 5)) == pytest.approx(0.5)
    assert expected_calibration_error(overconfident, labels) == pytest.approx(0.0)


def test_saved_and_loaded_it_answers_the_same(world, tmp_path):
    rng, centres, train, labels, val, val_labels = world
    open_set = OpenSet.fit(train, labels, CLASSES)
    open_set.calibrate(val, confident_probabilities(val_labels, 0.8, rng), val_labels, known_quantile=0.9)
    open_set.save(tmp_path)
    loaded = OpenSet.load(tmp_path)
    probe = np.concatenate([val[:20], cells(rng, centres[4], 20)])
    np.testing.assert_allclose(loaded.score(probe), open_set.score(probe), rtol=1e-3)
    assert (loaded.threshold, loaded.temperature, loaded.classes) == (
        open_set.threshold,
        open_set.temperature,
        open_set.classes,
    )
    assert OpenSet.load(tmp_path / "nothing-here") is None  # a model saved before open sets: none


def test_answers_name_unknown_cells_and_keep_what_they_resemble():
    from hematovision.model.classifier import Answers

    answers = Answers(
        probabilities=np.array([[0.9, 0.1], [0.2, 0.8]]),
        embeddings=np.zeros((2, 3)),
        open_set_scores=np.array([1.0, 99.0]),
        unknown=np.array([False, True]),
    )
    assert answers.labels(["eosinophil", "lymphocyte"]) == ["eosinophil", UNKNOWN]
    assert answers.rows(slice(1, 2)).probabilities.tolist() == [[0.2, 0.8]]
