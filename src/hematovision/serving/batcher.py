"""The model call, and adaptive batching of it across concurrent requests.

On CPU the backbone goes furthest on full batches, but a request must not wait for company that
never comes: :class:`Batcher` takes whatever has queued up within a few milliseconds into one call,
and runs a few calls at once, each on its share of the cores (:func:`share_cores_between_model_calls`).
``benchmarks/serving.py`` measures the settings that govern it (``serving.max_batch_images``,
``serving.batch_wait_ms``, ``serving.model_calls``).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from typing import Any

import numpy as np

from hematovision.data.localize import crop_wbc
from hematovision.model.classifier import Answers
from hematovision.serving.images import PreparedImage

logger = logging.getLogger("hematovision.serving.batcher")


def run_model(classifier, images: Sequence[PreparedImage]) -> Answers:
    """Probabilities, embeddings and open-set verdicts, one row per image (crop -> backbone -> head,
    test-time views as the model was configured)."""
    size = classifier.config.image_size
    crops = np.stack([p.crop if p.crop is not None and p.crop.shape[0] == size else _crop(p, size) for p in images])
    return classifier.predict_answers(crops)


def _crop(prepared: PreparedImage, size: int) -> np.ndarray:
    if prepared.rgb is None:  # prepared for another input size, and the picture is gone
        raise ValueError(f"image prepared with a {prepared.crop.shape[0]} px crop; this model takes {size} px")
    return crop_wbc(np.asarray(prepared.rgb), size)


def share_cores_between_model_calls(calls: int) -> None:
    """Give each of ``calls`` concurrent model calls its share of this machine's cores (TensorFlow
    would give every call all of them). Must run before TensorFlow's first operation; later it
    cannot change anything, which is logged."""
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
    Under no load a request runs alone at once; under load the backbone sees full batches. A request
    brings the classifier it started with, so a batch is grouped by classifier and a hot swap never
    changes the model of a request in flight."""

    def __init__(self, max_batch: int = 32, max_wait_s: float = 0.005, calls: int = 1) -> None:
        self.max_batch, self.max_wait_s = max_batch, max_wait_s
        self._queue: list[tuple[Any, list[PreparedImage], Future]] = []
        self._cond = threading.Condition()
        # ``calls`` threads take batches in turn, so that many model calls can run at once.
        self._threads = [threading.Thread(target=self._run, name=f"batcher-{i}", daemon=True) for i in range(calls)]
        for thread in self._threads:
            thread.start()

    def submit(self, classifier, images: list[PreparedImage]) -> Answers:
        """The answers of ``classifier`` for ``images``, once their batch has run."""
        future: Future = Future()
        with self._cond:
            self._queue.append((classifier, images, future))
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
            for classifier in {id(c): c for c, _, _ in taken}.values():
                group = [(images, future) for c, images, future in taken if c is classifier]
                try:
                    answers = run_model(classifier, [p for images, _ in group for p in images])
                except BaseException as error:  # noqa: BLE001 - hand the failure to the waiting requests
                    for _, future in group:
                        future.set_exception(error)
                    continue
                start = 0
                for images, future in group:
                    future.set_result(answers.rows(slice(start, start + len(images))))
                    start += len(images)
