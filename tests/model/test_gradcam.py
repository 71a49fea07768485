"""Grad-CAM on real smear images, with the real pretrained backbone and a seeded random head."""

from __future__ import annotations

import io
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from hematovision.data.imaging import ImageError, load_rgb
from hematovision.data.localize import WbcBox, locate_wbc
from hematovision.model import gradcam as gradcam_module
from hematovision.model.classifier import Classifier, ClassifierConfig
from hematovision.model.gradcam import box_bounds, explain_image, gradcam, overlay_crop

NEUTROPHILS = (
    Path(__file__).resolve().parents[2].parent / "shared/datasets/blood-cells/dataset2-master/images/TEST/NEUTROPHIL"
)
SIZE = 96


@pytest.fixture(scope="module")
def images() -> list[Path]:
    files = sorted(NEUTROPHILS.glob("*.jpeg"))[:2]
    assert len(files) == 2, f"test images missing under {NEUTROPHILS}"
    return files


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    import keras

    keras.utils.set_random_seed(0)  # the head is random: fix it so the maps are reproducible
    return Classifier.new(ClassifierConfig(image_size=SIZE))


@pytest.fixture(scope="module")
def crop(classifier, images) -> np.ndarray:
    return classifier.crops([images[0]])[0]


def png_pixels(png: bytes) -> np.ndarray:
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG"
    return np.asarray(image.convert("RGB"))


def outside(arr: np.ndarray, box: tuple) -> np.ndarray:
    """Mask of the pixels outside the crop box."""
    x0, y0, side = box_bounds(WbcBox(box[0], box[1], box[2], box[3], 0.0))
    mask = np.ones(arr.shape[:2], bool)
    mask[max(y0, 0) : max(y0 + side, 0), max(x0, 0) : max(x0 + side, 0)] = False
    return mask


def test_heatmap_is_a_normalised_map_of_the_predicted_class(classifier, crop):
    heatmap, index, probabilities = gradcam(classifier, crop)
    assert heatmap.dtype == np.float32 and heatmap.shape == (SIZE // 32, SIZE // 32)  # stride-32 feature map
    assert heatmap.min() >= 0 and heatmap.max() == pytest.approx(1.0)
    assert np.ptp(heatmap) > 0.1
    assert index == int(np.argmax(probabilities))
    np.testing.assert_allclose(probabilities, classifier.predict_crops(crop[None], views=1)[0], atol=1e-5)


def test_heatmap_is_the_class_activation_map_of_the_logit(classifier, crop):
    """With a linear head on global pooling, Grad-CAM of the logit equals CAM (Zhou et al.):
    ReLU(feature map . class weights). Differentiating the probability instead would not match."""
    import keras

    backbone = classifier.backbone
    features = keras.Model(backbone.input, backbone.get_layer("head_activation").output)
    feature_map = np.asarray(features(crop[None].astype(np.float32)))[0]
    kernel = np.asarray(classifier.head.layers[-1].kernel)
    for index in range(len(classifier.classes)):
        cam = np.maximum(feature_map @ kernel[:, index], 0)
        expected = cam / cam.max() if cam.max() > 0 else cam
        np.testing.assert_allclose(gradcam(classifier, crop, index)[0], expected, atol=1e-4)


def test_the_requested_class_is_explained(classifier, crop):
    predicted, index, probabilities = gradcam(classifier, crop)
    other = int(np.argmin(probabilities))
    heatmap, used, _ = gradcam(classifier, crop, other)
    assert used == other != index
    assert not np.allclose(heatmap, predicted, atol=0.05)


def test_bad_arguments_are_refused(classifier, crop):
    with pytest.raises(ValueError, match="crop"):
        gradcam(classifier, crop[:-1])
    with pytest.raises(ValueError, match="class_index"):
        gradcam(classifier, crop, len(classifier.classes))
    with pytest.raises(ImageError) as error:
        explain_image(classifier, b"this is not an image")
    assert error.value.code == "not_an_image"


def test_explanation_draws_the_heat_inside_the_crop_box_only(classifier, images):
    for path in images:
        original = np.asarray(load_rgb(path))
        explanation = explain_image(classifier, path.read_bytes())
        drawn = png_pixels(explanation.png)
        assert drawn.shape == original.shape
        assert explanation.box[3], "the test image's nucleus should be found"
        out = outside(original, explanation.box)
        assert out.any() and (~out).any()
        np.testing.assert_array_equal(drawn[out], original[out])
        assert np.abs(drawn[~out].astype(int) - original[~out]).mean() > 10


def test_explanation_agrees_with_prediction_including_test_time_views(classifier, images):
    tta = Classifier(classifier.keras_model, ClassifierConfig(image_size=SIZE, tta_views=4))
    expected = tta.predict_images([images[0]])[0]
    single_view = classifier.predict_images([images[0]])[0]
    assert not np.allclose(expected, single_view, atol=1e-4)  # else this test would prove nothing
    explanation = explain_image(tta, images[0])
    assert list(explanation.probabilities) == tta.classes
    np.testing.assert_allclose(list(explanation.probabilities.values()), expected, atol=1e-5)
    assert explanation.label == tta.classes[int(np.argmax(expected))]
    assert explanation.class_index == int(np.argmax(expected))

    other = int(np.argmin(expected))
    explained_other = explain_image(tta, images[0], other)
    assert explained_other.class_index == other and explained_other.label == explanation.label
    assert explained_other.png != explanation.png


def test_a_box_reaching_beyond_the_frame_is_drawn_clipped(classifier, images):
    original = np.asarray(load_rgb(images[0]))
    box = locate_wbc(original)
    # Cut the frame just left of the nucleus: the cell stays whole, its crop box does not.
    nucleus_half = box.side / 1.9 / 2
    edge = np.ascontiguousarray(original[:, int(box.cx - nucleus_half - 5) :])
    buffer = io.BytesIO()
    Image.fromarray(edge).save(buffer, format="PNG")
    explanation = explain_image(classifier, buffer.getvalue())
    x0, _, _ = box_bounds(WbcBox(*explanation.box, 0.0))
    assert explanation.box[3] and x0 < 0, "precondition: the crop box must reach beyond the left edge"
    drawn = png_pixels(explanation.png)
    assert drawn.shape == edge.shape
    out = outside(edge, explanation.box)
    np.testing.assert_array_equal(drawn[out], edge[out])
    assert np.abs(drawn[~out].astype(int) - edge[~out]).mean() > 10


def test_crop_overlay_has_the_crop_shape_and_follows_the_heat(crop):
    heatmap = np.zeros((3, 3), np.float32)
    heatmap[0, 0] = 1.0
    drawn = overlay_crop(crop, heatmap).astype(int)
    assert drawn.shape == crop.shape
    hot, cold = drawn[:8, :8], drawn[-8:, -8:]
    assert (hot[..., 0] - hot[..., 2]).mean() > (cold[..., 0] - cold[..., 2]).mean() + 50  # red vs blue


def test_threads_share_one_traced_function_and_get_the_same_maps(classifier, crop):
    expected = [gradcam(classifier, crop, index)[0] for index in range(len(classifier.classes))]
    traced = gradcam_module._functions[classifier]
    results: dict[int, np.ndarray] = {}

    def work(index: int) -> None:
        results[index] = gradcam(classifier, crop, index)[0]

    threads = [threading.Thread(target=work, args=(index,)) for index in range(len(expected))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert gradcam_module._functions[classifier] is traced
    for index, heatmap in enumerate(expected):
        np.testing.assert_allclose(results[index], heatmap, atol=1e-5)
