"""Serving without a web framework: hold the current model, hot-swap it safely, predict, log.

:class:`ModelHolder` is plain Python so that it can be tested and reused (CLI, notebooks) without
BentoML. Each serving worker owns one: its watcher thread polls the registry alias, loads a new
version in the background, warms it and checks it on a built-in synthetic cell, and only then
swaps it in with one reference assignment. A request grabs the reference once, so requests in
flight finish on the model they started with. A version that fails to load or fails the check is
refused and remembered, and the old model keeps serving; so does an unreachable registry.

Every image goes through :func:`hematovision.data.imaging.load_rgb` (the training decode path) and the
same crop -> backbone -> head as :meth:`Classifier.predict_images`, keeping the embedding so that
it can be logged.
"""

from __future__ import annotations

import hashlib
import io
import logging
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import numpy as np

from hematovision.data.imaging import ImageError, image_stats, load_rgb
from hematovision.data.localize import cell_in_view, crop_wbc, locate_and_crop
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore, default_store, utc_now
from hematovision.settings import Settings, get_settings

logger = logging.getLogger("hematovision.serving.holder")

# The formats a microscope camera or LIS export produces; anything else is refused before any
# decoder runs, which also keeps PIL's rarer (and less hardened) parsers away from request bytes.
ACCEPTED_FORMATS = {"JPEG": (b"\xff\xd8\xff",), "PNG": (b"\x89PNG\r\n\x1a\n",),
                    "TIFF": (b"II*\x00", b"MM\x00*"), "BMP": (b"BM",)}
_OTHER_IMAGE_MAGIC = (b"GIF87a", b"GIF89a", b"RIFF", b"\x00\x00\x01\x00", b"8BPS", b"\x00\x00\x00\x0cjP")
# HTTP status per ImageError code; codes not listed are 422 (well-formed request, unusable image).
_STATUS = {"too_large": 413, "decompression_bomb": 413, "unsupported_format": 415, "missing_image": 400,
           "unknown_prediction": 404, "image_not_retained": 404}


