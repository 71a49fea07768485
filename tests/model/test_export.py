"""The int8 export answers like the full model on real images, safely from concurrent threads.

The model is a tiny real one made here in seconds: the ImageNet EfficientNet-Lite0 backbone (from
the wheel) under a head fitted on real TRAIN crops, saved and loaded as a trained classifier is.
The export is calibrated on other TRAIN crops and compared on TEST images, a few per class.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from hematovision.model.classifier import Classifier, ClassifierConfig
from hematovision.model.export import INT8, INT8_FILE, Int8Classifier, export_int8, flavour_of

from conftest import BLOOD_CELLS, KAGGLE_CLASSES

pytestmark = pytest.mark.e2e  # converts and runs a real backbone: tens of seconds

IMAGE_SIZE = 128  # between the quick profile's 96 and the main job's 192 px
# The tolerance, from measurements (2026-11-29, 2 cores, 128 calibration crops for the main model):
# - the main job's model (192 px, fine-tuned, temperature-calibrated), 160 TEST images: the same top
#   class on 99.4%, the largest probability difference of an image 0.12 (95th percentile 0.055,
#   mean 0.017), accuracy 0.838 int8 vs 0.831 full;
# - this tiny model (ImageNet backbone, head fitted here), 32 TEST images: the same top class on
#   96.9%, largest difference 0.21, mean of each image's largest difference 0.051, embeddings'
#   cosine similarity >= 0.94 (mean 0.974), accuracy 0.594 int8 vs 0.625 full (one image).
# Full-integer quantisation moves each probability by a few hundredths and now and then one by up
# to ~0.2 (an image whose embedding sits where the head is steep), so a class changes only where
# two were nearly tied. The bounds leave room for that on a handful of images and still fail a
# broken export (wrong scales, shuffled or uniform answers: ~25% agreement, differences near 1).
MIN_SAME_TOP_CLASS = 0.90
MAX_MEAN_DIFFERENCE = 0.08  # mean over images of each image's largest probability difference
MAX_PROBABILITY_DIFFERENCE = 0.25  # any image, any class
MIN_EMBEDDING_COSINE = 0.90


def real_images(split: str, per_class: int, skip: int = 0) -> tuple[list[Path], np.ndarray]:
    paths, labels = [], []
    for index, name in enumerate(KAGGLE_CLASSES):
        files = sorted((BLOOD_CELLS / split / name).iterdir())[skip::23][:per_class]  # spread over the class
        paths += files
        labels += [index] * len(files)
    return paths, np.array(labels)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """ImageNet Lite0 under a head fitted on 24 real TRAIN crops per class, saved as training saves."""
    import keras

    keras.utils.set_random_seed(0)
    classifier = Classifier.new(ClassifierConfig(image_size=IMAGE_SIZE, tta_views=4))
    paths, labels = real_images("TRAIN", 24)
    embeddings = classifier.embed(classifier.crops(paths))
    # A gentle fit, as calibrated as the main model's answers are (its temperature softens them).
    classifier.head.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy")
    classifier.head.fit(embeddings, labels, epochs=40, batch_size=32, verbose=0)
    return classifier.save(tmp_path_factory.mktemp("tiny") / "classifier")


@pytest.fixture(scope="module")
def export(tiny_model) -> bytes:
    classifier = Classifier.load(tiny_model)
    calibration, _ = real_images("TRAIN", 16, skip=11)  # other TRAIN pictures than the head saw
    return export_int8(classifier, classifier.crops(calibration))


def test_the_export_answers_like_the_full_model_on_real_test_images(tiny_model, export):
    full = Classifier.load(tiny_model)
    int8 = Int8Classifier.from_classifier(full, export)
    assert flavour_of(int8) == INT8 and flavour_of(full) == "full"
    assert len(export) < 6_000_000  # int8 weights: ~4 MB for Lite0's ~3.4 M parameters (float: ~14 MB)
    paths, labels = real_images("TEST", 8)
    crops = full.crops(paths)
    expected, answered = full.predict_answers(crops), int8.predict_answers(crops)
    same_top = float((expected.probabilities.argmax(1) == answered.probabilities.argmax(1)).mean())
    differences = np.abs(expected.probabilities - answered.probabilities).max(axis=1)
    accuracy = [float((a.probabilities.argmax(1) == labels).mean()) for a in (expected, answered)]
    # The embeddings (what the prediction log and drift monitoring keep) are close too.
    cosine = (expected.embeddings * answered.embeddings).sum(1) / (
        np.linalg.norm(expected.embeddings, axis=1) * np.linalg.norm(answered.embeddings, axis=1)
    )
    summary = (
        f"same top class {same_top:.3f}, largest difference {differences.max():.3f} (mean {differences.mean():.3f}), "
        f"accuracy full/int8 {accuracy}, embedding cosine min {cosine.min():.3f}"
    )
    assert accuracy[0] > 0.4, (
        f"the tiny model must have learned something for the comparison to mean anything: {summary}"
    )
    assert same_top >= MIN_SAME_TOP_CLASS, summary
    assert differences.mean() <= MAX_MEAN_DIFFERENCE, summary
    assert differences.max() <= MAX_PROBABILITY_DIFFERENCE, summary
    assert cosine.min() >= MIN_EMBEDDING_COSINE, summary
    print(summary)
    # Cached apart from the full model's embeddings: one must never be handed the other's vectors.
    assert int8.backbone_fingerprint() != full.backbone_fingerprint()


def test_a_saved_classifier_folder_loads_with_its_export(tiny_model, export, tmp_path):
    from hematovision.registry.packaging import load_classifier

    (tiny_model / INT8_FILE).write_bytes(export)
    try:
        loaded = load_classifier(str(tiny_model), flavour=INT8)
    finally:
        (tiny_model / INT8_FILE).unlink()
    assert isinstance(loaded, Int8Classifier) and loaded.tflite_model == export
    with pytest.raises(ValueError, match="flavour must be one of"):
        load_classifier(str(tiny_model), flavour="fp16")


def test_concurrent_model_calls_each_get_their_own_interpreter_and_the_same_answers(tiny_model, export):
    """The service runs ``serving.model_calls`` model calls at once: one shared interpreter would
    mix their tensors (set_tensor/invoke/get_tensor are three calls), so each thread has its own."""
    int8 = Int8Classifier.from_classifier(Classifier.load(tiny_model), export)
    paths, _ = real_images("TEST", 3)
    crops = int8.crops(paths).astype(np.float32)
    batches = [crops[i : i + n] for i, n in ((0, 1), (1, 4), (5, 7), (0, 12))]  # shapes differ: resizes too
    expected = [int8.run_backbone(batch) for batch in batches]
    results: dict[tuple[int, int], np.ndarray] = {}
    interpreters: set[int] = set()
    start = threading.Barrier(4)

    def call(worker: int) -> None:
        start.wait()
        for round_ in range(3):
            for index, batch in enumerate(batches):
                results[(worker, round_ * 10 + index)] = int8.run_backbone(batch)
        interpreters.add(id(int8._interpreter()[0]))

    threads = [threading.Thread(target=call, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 * 3 * len(batches)
    for (_, key), vectors in results.items():
        np.testing.assert_allclose(vectors, expected[key % 10], rtol=0, atol=1e-5)
    assert len(interpreters) == 4
