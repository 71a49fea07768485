"""A cheaper answer: the backbone quantised to int8 (TensorFlow Lite), the head and open set unchanged.

Every answer costs ``tta_views`` passes of the backbone, which is nearly all of the model's compute.
:func:`export_int8` converts a trained classifier's backbone to a full-integer TensorFlow Lite model
(weights and activations int8, float input and output, so the crops and embeddings keep their
ranges), calibrated on real training crops prepared exactly as :meth:`Classifier.embed` prepares
them. :class:`Int8Classifier` is the same :class:`Classifier` (crops, dihedral views, head,
temperature, open set, Grad-CAM on the Keras weights) with only :meth:`run_backbone` replaced.

Dynamic-range quantisation (int8 weights, float activations) was measured too and left out: on the
2-core benchmark machine it answered within 0.05 of the full model but only ~1.1x faster; the
full-integer model was ~2.7x faster (``benchmarks/export.py`` measures both speed and accuracy).

Whether a version answers with its export is the registry's decision, on evidence
(``training/steps.py``: the paired comparison on validation cells, tag ``serving_flavour``).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import warnings
from pathlib import Path

import numpy as np

from hematovision.data import stain
from hematovision.model.classifier import Classifier

FULL = "full"
INT8 = "int8"
FLAVOURS = (FULL, INT8)
INT8_FILE = "backbone_int8.tflite"


def calibration_inputs(classifier: Classifier, crops: np.ndarray) -> np.ndarray:
    """What the backbone sees for raw crops (0..255): the classifier's stain normalisation, as in
    :meth:`Classifier.embed`, so the int8 ranges are calibrated on the inputs it will get."""
    return stain.normalise(crops.astype(np.float32), classifier.config.stain)


def export_int8(classifier: Classifier, calibration_crops: np.ndarray) -> bytes:
    """The classifier's backbone as a full-integer (int8) TensorFlow Lite model, its activation
    ranges calibrated on ``calibration_crops`` (raw crops of real training images, a hundred or so:
    more changes the ranges little and costs a backbone pass each)."""
    import tensorflow as tf

    if not len(calibration_crops):
        raise ValueError("an int8 export needs calibration crops (real training images)")
    inputs = calibration_inputs(classifier, calibration_crops)

    def representative():
        for index in range(len(inputs)):
            yield [inputs[index : index + 1]]

    with tempfile.TemporaryDirectory(prefix="hematovision-export-") as folder:
        # Keras 3's documented route to TensorFlow: a SavedModel with a batch-polymorphic
        # signature (TFLiteConverter.from_keras_model does the same but prints the whole signature).
        classifier.backbone.export(folder, format="tf_saved_model", verbose=False)
        converter = tf.lite.TFLiteConverter.from_saved_model(folder)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = representative
        return converter.convert()


class Int8Classifier(Classifier):
    """A :class:`Classifier` whose backbone runs as its int8 TensorFlow Lite export.

    Thread safety: a TensorFlow Lite interpreter must not be invoked from two threads at once, and
    the service's batcher runs ``serving.model_calls`` model calls concurrently on purpose. Each
    thread gets an interpreter of its own (``threading.local``) rather than sharing one behind a
    lock, which would serialise those calls and give back the throughput the export buys; an
    interpreter costs its activation buffers (a few MB) and shares nothing mutable with another.
    """

    flavour = INT8

    def __init__(self, keras_model, config, tflite_model: bytes) -> None:
        super().__init__(keras_model, config)
        self.tflite_model = bytes(tflite_model)
        self.export_sha256 = hashlib.sha256(self.tflite_model).hexdigest()
        self._local = threading.local()

    @classmethod
    def from_classifier(cls, classifier: Classifier, tflite_model: bytes) -> Int8Classifier:
        """``classifier`` (its head, configuration and open set) answering with the export."""
        int8 = cls(classifier.keras_model, classifier.config, tflite_model)
        int8.open_set = classifier.open_set
        return int8

    @classmethod
    def load_export(cls, directory: Path, export: Path) -> Int8Classifier:
        """A saved classifier (``directory``) with the export file ``export``."""
        return cls.from_classifier(Classifier.load(directory), Path(export).read_bytes())

    def run_backbone(self, inputs: np.ndarray, batch_size: int = 64) -> np.ndarray:
        if not len(inputs):
            return np.zeros((0, self.backbone.output_shape[-1]), np.float32)
        interpreter, input_index, output_index = self._interpreter()
        inputs = np.ascontiguousarray(inputs, np.float32)
        out = []
        for start in range(0, len(inputs), batch_size):
            chunk = inputs[start : start + batch_size]
            if tuple(interpreter.get_input_details()[0]["shape"]) != chunk.shape:
                # Resizing re-plans the buffers (a few ms): done only when the batch shape changes.
                interpreter.resize_tensor_input(input_index, chunk.shape)
                interpreter.allocate_tensors()
            interpreter.set_tensor(input_index, chunk)
            interpreter.invoke()
            out.append(interpreter.get_tensor(output_index).copy())  # the buffer is reused by the next invoke
        return np.concatenate(out)

    def _interpreter(self):
        """This thread's interpreter (made at its first call)."""
        made = getattr(self._local, "interpreter", None)
        if made is None:
            import tensorflow as tf

            with warnings.catch_warnings():
                # tf.lite.Interpreter warns that it moves to the ai-edge-litert package; TF 2.21
                # still ships it and the project adds no dependency for the same runtime.
                warnings.simplefilter("ignore", UserWarning)
                interpreter = tf.lite.Interpreter(model_content=self.tflite_model, num_threads=_threads())
            interpreter.allocate_tensors()
            made = (
                interpreter,
                interpreter.get_input_details()[0]["index"],
                interpreter.get_output_details()[0]["index"],
            )
            self._local.interpreter = made
        return made

    def backbone_fingerprint(self) -> str:
        """The export's embeddings are not the Keras backbone's: they are cached apart (a cache shared
        with the full model would otherwise hand one the other's vectors)."""
        return f"{super().backbone_fingerprint()}:int8:{self.export_sha256[:12]}"


def flavour_of(classifier) -> str:
    """Which flavour a loaded model answers with."""
    return INT8 if isinstance(classifier, Int8Classifier) else FULL


def _threads() -> int:
    """Threads per interpreter: TensorFlow's intra-op share when the service set one (each of its
    concurrent model calls gets its share of the cores: ``serving/batcher.py``), else every core."""
    import tensorflow as tf

    share = tf.config.threading.get_intra_op_parallelism_threads()
    if share > 0:
        return share
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
