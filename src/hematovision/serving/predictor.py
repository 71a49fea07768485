"""Answering: predictions and Grad-CAM explanations with the served model, and the prediction log.

:class:`Predictor` takes the model a :class:`~hematovision.serving.swap.ModelWatcher` holds (once
per request, so a hot swap never changes a request in flight), prepares the images on the
request's thread, runs them through the shared :class:`~hematovision.serving.batcher.Batcher`, and
logs every answer with its embedding and image statistics (``stores.prediction_log``) for drift
monitoring and the review queue. A full disk never turns an answer into an error.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from hematovision import stores
from hematovision.model.classifier import Answers
from hematovision.model.export import flavour_of
from hematovision.model.gradcam import explain_image
from hematovision.model.open_set import UNKNOWN
from hematovision.serving.batcher import Batcher
from hematovision.serving.images import (
    ImageRejected,
    PreparedImage,
    check_pixel_budget,
    needs_review,
    prepare_image,
)
from hematovision.serving.prediction_log import PredictionRecord, PredictionStore
from hematovision.serving.swap import LoadedModel, ModelWatcher
from hematovision.settings import Settings

logger = logging.getLogger("hematovision.serving.predictor")


class NotReady(RuntimeError):
    """No model is loaded yet."""

    code = "not_ready"


class Predictor:
    """Predictions and explanations with the model ``models`` serves, logged to the prediction log
    (``store``; default: the process' ``stores.prediction_log``)."""

    def __init__(
        self,
        settings: Settings,
        models: ModelWatcher,
        batcher: Batcher | None = None,
        store: PredictionStore | None = None,
    ) -> None:
        self.settings, self.models = settings, models
        serving = self.settings.serving
        self.batcher = batcher or Batcher(serving.max_batch_images, serving.batch_wait_ms / 1000, serving.model_calls)
        self._store = store

    @property
    def store(self) -> PredictionStore:
        """The prediction log, opened at the first request that needs it (then kept: no settings
        lookups on every answer)."""
        if self._store is None:
            self._store = stores.prediction_log(self.settings)
        return self._store

    def predict(self, images: Sequence[bytes], errors: Literal["raise", "return"] = "raise") -> list[dict[str, Any]]:
        """One dict per image: label, confidence, probabilities, model_version, model_flavour (``full``
        or ``int8``: which of the version's flavours answered), prediction_id, needs_review,
        cell_in_view (whole / cut / none). A bad image raises :class:`ImageRejected`
        (``errors="raise"``) or is answered in place by ``{"error": code, "detail": message}``
        (``errors="return"``). Images that together declare more than ``max_request_pixels``
        refuse the whole request (``too_many_pixels``), before any is decoded."""
        model = self.models.current  # grabbed once: a swap during this request does not affect it
        if model is None:
            loading = self.models.loading
            raise NotReady("no model loaded yet" + (f" (loading version {loading})" if loading else ""))
        check_pixel_budget(images, self.settings.serving.max_request_pixels)
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
            answers = self.batcher.submit(model.classifier, [p for _, p in good])
            latency_ms = (time.perf_counter() - started) * 1000  # per request: the whole batch's time
            records = []
            for row, (index, prepared) in enumerate(good):
                record = _record(
                    model,
                    prepared,
                    answers.rows(slice(row, row + 1)),
                    latency_ms,
                    self.settings.serving.review_threshold,
                )
                records.append(record)
                results[index] = {
                    "label": record.label,
                    "confidence": record.confidence,
                    "probabilities": record.probabilities,
                    "unknown": record.label == UNKNOWN,
                    "open_set_score": record.open_set_score,
                    "model_version": model.version,
                    "model_flavour": flavour_of(model.classifier),
                    "prediction_id": record.id,
                    "needs_review": record.needs_review,
                    "cell_in_view": prepared.cell_in_view,
                }
            self._log(records, [images[i] for i, _ in good])
        return results  # type: ignore[return-value]

    def explain(
        self, data: bytes | None = None, prediction_id: str | None = None, class_name: str | None = None
    ) -> dict[str, Any]:
        """Grad-CAM overlay (PNG bytes) for an image, or for a logged prediction whose image was
        retained; ``class_name`` explains that class instead of the predicted one."""
        model = self.models.current
        if model is None:
            raise NotReady("no model loaded yet")
        if data is None:
            data = self._retained_image(prediction_id)
        check_pixel_budget([data], self.settings.serving.max_request_pixels)
        prepare_image(data)  # the same format and decode checks as /predict, with the same errors
        classes = list(model.classifier.classes)
        class_index = None
        if class_name:
            if class_name.lower() not in classes:
                raise ImageRejected("unknown_class", f"class_name must be one of {', '.join(classes)}")
            class_index = classes.index(class_name.lower())
        explanation = explain_image(model.classifier, data, class_index)
        return {
            "png": explanation.png,
            "label": explanation.label,
            "explained_class": classes[explanation.class_index],
            "confidence": float(explanation.probabilities[explanation.label]),
            "model_version": model.version,
        }

    def _retained_image(self, prediction_id: str | None) -> bytes:
        if not prediction_id:
            raise ImageRejected("missing_image", "send the image as file field 'image', or a 'prediction_id'")
        record = self.store.get(str(prediction_id))
        if record is None:
            raise ImageRejected("unknown_prediction", f"no prediction with id {prediction_id!r}")
        image = self.store.image(record["image_sha256"])  # the log's image store: any replica's image
        if image is None:  # never kept, or purged by a retention pass (perhaps since the row was read)
            raise ImageRejected(
                "image_not_retained",
                "this prediction's image was not kept (retain_images_days is 0 "
                "or it was purged); send the image itself",
            )
        return image

    def _log(self, records: list[PredictionRecord], images: list[bytes]) -> None:
        try:
            self.store.log_many(records, images)
        except Exception:
            logger.exception("could not log %d predictions", len(records))


def _record(
    model: LoadedModel, prepared: PreparedImage, answer: Answers, latency_ms: float, threshold: float
) -> PredictionRecord:
    """One image's answer as logged: a cell beyond the model's open-set threshold is ``unknown``
    (its probabilities still say which of the classes it resembles) and always goes to review."""
    classes = model.classifier.classes
    probs = answer.probabilities[0]
    label = answer.labels(classes)[0]
    confidence = float(probs.max())
    score = float(answer.open_set_scores[0])
    return PredictionRecord(
        model_version=model.version,
        label=label,
        confidence=confidence,
        probabilities={c: float(p) for c, p in zip(classes, probs)},
        needs_review=label == UNKNOWN or needs_review(confidence, threshold, prepared.cell_in_view),
        image_sha256=prepared.sha256,
        latency_ms=latency_ms,
        image_stats=prepared.stats,
        embedding=answer.embeddings[0],
        open_set_score=score if np.isfinite(score) else None,
    )
