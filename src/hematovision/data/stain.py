"""Stain: how a laboratory's Romanowsky/Giemsa stain, scanner and light colour a cell, and how the
platform takes that difference out (normalisation, at training and serving alike) or trains through
it (augmentation, while fine-tuning).

Crops are (N, H, W, 3) float32 arrays in 0..255, as the backbone takes them.

Normalisations (``model.stain``), each a fixed function of one crop, so a crop gets the same pixels
at serving time as it got at training time:

* ``none``: the crop as it is.
* ``grey``: luminance only, in all three channels. Throws colour away: what stays is what a stain
  cannot move much between laboratories (shape, texture, how dark the nucleus is against the
  cytoplasm), at the price of the colour cues (an eosinophil's orange granules).
* ``white_balance``: each channel scaled so the crop's background (its brightest pixels: plasma
  between the cells) becomes neutral grey; corrects the light and the scanner's white balance.
* ``macenko``: Macenko et al. (2009). The two dominant stain directions in optical density, found per
  crop, are mapped onto a fixed reference pair, and each stain's amount is scaled so its 99th
  percentile matches the reference's (the nucleus stain of one laboratory reads as the other's).

Augmentation (``train.stain_jitter``): in optical density the stains add up (Beer-Lambert), so the
density is split into haematoxylin-, eosin- and residual-like components with a fixed matrix (Ruifrok
and Johnston, 2001), each component scaled and shifted at random, and put back (Tellez et al.,
2018). With no scaling and no shift it returns the crop (the transform is exactly invertible).
"""

from __future__ import annotations

import numpy as np

METHODS = ("none", "grey", "white_balance", "macenko")

# Optical density of a pixel: -ln((value + 1) / 256), so 255 is 0 and 0 is ln(256); never infinite.
_OD_OFFSET = 1.0
_OD_SCALE = 256.0
# Luminance weights (ITU-R BT.601).
_LUMINANCE = np.array([0.299, 0.587, 0.114], np.float32)
# white_balance: the background is the median colour of the brightest share of pixels, mapped to this.
_BACKGROUND_SHARE = 0.3
_NEUTRAL_BACKGROUND = 235.0
# macenko: the reference stain directions (columns, RGB optical density) and 99th-percentile amounts,
# Macenko's published reference; pixels with optical density below _MACENKO_BETA in any channel are
# background and do not vote on the stain directions; the angle percentiles ignore outliers.
_MACENKO_REFERENCE = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]], np.float32)
_MACENKO_MAX_AMOUNT = np.array([1.9705, 1.0308], np.float32)
_MACENKO_BETA = 0.15
_MACENKO_ALPHA = 1.0
_MACENKO_MIN_PIXELS = 50  # fewer stained pixels (an empty crop): left as it is
# Stain augmentation: haematoxylin, eosin and DAB-like (residual) directions in RGB optical density.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], np.float32)
RGB_FROM_HED = RGB_FROM_HED / np.linalg.norm(RGB_FROM_HED, axis=1, keepdims=True)
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED).astype(np.float32)


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"unknown stain normalisation {method!r} (known: {', '.join(METHODS)})")
    return method


def normalise(crops: np.ndarray, method: str) -> np.ndarray:
    """``crops`` (N, H, W, 3; 0..255) under the stain normalisation ``method`` (float32, 0..255)."""
    check_method(method)
    crops = np.asarray(crops, np.float32)
    if method == "none" or not len(crops):
        return crops
    if method == "grey":
        return np.repeat((crops @ _LUMINANCE)[..., None], 3, axis=-1)
    if method == "white_balance":
        return np.clip(crops * (_NEUTRAL_BACKGROUND / background_colours(crops))[:, None, None, :], 0.0, 255.0)
    return np.stack([_macenko(crop) for crop in crops])


def background_colours(crops: np.ndarray) -> np.ndarray:
    """(N, 3): each crop's background colour, the median of its brightest pixels (at least 1)."""
    flat = crops.reshape(len(crops), -1, 3)
    luminance = flat @ _LUMINANCE
    cut = np.quantile(luminance, 1.0 - _BACKGROUND_SHARE, axis=1)
    colours = np.stack([np.median(pixels[lum >= c], axis=0) for pixels, lum, c in zip(flat, luminance, cut)])
    return np.maximum(colours, 1.0)


def to_optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log((np.asarray(rgb, np.float32) + _OD_OFFSET) / _OD_SCALE)


def from_optical_density(density: np.ndarray) -> np.ndarray:
    return np.clip(_OD_SCALE * np.exp(-density) - _OD_OFFSET, 0.0, 255.0).astype(np.float32)


def _macenko(crop: np.ndarray) -> np.ndarray:
    density = to_optical_density(crop).reshape(-1, 3)
    stained = density[(density > _MACENKO_BETA).all(axis=1)]
    if len(stained) < _MACENKO_MIN_PIXELS:
        return crop
    # The plane of the two largest eigenvectors holds the stains; the extreme angles in it are they.
    _, vectors = np.linalg.eigh(np.cov(stained.T))
    plane = vectors[:, [1, 2]]
    projected = stained @ plane
    angles = np.arctan2(projected[:, 1], projected[:, 0])
    low, high = np.percentile(angles, _MACENKO_ALPHA), np.percentile(angles, 100 - _MACENKO_ALPHA)
    first = plane @ np.array([np.cos(low), np.sin(low)])
    second = plane @ np.array([np.cos(high), np.sin(high)])
    # Haematoxylin-like first (more red absorbed), each direction pointing into positive density.
    stains = np.stack([first, second] if first[0] > second[0] else [second, first], axis=1)
    stains = stains * np.where(stains.sum(axis=0) < 0, -1.0, 1.0)
    amounts = np.linalg.lstsq(stains, density.T, rcond=None)[0]
    peak = np.maximum(np.percentile(amounts, 99, axis=1), 1e-6)
    amounts = amounts * (_MACENKO_MAX_AMOUNT / peak)[:, None]
    return from_optical_density((_MACENKO_REFERENCE @ amounts).T.reshape(crop.shape))


def jitter_stains(image, strength: float, scale=None, shift=None):
    """One random stain variant of a (H, W, 3) float32 crop in 0..255 (a tf.data map function):
    each stain component's optical density times U(1 - strength, 1 + strength) plus
    U(-strength, strength). ``scale``/``shift`` (3 values each) replace the random draw (tests)."""
    import tensorflow as tf

    if scale is None:
        scale = tf.random.uniform([3], 1.0 - strength, 1.0 + strength)
    if shift is None:
        shift = tf.random.uniform([3], -strength, strength)
    density = -tf.math.log((tf.cast(image, tf.float32) + _OD_OFFSET) / _OD_SCALE)
    amounts = tf.tensordot(density, tf.constant(HED_FROM_RGB), 1) * scale + shift
    density = tf.tensordot(amounts, tf.constant(RGB_FROM_HED), 1)
    return tf.clip_by_value(_OD_SCALE * tf.exp(-density) - _OD_OFFSET, 0.0, 255.0)
