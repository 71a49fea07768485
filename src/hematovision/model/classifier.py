"""The classifier: locate the white cell, crop, embed with the backbone, classify with the head.

This is the one prediction path: training, evaluation, the CLI, the MLflow pyfunc and the BentoML
service all call :class:`Classifier`. The Keras graph is ``crop (0..255) -> backbone -> head``;
the backbone and the head are separate sub-models so that a head can be trained on cached
embeddings and then dropped on top of the backbone unchanged.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from hematovision import CLASSES
from hematovision.data import stain
from hematovision.data.imaging import load_rgb
from hematovision.data.localize import CROP_SIGNATURE, crop_wbc
from hematovision.model.open_set import UNKNOWN, OpenSet

MODEL_FILE = "classifier.keras"
CONFIG_FILE = "classifier.json"


@dataclass
class ClassifierConfig:
    classes: list[str] = field(default_factory=lambda: list(CLASSES))
    image_size: int = 192
    backbone: str = "efficientnet-lite0"
    dropout: float = 0.3
    # Test-time augmentation: probabilities averaged over this many dihedral views of the crop
    # (1, 2, 4 or 8). A cell on a slide has no orientation, and averaging views steadies the
    # answer on off-centre, wedge-cut copies; it costs one backbone pass per view.
    tta_views: int = 1
    # Stain normalisation applied to every crop before the backbone (data/stain.py); models saved
    # before it existed read as "none", which is what they were trained with.
    stain: str = "none"


def build_keras_model(config: ClassifierConfig, pretrained: bool = True, backbone=None):
    """Backbone (ImageNet Lite0, frozen; or the one given) + a new softmax head, both named
    sub-models."""
    import keras

    from hematovision.model.backbone import EMBEDDING_DIM, build_backbone

    if backbone is None:
        backbone = build_backbone(config.backbone, config.image_size, include_top=False, weights=pretrained)
        backbone.name = "backbone"
    backbone.trainable = False
    head = keras.Sequential(
        [
            keras.Input((EMBEDDING_DIM,)),
            keras.layers.Dropout(config.dropout),
            keras.layers.Dense(len(config.classes), activation="softmax", name="probabilities"),
        ],
        name="head",
    )
    inputs = keras.Input((config.image_size, config.image_size, 3), name="wbc_crop")
    return keras.Model(inputs, head(backbone(inputs)), name="hematovision")


@dataclass
class Answers:
    """What the model says about a batch of crops."""

    probabilities: np.ndarray  # (N, C), temperature-calibrated when the model has an open set
    embeddings: np.ndarray  # (N, D), of the crop as it is (what the prediction log keeps)
    open_set_scores: np.ndarray  # (N,), NaN for a model without an open set
    unknown: np.ndarray  # (N,) bool: beyond the open-set threshold

    def rows(self, which: slice) -> Answers:
        return Answers(
            self.probabilities[which], self.embeddings[which], self.open_set_scores[which], self.unknown[which]
        )

    def labels(self, classes: Sequence[str]) -> list[str]:
        """Each answer's class, or ``unknown``."""
        best = self.probabilities.argmax(axis=1) if len(self.probabilities) else []
        return [UNKNOWN if unknown else classes[i] for i, unknown in zip(best, self.unknown)]


def read_crops(sources: Sequence[str | Path | bytes], image_size: int, workers: int = 2) -> np.ndarray:
    """Decode and crop many images (the localisation is numpy work that threads overlap well)."""

    def one(source):
        return crop_wbc(np.asarray(load_rgb(source)), image_size)

    if not sources:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return np.stack(list(pool.map(one, sources)))