class ImageRejected(ValueError):
    """A request image the service refuses: ``code`` is stable, ``status`` the HTTP 4xx to answer."""

    def __init__(self, code: str, message: str, index: int | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.index = code, message, index
        self.status = _STATUS.get(code, 422)

    def as_dict(self) -> dict[str, Any]:
        return {"error": self.code, "detail": self.message}


class NotReady(RuntimeError):
    """No model is loaded yet (HTTP 503)."""

    code, status = "not_ready", 503


@dataclass(frozen=True)
class PreparedImage:
    rgb: Any  # PIL.Image.Image
    sha256: str
    stats: dict[str, float]
    crop: np.ndarray | None = None  # the white-cell crop, when the model's input size was known
    cell_in_view: str | None = None  # whole / cut / none (localize.cell_in_view), with the crop


def prepare_image(data: bytes, crop_size: int | None = None) -> PreparedImage:
    """Check the format, decode with the training decoder, compute drift statistics and, given
    the model's input size, crop the white cell. The service crops here, on the request's own
    thread: localisation then runs in parallel across requests and overlaps the batched model
    call instead of queueing in front of it on the batcher's threads."""
    if data and not any(data.startswith(m) for magics in ACCEPTED_FORMATS.values() for m in magics):
        if any(data.startswith(m) for m in _OTHER_IMAGE_MAGIC):
            raise ImageRejected("unsupported_format", f"accepted formats: {', '.join(ACCEPTED_FORMATS)}")
        raise ImageRejected("not_an_image", f"not a {'/'.join(ACCEPTED_FORMATS)} image")
    try:
        rgb = load_rgb(data)
    except ImageError as error:
        raise ImageRejected(error.code, error.message) from error
    crop, cell = None, None
    if crop_size:
        crop, box = locate_and_crop(np.asarray(rgb), crop_size)
        cell = cell_in_view(box)
    return PreparedImage(rgb, hashlib.sha256(data).hexdigest(), image_stats(rgb), crop, cell)


def needs_review(confidence: float, threshold: float, cell: str | None) -> bool:
    """A person should look: the model is unsure, or it found no white cell to classify (on TEST
    such answers are nearly all wrong, however confident)."""
    return confidence < threshold or cell == "none"


def run_model(classifier, images: Sequence[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities and embeddings, one row per image (crop -> backbone -> head, test-time views
    as the model was configured)."""
    size = classifier.config.image_size
    crops = np.stack([p.crop if p.crop is not None and p.crop.shape[0] == size else crop_wbc(np.asarray(p.rgb), size)
                      for p in images])
    return classifier.predict_with_embeddings(crops)


def sanity_image() -> bytes:
    """A synthetic smear (pink background, violet nucleus) as PNG: exercises decode, localisation
    and both sub-models without shipping a patient image in the code."""
    from PIL import Image

    yy, xx = np.mgrid[:128, :128]
    arr = np.empty((128, 128, 3), np.uint8)
    arr[:] = (226, 190, 196)
    arr[(yy - 64) ** 2 + (xx - 60) ** 2 < 22**2] = (92, 52, 168)
    buffer = io.BytesIO()
    Image.fromarray(arr).save(buffer, format="PNG")
    return buffer.getvalue()


def check_classifier(classifier) -> None:
    """Warm the model and refuse it unless it gives finite probabilities summing to 1, per class."""
    image = prepare_image(sanity_image())
    for n in (1, 4):  # two batch shapes: the first calls allocate, later ones are fast
        probabilities, embeddings = run_model(classifier, [image] * n)
    if probabilities.shape != (4, len(classifier.classes)):
        raise ValueError(f"output shape {probabilities.shape} does not match {len(classifier.classes)} classes")
    if not (np.isfinite(probabilities).all() and np.isfinite(embeddings).all()):
        raise ValueError("non-finite output on the sanity image")
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3) or (probabilities < 0).any():
        raise ValueError(f"probabilities do not sum to 1: {probabilities.sum(axis=1)}")


def share_cores_between_model_calls(calls: int) -> None:
    """Give each of ``calls`` concurrent model calls its share of this machine's cores (TensorFlow
    would give every call all of them). Must run before TensorFlow's first operation; later it
    cannot change anything, which is logged."""
    import os

    import tensorflow as tf

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        tf.config.threading.set_intra_op_parallelism_threads(max(1, cores // calls))
    except RuntimeError as error:  # TensorFlow already running: keep its defaults
        logger.warning("could not set TensorFlow's threads per model call: %s", error)


class Batcher:
    """Adaptive batching across concurrent requests: each request thread submits its images and
    waits; each of ``calls`` batcher threads takes whatever has queued up (up to ``max_batch``
    images, waiting at most ``max_wait_s`` for company once a request arrived) into one model call.
    Under no load a request runs alone at once; under load the backbone sees full batches, which is
    what makes two CPU cores go furthest. A request brings the model it started with, so a batch is grouped by model
    and a hot swap never changes the model of a request in flight."""

    def __init__(self, max_batch: int = 32, max_wait_s: float = 0.005, calls: int = 1) -> None:
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: list[tuple[Any, list[PreparedImage], Future]] = []
        self._cond = threading.Condition()
        # ``calls`` threads take batches in turn, so that many model calls can run at once.
        self._threads = [threading.Thread(target=self._run, name=f"batcher-{i}", daemon=True) for i in range(calls)]
        for thread in self._threads:
            thread.start()

    def submit(self, model: "LoadedModel", images: list[PreparedImage]) -> tuple[np.ndarray, np.ndarray]:
        future: Future = Future()
        with self._cond:
            self._queue.append((model, images, future))
            self._cond.notify()
        return future.result()

    def _take(self) -> list[tuple[Any, list[PreparedImage], Future]]:
        with self._cond:
            while not self._queue:
                self._cond.wait()
            deadline = time.monotonic() + self.max_wait_s
            while sum(len(i) for _, i, _ in self._queue) < self.max_batch and time.monotonic() < deadline:
                self._cond.wait(deadline - time.monotonic())
            taken, size = [], 0
            while self._queue and (not taken or size + len(self._queue[0][1]) <= self.max_batch):
                taken.append(self._queue.pop(0))
                size += len(taken[-1][1])
            return taken

    def _run(self) -> None:
        while True:
            taken = self._take()
            for model in {id(m): m for m, _, _ in taken}.values():
                group = [(images, future) for m, images, future in taken if m is model]
                try:
                    probabilities, embeddings = run_model(model.classifier, [p for images, _ in group for p in images])
                except BaseException as error:  # noqa: BLE001 - hand the failure to the waiting requests
                    for _, future in group:
                        future.set_exception(error)
                    continue
                start = 0
                for images, future in group:
                    future.set_result((probabilities[start : start + len(images)], embeddings[start : start + len(images)]))
                    start += len(images)


@dataclass(frozen=True)
class LoadedModel:
    classifier: Any
    version: str
    loaded_at: str
    registry: dict[str, Any] = field(default_factory=dict)  # tags, metrics, run id of the version


class RegistrySource:
    """Where versions come from: the MLflow registry named by the settings (imported lazily)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._registry = None

    def _client(self):
        if self._registry is None:
            import mlflow

            from hematovision.registry.registry import Registry

            uri = self.settings.tracking_uri
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            self._registry = Registry(self.settings.registered_model, uri)
        return self._registry

    def resolve(self, alias: str) -> str | None:
        """The version the alias points at (None: no such alias); raises if the store is unreachable."""
        from mlflow.exceptions import MlflowException

        registry = self._client()
        try:
            version = registry.client.get_model_version_by_alias(registry.name, alias)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return str(version.version)

    def describe(self, version: str) -> dict[str, Any]:
        registry = self._client()
        mv = registry.get_version(version)
        return {"name": registry.name, "version": str(mv.version), "run_id": mv.run_id, "source": mv.source,
                "tags": dict(mv.tags), "aliases": list(mv.aliases), "data_hash": mv.tags.get("data_hash"),
                "metrics": registry.metrics_of(version)}

    def download(self, version: str, into: str) -> str:
        """Fetch the version's artifacts into ``into``; returns the saved classifier's folder."""
        import mlflow

        from hematovision.registry.packaging import ARTIFACT_KEY

        self._client()
        uri = f"models:/{self.settings.registered_model}/{version}"
        return f"{mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=into)}/artifacts/{ARTIFACT_KEY}"


class ModelHolder:
    """The model one serving worker answers with, and the watcher that keeps it current."""

    def __init__(self, settings: Settings | None = None, source: RegistrySource | None = None,
                 store: PredictionStore | None = None,
                 load: Callable[[str], Any] | None = None) -> None:
        self.settings = settings or get_settings()
        self.alias = self.settings.serve_alias
        self.source = source or RegistrySource(self.settings)
        self._store = store
        self._load = load or _load_classifier
        self._current: LoadedModel | None = None
        self._refused: dict[str, dict[str, str]] = {}
        self._loading: str | None = None
        self._last_error: dict[str, str] | None = None
        self._last_poll: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()
        self._batcher = Batcher(self.settings.max_batch_images, self.settings.batch_wait_ms / 1000,
                                self.settings.model_calls)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> "ModelHolder":
        """Start the watcher (its first poll loads the model); returns at once."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="model-watcher", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 10) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception:  # noqa: BLE001 - the watcher must outlive any single failure
                logger.exception("model watcher: unexpected error")
            self._stop.wait(self.settings.alias_poll_seconds)

    @property
    def watching(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self._current is not None

    # --- hot swap ------------------------------------------------------------------------------
    def poll(self) -> str | None:
        """One watcher step: follow the alias if it moved. Returns the version now served."""
        with self._poll_lock:
            self._last_poll = utc_now()
            try:
                version = self.source.resolve(self.alias)
            except Exception as error:  # noqa: BLE001 - any store failure: keep serving
                self._error(f"registry unreachable: {type(error).__name__}: {error}")
                return self.version
            if version is None:
                self._error(f"alias {self.alias!r} is not set in the registry")
            elif version != self.version and version not in self._refused:
                self._swap_to(version)
            return self.version

    def _swap_to(self, version: str) -> None:
        self._loading = version
        workdir = tempfile.mkdtemp(prefix=f"hematovision-v{version}-")  # Keras reads the files at load
        try:
            try:  # fetching: failures are the store's, retried at the next poll
                info = self.source.describe(version)
                local = self.source.download(version, workdir)
            except Exception as error:  # noqa: BLE001
                self._error(f"cannot fetch version {version}: {type(error).__name__}: {error}")
                return
            try:  # loading and checking: failures are the version's, remembered
                started = time.perf_counter()
                classifier = self._load(local)
                check_classifier(classifier)
            except Exception as error:  # noqa: BLE001
                reason = f"{type(error).__name__}: {error}"[:500]
                self._refused[version] = {"reason": reason, "at": utc_now()}
                logger.error("refused model version %s (still serving %s): %s", version, self.version, reason)
                return
            previous = self.version
            self._current = LoadedModel(classifier, version, utc_now(), info)  # the atomic swap
            self._last_error = None
            logger.info("now serving model version %s (was %s); loaded and checked in %.1f s",
                        version, previous, time.perf_counter() - started)
        finally:
            self._loading = None
            shutil.rmtree(workdir, ignore_errors=True)

    def _error(self, message: str) -> None:
        if self._last_error is None or self._last_error["message"] != message:
            logger.warning("%s; serving version %s", message, self.version)
        self._last_error = {"message": message, "at": utc_now()}

    @property
    def version(self) -> str | None:
        current = self._current
        return None if current is None else current.version

    def status(self) -> dict[str, Any]:
        current = self._current
        info = current.registry if current else {}
        return {"ready": current is not None, "model": self.settings.registered_model, "alias": self.alias,
                "version": self.version, "loaded_at": current.loaded_at if current else None,
                "data_hash": info.get("data_hash"), "run_id": info.get("run_id"),
                "metrics": info.get("metrics", {}), "tags": info.get("tags", {}),
                "classes": list(current.classifier.classes) if current else [],
                "loading": self._loading, "refused": dict(self._refused), "last_error": self._last_error,
                "last_poll_at": self._last_poll, "poll_seconds": self.settings.alias_poll_seconds,
                "review_threshold": self.settings.review_threshold}

    # --- prediction ----------------------------------------------------------------------------
    def predict(self, images: Sequence[bytes], errors: Literal["raise", "return"] = "raise") -> list[dict[str, Any]]:
        """One dict per image: label, confidence, probabilities, model_version, prediction_id,
        needs_review, cell_in_view (whole / cut / none). A bad image raises :class:`ImageRejected`
        (``errors="raise"``) or is answered in place by ``{"error": code, "detail": message}``
        (``errors="return"``)."""
        model = self._current  # grabbed once: a swap during this request does not affect it
        if model is None:
            raise NotReady("no model loaded yet" + (f" (loading version {self._loading})" if self._loading else ""))
        started = time.perf_counter()
        results: list[dict[str, Any] | None] = [None] * len(images)
        good: list[tuple[int, PreparedImage]] = []
        for index, data in enumerate(images):
            try:
                good.append((index, prepare_image(data, model.classifier.config.image_size)))
            except ImageRejected as error:
                if errors == "raise":
                    error.index = index
                    raise
                results[index] = error.as_dict()
        if good:
            probabilities, embeddings = self._batcher.submit(model, [p for _, p in good])
            latency_ms = (time.perf_counter() - started) * 1000  # per request: the whole batch's time
            records = []
            for (index, prepared), probs, embedding in zip(good, probabilities, embeddings):
                record = _record(model, prepared, probs, embedding, latency_ms, self.settings.review_threshold)
                records.append(record)
                results[index] = {"label": record.label, "confidence": record.confidence,
                                  "probabilities": record.probabilities, "model_version": model.version,
                                  "prediction_id": record.id, "needs_review": record.needs_review,
                                  "cell_in_view": prepared.cell_in_view}
            self._log(records, [images[i] for i, _ in good])
        return results  # type: ignore[return-value]

    def explain(self, data: bytes | None = None, prediction_id: str | None = None,
                class_name: str | None = None) -> dict[str, Any]:
        """Grad-CAM overlay (PNG bytes) for an image, or for a logged prediction whose image was
        retained; ``class_name`` explains that class instead of the predicted one."""
        from hematovision.model.gradcam import explain_image

        model = self._current
        if model is None:
            raise NotReady("no model loaded yet")
        if data is None:
            data = self._retained_image(prediction_id)
        prepare_image(data)  # the same format and decode checks as /predict, with the same errors
        classes = list(model.classifier.classes)
        class_index = None
        if class_name:
            if class_name.lower() not in classes:
                raise ImageRejected("unknown_class", f"class_name must be one of {', '.join(classes)}")
            class_index = classes.index(class_name.lower())
        explanation = explain_image(model.classifier, data, class_index)
        return {"png": explanation.png, "label": explanation.label, "explained_class": classes[explanation.class_index],
                "confidence": float(explanation.probabilities[explanation.label]), "model_version": model.version}

    def _retained_image(self, prediction_id: str | None) -> bytes:
        if not prediction_id:
            raise ImageRejected("missing_image", "send the image as file field 'image', or a 'prediction_id'")
        record = (self._store or default_store(self.settings)).get(str(prediction_id))
        if record is None:
            raise ImageRejected("unknown_prediction", f"no prediction with id {prediction_id!r}")
        if record["image_path"] is None:
            raise ImageRejected("image_not_retained", "this prediction's image was not kept (retain_images_days is 0 "
                                "or it was purged); send the image itself")
        return Path(record["image_path"]).read_bytes()

    def _log(self, records: list[PredictionRecord], images: list[bytes]) -> None:
        try:
            (self._store or default_store(self.settings)).log_many(records, images)
        except Exception:  # noqa: BLE001 - a full disk must not turn answers into errors
            logger.exception("could not log %d predictions", len(records))

    def prometheus(self) -> str:
        """Gauges appended to BentoML's /metrics (this worker's view)."""
        refused = len(self._refused)
        version = self.version
        return ("# HELP hematovision_model_version Registry version of the model being served (0: none).\n"
                "# TYPE hematovision_model_version gauge\n"
                f"hematovision_model_version {int(version) if version and version.isdigit() else 0}\n"
                "# HELP hematovision_model_ready 1 when a checked model is loaded.\n"
                "# TYPE hematovision_model_ready gauge\n"
                f"hematovision_model_ready {int(self.ready)}\n"
                "# HELP hematovision_model_refused Versions this worker refused to serve.\n"
                "# TYPE hematovision_model_refused gauge\n"
                f"hematovision_model_refused {refused}\n")


def _record(model: LoadedModel, prepared: PreparedImage, probs: np.ndarray, embedding: np.ndarray,
            latency_ms: float, threshold: float) -> PredictionRecord:
    classes = model.classifier.classes
    best = int(np.argmax(probs))
    confidence = float(probs[best])
    return PredictionRecord(model_version=model.version, label=classes[best], confidence=confidence,
                            probabilities={c: float(p) for c, p in zip(classes, probs)},
                            needs_review=needs_review(confidence, threshold, prepared.cell_in_view),
                            image_sha256=prepared.sha256,
                            latency_ms=latency_ms, image_stats=prepared.stats, embedding=embedding)


def _load_classifier(local_dir: str):
    from hematovision.registry.packaging import load_classifier

    return load_classifier(local_dir)
