"""Two-phase transfer learning of the white-cell classifier.

Phase 1 trains a new head on embeddings of the frozen ImageNet backbone (cached, so seconds).
Phase 2 unfreezes the top blocks of the backbone and fine-tunes them with the head at a low
learning rate on augmented crops. After each phase the validation split (held-out *cells*, never
augmented copies of training cells) is scored, and the best state is kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np
import pandas as pd

from hematovision import CLASSES
from hematovision.data import stain
from hematovision.data.augment import augment_crop
from hematovision.data.dataset import label_indices, limit_per_cell
from hematovision.model.classifier import Classifier, ClassifierConfig, read_crops
from hematovision.model.embeddings import EmbeddingCache, cached_embeddings
from hematovision.params import Params
from hematovision.progress import counting
from hematovision.training.calibrate import fit_open_set
from hematovision.training.metrics import classification_metrics

Progress = Callable[[str, int, int], None]  # (step description, done, total)


@dataclass
class TrainResult:
    classifier: Classifier
    val_metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    n_train_images: int = 0
    n_train_cells: int = 0


def train(
    rows: pd.DataFrame,
    image_root: Path,
    params: Params,
    cache: EmbeddingCache,
    progress: Progress | None = None,
    classes: list[str] | None = None,
) -> TrainResult:
    """Train on the manifest rows split ``train``, validate on ``val``; returns the best model.
    ``classes`` defaults to the four; retraining passes a laboratory's added ones too."""
    import tensorflow as tf

    from hematovision.model.backbone import trainable_top

    report = progress or (lambda *_: None)
    keras.utils.set_random_seed(params.seed)
    timings: dict[str, float] = {}
    classes = list(classes or CLASSES)
    train_rows = limit_per_cell(rows[rows.split == "train"], params.train.max_images_per_cell, params.seed)
    val_rows = limit_per_cell(rows[rows.split == "val"], params.train.max_images_per_cell, params.seed)
    if train_rows.empty or val_rows.empty:
        raise ValueError("training needs images in both the train and the val split")
    y_train, y_val = label_indices(train_rows.label, classes), label_indices(val_rows.label, classes)

    classifier = Classifier.new(
        ClassifierConfig(
            classes=classes,
            image_size=params.model.image_size,
            backbone=params.model.backbone,
            dropout=params.model.dropout,
            tta_views=params.model.tta_views,
            stain=stain.check_method(params.model.stain),
        )
    )
    started = time.perf_counter()
    train_paths = [image_root / p for p in train_rows.path]
    val_paths = [image_root / p for p in val_rows.path]
    size = params.model.image_size
    crops_train = _crops_with_progress(train_paths, size, "locating cells (train)", report)
    crops_val = _crops_with_progress(val_paths, size, "locating cells (val)", report)
    timings["crop_s"] = time.perf_counter() - started

    # Phase 1: the head on cached embeddings of the frozen backbone.
    started = time.perf_counter()
    emb_train = _embed_with_progress(classifier, train_paths, crops_train, cache, "embedding (train)", report)
    emb_val = _embed_with_progress(classifier, val_paths, crops_val, cache, "embedding (val)", report)
    timings["embed_s"] = time.perf_counter() - started
    started = time.perf_counter()
    head = classifier.head
    head.compile(
        optimizer=keras.optimizers.Adam(params.train.head_learning_rate),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )
    report("training the head", 0, params.train.head_epochs)
    fit = head.fit(
        emb_train,
        y_train,
        validation_data=(emb_val, y_val),
        epochs=params.train.head_epochs,
        batch_size=params.train.batch_size,
        verbose=0,
        shuffle=True,
        callbacks=[
            keras.callbacks.EarlyStopping("val_loss", patience=5, restore_best_weights=True),
            _ProgressCallback(report, "training the head", params.train.head_epochs),
        ],
    )
    timings["head_s"] = time.perf_counter() - started
    history = [
        {"phase": "head", "epoch": i + 1, **{k: float(v[i]) for k, v in fit.history.items()}}
        for i in range(len(fit.history["loss"]))
    ]
    best = classification_metrics(
        y_val, classifier.classify_embeddings(emb_val), classes, list(val_rows.group), bootstrap_samples=0
    )
    best_weights = classifier.keras_model.get_weights()
    history.append({"phase": "head", "val_macro_f1": best["macro_f1"], "val_accuracy": best["accuracy"]})

    # Phase 2: fine-tune the top of the backbone on augmented crops, at a low learning rate.
    if params.train.finetune_epochs > 0 and params.train.finetune_blocks > 0:
        started = time.perf_counter()
        trainable_top(classifier.backbone, params.train.finetune_blocks)
        model = classifier.keras_model
        per_epoch = min(params.train.finetune_images_per_epoch, len(y_train))
        steps = max(1, per_epoch // params.train.batch_size)
        # Cosine decay to zero over the whole phase: large steps early, then settling into a
        # minimum instead of ending wherever a constant rate leaves the weights.
        rate = keras.optimizers.schedules.CosineDecay(
            params.train.finetune_learning_rate, decay_steps=steps * params.train.finetune_epochs
        )
        model.compile(
            optimizer=keras.optimizers.Adam(rate), loss="sparse_categorical_crossentropy", metrics=["accuracy"]
        )
        dataset = _finetune_dataset(crops_train, y_train, params, augment_crop, tf)
        for epoch in range(1, params.train.finetune_epochs + 1):
            fit = model.fit(
                dataset,
                steps_per_epoch=steps,
                epochs=1,
                verbose=0,
                callbacks=[
                    _BatchProgress(report, f"fine-tuning (epoch {epoch}/{params.train.finetune_epochs})", steps)
                ],
            )
            # One view while choosing the epoch: test-time views would multiply this pass's cost.
            scores = classification_metrics(
                y_val, classifier.predict_crops(crops_val, views=1), classes, list(val_rows.group), bootstrap_samples=0
            )
            history.append(
                {
                    "phase": "finetune",
                    "epoch": epoch,
                    "loss": float(fit.history["loss"][-1]),
                    "accuracy": float(fit.history["accuracy"][-1]),
                    "val_macro_f1": scores["macro_f1"],
                    "val_accuracy": scores["accuracy"],
                }
            )
            if scores["macro_f1"] > best["macro_f1"]:
                best, best_weights = scores, model.get_weights()
        classifier.keras_model.set_weights(best_weights)
        classifier.backbone.trainable = False
        classifier.backbone_changed()
        timings["finetune_s"] = time.perf_counter() - started

    # Unknown cells and calibrated confidence: class statistics from a few pictures of every
    # training cell, threshold and temperature from the validation cells.
    started = time.perf_counter()
    report("fitting the open set", 0, 1)
    fit_rows = limit_per_cell(train_rows, params.open_set.images_per_cell, params.seed)
    fit_at = train_rows.index.get_indexer(fit_rows.index)
    calibration = fit_open_set(classifier, crops_train[fit_at], y_train[fit_at], crops_val, y_val, params.open_set)
    timings["open_set_s"] = time.perf_counter() - started

    val_metrics = classification_metrics(
        y_val,
        classifier.predict_crops(crops_val),
        classes,
        list(val_rows.group),
        params.evaluate.bootstrap_samples,
        params.seed,
    )
    val_metrics.update(calibration)
    return TrainResult(classifier, val_metrics, history, timings, len(train_rows), train_rows.group.nunique())


def _finetune_dataset(crops: np.ndarray, labels: np.ndarray, params: Params, augment, tf):
    """Endless, class-balanced stream of augmented crops (each class drawn equally often)."""
    per_class = []
    for label in np.unique(labels):
        index = np.flatnonzero(labels == label)
        per_class.append(tf.data.Dataset.from_tensor_slices(index).shuffle(len(index), seed=params.seed).repeat())
    indices = tf.data.Dataset.sample_from_datasets(per_class, seed=params.seed)
    crops_t, labels_t = tf.constant(crops), tf.constant(labels)
    jitter, crop_jitter, stain_jitter = params.train.colour_jitter, params.train.crop_jitter, params.train.stain_jitter
    method = params.model.stain

    def normalise(batch):
        # The keras model takes crops as the backbone does; Classifier.embed normalises the stain
        # before it at every other call, so fine-tuning must see crops the same way: augmented as a
        # raw crop (another laboratory's crop), then normalised.
        if method == "none":
            return batch
        out = tf.numpy_function(lambda x: stain.normalise(x, method), [batch], tf.float32)
        return tf.ensure_shape(out, batch.shape)

    return (
        indices.map(
            lambda i: (
                augment(
                    tf.cast(tf.gather(crops_t, i), tf.float32),
                    jitter,
                    crop_jitter=crop_jitter,
                    stain_jitter=stain_jitter,
                ),
                tf.gather(labels_t, i),
            ),
            num_parallel_calls=tf.data.AUTOTUNE,
        )
        .batch(params.train.batch_size)
        .map(lambda x, y: (normalise(x), y), num_parallel_calls=tf.data.AUTOTUNE)
        .prefetch(2)
    )


def _crops_with_progress(paths: list[Path], size: int, what: str, report: Progress) -> np.ndarray:
    chunks, done = [], 0
    for start in range(0, len(paths), 256):
        chunk = paths[start : start + 256]
        chunks.append(read_crops(chunk, size))
        done += len(chunk)
        report(what, done, len(paths))
    return np.concatenate(chunks) if chunks else np.zeros((0, size, size, 3), np.uint8)


def _embed_with_progress(classifier, paths, crops, cache, what: str, report: Progress) -> np.ndarray:
    step = counting(lambda done, total: report(what, done, total), len(paths))
    return cached_embeddings(classifier, paths, cache, crops=crops, progress=step)


class _ProgressCallback(keras.callbacks.Callback):
    def __init__(self, report: Progress, what: str, total: int) -> None:
        super().__init__()
        self.report, self.what, self.total = report, what, total

    def on_epoch_end(self, epoch, logs=None):
        self.report(self.what, epoch + 1, self.total)


class _BatchProgress(_ProgressCallback):
    def on_epoch_end(self, epoch, logs=None):
        pass

    def on_train_batch_end(self, batch, logs=None):
        self.report(self.what, batch + 1, self.total)
