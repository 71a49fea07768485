"""Fine-tuning augmentation: geometry that a cell on a slide does not care about, plus crop jitter."""

from __future__ import annotations

import numpy as np

from hematovision.data.augment import augment_crop
from hematovision.model.classifier import dihedral_views


def _crop() -> np.ndarray:
    rng = np.random.default_rng(0)
    return (rng.random((32, 32, 3)) * 255).astype(np.float32)


def _is_a_dihedral_view(out: np.ndarray, crop: np.ndarray) -> bool:
    return any(np.allclose(out, view[0]) for view in dihedral_views(crop[None], 8))


def test_without_jitter_the_crop_is_only_flipped_or_turned():
    crop = _crop()
    for _ in range(8):
        assert _is_a_dihedral_view(np.asarray(augment_crop(crop, colour_jitter=0.0)), crop)


def test_crop_jitter_zooms_into_the_crop_and_keeps_its_size():
    import tensorflow as tf

    tf.random.set_seed(0)  # a draw of a side very close to 1 would look like no zoom at all
    crop = _crop()
    outs = [np.asarray(augment_crop(crop, colour_jitter=0.0, crop_jitter=0.5)) for _ in range(8)]
    assert all(out.shape == crop.shape for out in outs)
    assert not any(_is_a_dihedral_view(out, crop) for out in outs)
    assert all(0 <= out.min() and out.max() <= 255 for out in outs)
