"""Grad-CAM (Selvaraju et al., 2017): where in the white-cell crop the classifier looked.

The class score is differentiated with respect to the backbone's last feature map
(`backbone.FEATURE_LAYER`); each channel is weighted by its spatially averaged gradient, and the
ReLU of the weighted sum is the heat-map. It is as coarse as that map (stride 32: 5x5 at
``image_size`` 160) and is drawn over the crop box on the whole input image, so a reviewer sees
both which cell was classified and which part of it drove the answer.
"""

from __future__ import annotations

import io
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from hematovision.data import stain
from hematovision.data.imaging import load_rgb
from hematovision.data.localize import WbcBox, crop_wbc, locate_wbc
from hematovision.model.classifier import Classifier

# Blend weight of the colour map: cold areas keep most of the cell visible, hot areas turn red.
_MIN_ALPHA, _MAX_ALPHA = 0.25, 0.6
_OUTLINE = (255, 255, 255)

# One traced gradient function per classifier; weak keys so a hot-swapped model is freed.
_functions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_build_lock = threading.Lock()


@dataclass(frozen=True)
class Explanation:
    png: bytes  # heat-map over the crop box of the whole input image, at its original size
    label: str  # predicted class (the same answer as /predict, test-time views included)
    class_index: int  # the class explained
    probabilities: dict[str, float]
    box: tuple[float, float, float, bool]  # cx, cy, side, found (input-pixel coordinates)


def _gradient_function(classifier: Classifier):
    """(crop batch of 1, class index or -1) -> (heat-map in 0..1, class index, probabilities), traced once."""
    import keras
    import tensorflow as tf

    from hematovision.model.backbone import FEATURE_LAYER  # imports keras: only once a model exists

    backbone, head = classifier.backbone, classifier.head
    # The backbone is a nested model: re-wire it to also expose its feature map.
    features = keras.Model(backbone.input, [backbone.get_layer(FEATURE_LAYER).output, backbone.output])
    *hidden, last = head.layers
    # The pre-softmax logit, as in the paper: a saturated probability has a vanishing gradient.
    use_logit = isinstance(last, keras.layers.Dense) and last.activation is keras.activations.softmax
    size = classifier.config.image_size

    @tf.function(input_signature=[tf.TensorSpec((1, size, size, 3), tf.float32), tf.TensorSpec((), tf.int32)])
    def run(crop, class_index):
        with tf.GradientTape() as tape:
            # The backbone is frozen, so nothing is watched unless the input is.
            tape.watch(crop)
            feature_map, embedding = features(crop, training=False)
            probabilities = head(embedding, training=False)
            x = embedding
            for layer in hidden:
                x = layer(x, training=False)
            scores = tf.matmul(x, last.kernel) + last.bias if use_logit else probabilities
            # -1 asks for the predicted class, so choosing it costs no second forward pass.
            class_index = tf.where(class_index < 0, tf.argmax(scores[0], output_type=tf.int32), class_index)
            score = scores[0, class_index]
        weights = tf.reduce_mean(tape.gradient(score, feature_map)[0], axis=(0, 1))
        cam = tf.nn.relu(tf.reduce_sum(feature_map[0] * weights, axis=-1))
        return tf.math.divide_no_nan(cam, tf.reduce_max(cam)), class_index, probabilities[0]

    return run


def gradcam(classifier: Classifier, crop: np.ndarray, class_index: int | None = None):
    """Heat-map (h, w) float32 in 0..1 for ``class_index`` (None: the predicted class) on one crop.

    Returns ``(heatmap, class_index, probabilities)``; the probabilities are those of this single
    view, without the classifier's test-time views. Safe to call from several threads.
    """
    size = classifier.config.image_size
    if crop.shape != (size, size, 3):
        raise ValueError(f"expected a ({size}, {size}, 3) crop, got {crop.shape}")
    with _build_lock:
        run = _functions.get(classifier)
        if run is None:
            run = _functions[classifier] = _gradient_function(classifier)
    if class_index is not None and not 0 <= class_index < len(classifier.classes):
        raise ValueError(f"class_index must be in 0..{len(classifier.classes) - 1}, got {class_index}")
    requested = np.int32(-1 if class_index is None else class_index)
    # The network sees the crop as Classifier.embed hands it over: stain-normalised.
    prepared = stain.normalise(crop[None].astype(np.float32), classifier.config.stain)
    heatmap, used, probabilities = run(prepared, requested)
    return np.asarray(heatmap, np.float32), int(used), np.asarray(probabilities)