class Classifier:
    """A trained model with the configuration needed to use it exactly as it was trained."""

    def __init__(self, keras_model, config: ClassifierConfig) -> None:
        self.keras_model = keras_model
        self.config = config
        self.backbone = keras_model.get_layer("backbone")
        self.head = keras_model.get_layer("head")
        self._backbone_fingerprint: str | None = None
        self.open_set: OpenSet | None = None

    @property
    def classes(self) -> list[str]:
        return self.config.classes

    @classmethod
    def new(cls, config: ClassifierConfig) -> Classifier:
        return cls(build_keras_model(config), config)

    def with_classes(self, classes: list[str]) -> Classifier:
        """This backbone under a new, untrained head for ``classes`` (a laboratory added a cell
        type). The open-set statistics carry over; the new class's come from its corrections."""
        config = ClassifierConfig(**{**asdict(self.config), "classes": list(classes)})
        new = Classifier(build_keras_model(config, backbone=self.backbone), config)
        new.open_set = self.open_set
        return new

    # --- inference -----------------------------------------------------------------------------
    def crops(self, sources: Sequence[str | Path | bytes]) -> np.ndarray:
        return read_crops(sources, self.config.image_size)

    def embed(self, crops: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """Backbone embeddings of raw crops (0..255): stain-normalised as in training, then the network."""
        return self.run_backbone(stain.normalise(crops.astype(np.float32), self.config.stain), batch_size)

    def run_backbone(self, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
        """The backbone network alone, on crops already prepared by :meth:`embed` (an export
        replaces this and nothing else)."""
        return _predict(self.backbone, inputs.astype(np.float32), batch_size)

    def classify_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        return _predict(self.head, embeddings.astype(np.float32), 1024)

    def predict_crops(self, crops: np.ndarray, batch_size: int = 64, views: int | None = None) -> np.ndarray:
        return self.predict_answers(crops, batch_size, views).probabilities

    def predict_with_embeddings(
        self, crops: np.ndarray, batch_size: int = 64, views: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (averaged over the configured test-time views) and the embedding of the
        crop as it is (what the prediction log and drift monitoring keep)."""
        answers = self.predict_answers(crops, batch_size, views)
        return answers.probabilities, answers.embeddings

    def predict_answers(self, crops: np.ndarray, batch_size: int = 64, views: int | None = None) -> Answers:
        """Probabilities, embeddings and open-set verdicts of ``crops`` (see :meth:`answer`)."""
        views = self.config.tta_views if views is None else views
        chunks = []
        for start in range(0, len(crops), batch_size):
            chunk = crops[start : start + batch_size]
            # All views of a chunk in one backbone call: one request's four views make a batch of
            # four rather than four batches of one.
            chunks.append(
                self.answer(self.embed(np.concatenate(dihedral_views(chunk, views)), batch_size * views), views)
            )
        if not chunks:
            dim = self.backbone.output_shape[-1]
            return self.answer(np.zeros((0, dim), np.float32), views)
        return Answers(*(np.concatenate([getattr(a, f.name) for a in chunks]) for f in fields(Answers)))

    def answer(self, view_embeddings: np.ndarray, views: int) -> Answers:
        """The answers for embeddings of ``views`` dihedral views, view-major (rows ``v * N + i``,
        as :func:`dihedral_views` and the embedding cache lay them out): probabilities averaged over
        the views, the open-set score of the views' mean embedding."""
        count = len(view_embeddings) // views
        stacked = np.asarray(view_embeddings, np.float32).reshape(views, count, -1)
        raw = self.classify_embeddings(view_embeddings).reshape(views, count, -1).mean(axis=0)
        if self.open_set is None:
            return Answers(raw, stacked[0], np.full(count, np.nan, np.float32), np.zeros(count, bool))
        scores = self.open_set.score(stacked.mean(axis=0))
        return Answers(self.open_set.calibrated(raw), stacked[0], scores, self.open_set.unknown(scores))

    def predict_images(self, sources: Sequence[str | Path | bytes]) -> np.ndarray:
        """Class probabilities, one row per image, in the order of ``classes``."""
        return self.predict_crops(self.crops(sources))

    def backbone_changed(self) -> None:
        """The backbone's weights changed (fine-tuning): its embeddings are new ones."""
        self._backbone_fingerprint = None

    def backbone_fingerprint(self) -> str:
        """Identifies the backbone's weights, its input size and how crops are cut, so cached
        embeddings are never reused across a fine-tuned backbone, a different crop size or a
        changed localiser."""
        if self._backbone_fingerprint is None:
            # The stain normalisation changes every input, so embeddings under another are different ones
            # (the suffix only when set: the embeddings cached before stain existed stay valid).
            stain_tag = "" if self.config.stain == "none" else f":stain={self.config.stain}"
            digest = hashlib.sha256(
                f"{self.config.backbone}:{self.config.image_size}:{CROP_SIGNATURE}{stain_tag}".encode()
            )
            for weight in self.backbone.weights:
                digest.update(np.ascontiguousarray(weight.numpy()).tobytes())
            self._backbone_fingerprint = digest.hexdigest()[:16]
        return self._backbone_fingerprint

    # --- persistence ---------------------------------------------------------------------------
    def save(self, directory: Path) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        self.keras_model.save(directory / MODEL_FILE)
        (directory / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2))
        if self.open_set is not None:
            self.open_set.save(directory)
        return directory

    @classmethod
    def load(cls, directory: Path) -> Classifier:
        import keras

        config = ClassifierConfig(**json.loads((Path(directory) / CONFIG_FILE).read_text()))
        model = keras.models.load_model(Path(directory) / MODEL_FILE, compile=False)
        classifier = cls(model, config)
        classifier.open_set = OpenSet.load(directory)
        return classifier


def dihedral_views(crops: np.ndarray, views: int) -> list[np.ndarray]:
    """The first ``views`` of: identity, left-right flip, up-down flip, half turn, and the four
    transposed variants (the dihedral group of the square), on a (N, H, W, 3) batch."""
    if views not in (1, 2, 4, 8):
        raise ValueError(f"tta_views must be 1, 2, 4 or 8, not {views}")
    return [dihedral_view(crops, index) for index in range(views)]


def dihedral_view(crops: np.ndarray, index: int) -> np.ndarray:
    """View ``index`` (0-7) of :func:`dihedral_views`."""
    flip = [crops, crops[:, :, ::-1], crops[:, ::-1, :], crops[:, ::-1, ::-1]][index % 4]
    return np.ascontiguousarray(np.swapaxes(flip, 1, 2) if index >= 4 else flip)


def _predict(model, inputs: np.ndarray, batch_size: int) -> np.ndarray:
    """Batched inference through the model's compiled graph (see :func:`_inference_graph`)."""
    if not len(inputs):
        return np.zeros((0, model.output_shape[-1]), np.float32)
    run = _inference_graph(model)
    return np.concatenate([run(inputs[i : i + batch_size]).numpy() for i in range(0, len(inputs), batch_size)])


def _inference_graph(model):
    """The model in inference mode as one TensorFlow graph, traced once for any batch size.

    Calling a Keras model eagerly dispatches each of the backbone's ~200 operations from Python,
    holding the interpreter lock each time: a fixed cost of tens of milliseconds per call that
    dominates small batches (one request's views) and stalls every other request thread. The graph
    runs the same weights (variables are captured, so fine-tuning updates it too) in one call."""
    graph = getattr(model, "_hematovision_inference_graph", None)
    if graph is None:
        import tensorflow as tf

        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        graph = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        model._hematovision_inference_graph = graph
    return graph


def batched(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]
