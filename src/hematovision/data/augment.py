"""Training-time augmentation of white-cell crops: geometry and stain/colour variation.

The blood-cells dataset already holds rotated/shifted copies of each cell, so the geometric part is
light (flips and quarter turns, which a cell on a slide has no preferred orientation for). Colour is
where labs differ: stain batches, scanners and white balance move hue, saturation and the balance
of the channels, so those are jittered per image.
"""

from __future__ import annotations

from hematovision.data.stain import jitter_stains


def augment_crop(image, colour_jitter: float, seed=None, crop_jitter: float = 0.0, stain_jitter: float = 0.0):
    """One random variant of a (H, W, 3) float32 crop in 0..255 (a tf.data map function).

    ``stain_jitter`` > 0 first varies the amount of each stain in optical density
    (:func:`hematovision.data.stain.jitter_stains`): another laboratory's staining, not just another
    light.

    ``crop_jitter`` > 0 cuts a random square of (1 - crop_jitter .. 1) x the side out of the crop
    and scales it back: the cell a little larger and off-centre, as when the localiser's box lands
    differently on a rotated or shifted copy (TEST holds many such copies)."""
    import tensorflow as tf

    if stain_jitter > 0:
        image = jitter_stains(image, stain_jitter)
    if crop_jitter > 0:
        side = tf.random.uniform([], 1.0 - crop_jitter, 1.0)
        y0, x0 = tf.random.uniform([], 0.0, 1.0 - side), tf.random.uniform([], 0.0, 1.0 - side)
        size = tf.shape(image)[:2]
        image = tf.image.crop_and_resize(image[None], [[y0, x0, y0 + side, x0 + side]], [0], size)[0]
    image = tf.image.random_flip_left_right(image)
    image = tf.image.random_flip_up_down(image)
    image = tf.image.rot90(image, k=tf.random.uniform([], 0, 4, dtype=tf.int32))
    if colour_jitter <= 0:
        return image
    j = colour_jitter
    x = image / 255.0
    x = tf.image.random_hue(x, max_delta=min(0.5, j / 2))
    x = tf.image.random_saturation(x, 1 - 2 * j, 1 + 2 * j)
    x = tf.image.random_brightness(x, max_delta=j)
    x = tf.image.random_contrast(x, 1 - 2 * j, 1 + 2 * j)
    # Per-channel gain: the shift in red/blue balance between stain batches and light sources.
    x = x * tf.random.uniform([1, 1, 3], 1 - j, 1 + j)
    return tf.clip_by_value(x, 0.0, 1.0) * 255.0