def _resize(heatmap: np.ndarray, width: int, height: int) -> np.ndarray:
    image = Image.fromarray(heatmap.astype(np.float32), "F")
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


def _jet(heat: np.ndarray) -> np.ndarray:
    """Blue -> cyan -> yellow -> red, the usual Grad-CAM colours (piecewise-linear jet)."""
    return np.clip(1.5 - np.abs(4 * heat[..., None] - np.array([3.0, 2.0, 1.0])), 0, 1) * 255


def _blend(rgb: np.ndarray, heat: np.ndarray) -> np.ndarray:
    heat = np.clip(heat, 0, 1)
    alpha = (_MIN_ALPHA + (_MAX_ALPHA - _MIN_ALPHA) * heat)[..., None]
    return np.rint(rgb * (1 - alpha) + _jet(heat) * alpha).astype(np.uint8)


def overlay_crop(crop: np.ndarray, heatmap: np.ndarray) -> np.ndarray:
    """The heat-map blended over the crop it was computed on (uint8, the crop's shape)."""
    return _blend(crop, _resize(heatmap, crop.shape[1], crop.shape[0]))


def box_bounds(box: WbcBox) -> tuple[int, int, int]:
    """(x0, y0, side) in whole pixels, rounded as `localize.crop_box` cuts the crop."""
    side = max(1, int(round(box.side)))
    return int(round(box.cx - side / 2)), int(round(box.cy - side / 2)), side


def overlay_image(rgb: np.ndarray, box: WbcBox, heatmap: np.ndarray) -> np.ndarray:
    """The heat-map over ``box`` on the whole image, the box outlined; pixels outside it unchanged.
    The box may reach beyond the frame (a cell at the edge): only its visible part is drawn."""
    height, width = rgb.shape[:2]
    x0, y0, side = box_bounds(box)
    heat = _resize(heatmap, side, side)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x0 + side, width), min(y0 + side, height)
    out = rgb.copy()
    if sx1 > sx0 and sy1 > sy0:
        out[sy0:sy1, sx0:sx1] = _blend(rgb[sy0:sy1, sx0:sx1], heat[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0])
    image = Image.fromarray(out)
    # Drawn inward from the box's edge, so the outline too stays inside the box.
    ImageDraw.Draw(image).rectangle(
        (x0, y0, x0 + side - 1, y0 + side - 1), outline=_OUTLINE, width=max(1, min(width, height) // 160)
    )
    return np.asarray(image)


def explain_image(classifier: Classifier, data: bytes | str | Path, class_index: int | None = None) -> Explanation:
    """Decode, locate and classify the white cell as prediction does, and render its Grad-CAM.

    Raises `hematovision.data.imaging.ImageError` for an input that is not a usable image.
    """
    rgb = np.asarray(load_rgb(data))
    box = locate_wbc(rgb)
    # crop_wbc locates again (cheap) so the crop is exactly the one prediction classifies.
    crop = crop_wbc(rgb, classifier.config.image_size)
    # Label and probabilities with the test-time views, so they agree with /predict.
    probabilities = classifier.predict_crops(crop[None])[0]
    predicted = int(np.argmax(probabilities))
    heatmap, class_index, _ = gradcam(classifier, crop, predicted if class_index is None else class_index)
    buffer = io.BytesIO()
    Image.fromarray(overlay_image(rgb, box, heatmap)).save(buffer, format="PNG")
    return Explanation(
        png=buffer.getvalue(),
        label=classifier.classes[predicted],
        class_index=class_index,
        probabilities={name: float(p) for name, p in zip(classifier.classes, probabilities)},
        box=(box.cx, box.cy, box.side, box.found),
    )
