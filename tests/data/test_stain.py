"""Stain normalisation and augmentation (data/stain.py) on real cells of both laboratories."""

from __future__ import annotations

import numpy as np
import pytest

from hematovision.data import stain
from hematovision.data.augment import augment_crop
from hematovision.data.imaging import load_rgb
from hematovision.data.localize import crop_wbc
from hematovision.model.classifier import Classifier, ClassifierConfig

from conftest import BLOOD_CELLS, PBC

SIZE = 96


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    """Two real crops from the training laboratory and two from the second one."""
    paths = sorted((BLOOD_CELLS / "TRAIN" / "MONOCYTE").iterdir())[:2] + sorted((PBC / "neutrophil").iterdir())[:2]
    return np.stack([crop_wbc(load_rgb(p), SIZE) for p in paths]).astype(np.float32)


def test_an_unknown_method_is_a_clear_error(crops):
    with pytest.raises(ValueError, match="unknown stain normalisation 'reinhard'.*grey"):
        stain.normalise(crops, "reinhard")


@pytest.mark.parametrize("method", stain.METHODS)
def test_every_normalisation_is_deterministic_and_keeps_the_crop_shape(crops, method):
    first, second = stain.normalise(crops, method), stain.normalise(crops.copy(), method)
    assert first.shape == crops.shape and first.dtype == np.float32
    assert np.array_equal(first, second)  # serving gets the pixels training got
    assert 0.0 <= first.min() and first.max() <= 255.0
    assert stain.normalise(crops[:0], method).shape == (0, SIZE, SIZE, 3)


def test_none_is_the_crop_itself(crops):
    assert np.array_equal(stain.normalise(crops, "none"), crops)


def test_grey_keeps_the_brightness_and_drops_the_colour(crops):
    grey = stain.normalise(crops, "grey")
    assert np.array_equal(grey[..., 0], grey[..., 1]) and np.array_equal(grey[..., 1], grey[..., 2])
    assert grey.mean() == pytest.approx((crops @ np.array([0.299, 0.587, 0.114])).mean(), rel=1e-4)


def test_white_balance_takes_out_the_colour_of_the_light(crops):
    """The same cells under a greener, dimmer light normalise to (nearly) the same crop. (Gains below 1:
    the second laboratory's background already saturates red, and a clipped channel has lost the
    information a balance needs.)"""
    tinted = crops * np.array([0.85, 1.0, 0.75], np.float32)
    balanced, balanced_tinted = stain.normalise(crops, "white_balance"), stain.normalise(tinted, "white_balance")
    assert np.abs(balanced - balanced_tinted).mean() < 0.1 * np.abs(crops - tinted).mean()
    # ... while the two laboratories' backgrounds, far apart before, are both neutral after.
    before = stain.background_colours(crops)
    after = stain.background_colours(stain.normalise(crops, "white_balance"))
    assert np.ptp(before, axis=1).max() > 20
    assert np.abs(after - 235.0).max() < 3.0


def test_macenko_reads_a_darker_staining_as_the_same_stain(crops):
    """Twice the stain (optical density x 1.4, as a longer staining time) normalises to nearly the
    crop the normal staining gives: each stain's amount is scaled to the reference's. Not exactly:
    the darker crop has more pixels above the background cut, and they vote on the directions too;
    measured, about 70% of the difference goes."""
    darker = stain.from_optical_density(stain.to_optical_density(crops) * 1.4)
    normal, dark = stain.normalise(crops, "macenko"), stain.normalise(darker, "macenko")
    assert np.abs(normal - dark).mean() < 0.4 * np.abs(crops - darker).mean()


def test_the_optical_density_round_trip_is_exact(crops):
    back = stain.from_optical_density(stain.to_optical_density(crops))
    assert np.abs(back - crops).max() < 1e-2


def test_stain_jitter_is_invertible_and_zero_jitter_is_the_identity(crops):
    crop = crops[2]
    same = np.asarray(stain.jitter_stains(crop, 0.0, scale=np.ones(3, np.float32), shift=np.zeros(3, np.float32)))
    assert np.abs(same - crop).max() < 0.05
    scale, shift = np.array([1.1, 0.9, 1.05], np.float32), np.array([0.02, -0.03, 0.01], np.float32)
    varied = np.asarray(stain.jitter_stains(crop, 0.1, scale=scale, shift=shift))
    back = np.asarray(stain.jitter_stains(varied, 0.0, scale=1 / scale, shift=-shift / scale))
    inside = ((varied > 0.5) & (varied < 254.5)).all(axis=-1)  # clipping is where it cannot be undone
    assert inside.mean() > 0.9
    assert np.abs(back - crop)[inside].max() < 0.5
    assert np.abs(varied - crop).mean() > 2.0


def test_random_stain_jitter_varies_the_stain_within_range(crops):
    import tensorflow as tf

    tf.random.set_seed(1)
    outs = [np.asarray(augment_crop(crops[0], colour_jitter=0.0, stain_jitter=0.2)) for _ in range(4)]
    assert all(out.shape == crops[0].shape and 0 <= out.min() and out.max() <= 255 for out in outs)
    # Geometry aside (flips and turns keep the colour histogram), each draw stains differently.
    means = [out.reshape(-1, 3).mean(axis=0) for out in outs]
    assert min(np.abs(a - b).max() for i, a in enumerate(means) for b in means[i + 1 :]) > 0.5


def test_a_classifier_normalises_before_its_backbone_and_remembers_how(crops, tmp_path):
    plain = Classifier.new(ClassifierConfig(image_size=SIZE))
    grey = Classifier(plain.keras_model, ClassifierConfig(image_size=SIZE, stain="grey"))
    assert np.allclose(grey.embed(crops), plain.embed(stain.normalise(crops, "grey")), atol=1e-5)
    assert not np.allclose(grey.embed(crops), plain.embed(crops), atol=1e-3)
    assert grey.backbone_fingerprint() != plain.backbone_fingerprint()  # no cached embedding is shared
    assert Classifier.load(grey.save(tmp_path / "grey")).config.stain == "grey"


def test_fine_tuning_sees_crops_stain_jittered_then_normalised_as_the_classifier_does(crops):
    """The fine-tuning stream must feed the network what Classifier.embed feeds it: a grey model's
    batches are grey whatever the stain jitter did to the raw crop before."""
    import tensorflow as tf

    from hematovision.params import Params
    from hematovision.training.train import _finetune_dataset

    params = Params()
    params.model.stain, params.train.stain_jitter, params.train.batch_size = "grey", 0.2, 4
    batch, labels = next(
        iter(_finetune_dataset(crops.astype(np.uint8), np.array([0, 1, 2, 3]), params, augment_crop, tf))
    )
    batch = batch.numpy()
    assert batch.shape == (4, SIZE, SIZE, 3) and len(labels) == 4
    assert np.allclose(batch[..., 0], batch[..., 1]) and np.allclose(batch[..., 1], batch[..., 2])
    params.model.stain = "none"  # ... and a model without normalisation gets the jittered colours
    batch, _ = next(iter(_finetune_dataset(crops.astype(np.uint8), np.array([0, 1, 2, 3]), params, augment_crop, tf)))
    assert not np.allclose(batch.numpy()[..., 0], batch.numpy()[..., 2])
