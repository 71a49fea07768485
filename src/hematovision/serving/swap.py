"""Hot swap: which model a serving worker answers with, kept in step with the registry alias.

Each serving worker owns one :class:`ModelWatcher`. Its thread polls the alias; when it moves, the
watcher fetches the new version, loads it, warms it and checks it on a built-in synthetic cell, and
only then swaps it in with one reference assignment. A request grabs the reference once
(:attr:`ModelWatcher.current`), so requests in flight finish on the model they started with. A
version that fails to load or fails the check is refused and remembered, and the old model keeps
serving; so does an unreachable registry. A refusal for a passing reason (out of memory or disk, a
network error: :func:`passing_failure`) is retried after a back-off that doubles each time
(``retry_seconds``, at most an hour); a version that loads but fails the check stays refused.
``/model`` says which. Plain Python, so it can be tested without BentoML.

A version whose ``serving_flavour`` tag says ``int8`` is served by its int8 export (the same
classifier with the backbone run by TensorFlow Lite: ``model/export.py``), fetched from the
version's run and checked like any model; if the export cannot be fetched, loaded or fails the
check, the version's full model serves instead (``/model``'s ``flavour_error`` says why).
"""

from __future__ import annotations

import io
import logging
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import mlflow
import numpy as np
from mlflow.exceptions import MlflowException
from PIL import Image

from hematovision import stores
from hematovision.model.export import INT8, Int8Classifier, flavour_of
from hematovision.registry.packaging import ARTIFACT_KEY, FLAVOUR_TAG, INT8_SHA256_TAG, download_int8, load_classifier
from hematovision.registry.registry import Registry
from hematovision.serving.batcher import run_model
from hematovision.serving.images import prepare_image
from hematovision.serving.prediction_log import utc_now
from hematovision.settings import Settings, get_settings

logger = logging.getLogger("hematovision.serving.swap")
# A refused version that failed for a passing reason is tried again after this many polls (doubling
# with each failure, at most MAX_RETRY_SECONDS).
RETRY_POLLS = 12
MAX_RETRY_SECONDS = 3600.0
# TensorFlow's out-of-memory and transport errors, by name: importing TensorFlow here to name them
# would load it in every process that imports this module.
_PASSING_ERROR_NAMES = frozenset({"ResourceExhaustedError", "UnavailableError", "DeadlineExceededError"})


def passing_failure(error: BaseException) -> bool:
    """Whether a failure to load a version may pass by itself (memory, disk, network: OSError covers
    ConnectionError, TimeoutError and requests' errors), so the version deserves another try; a
    version that loads and then fails the sanity check is wrong in itself."""
    return isinstance(error, (OSError, MemoryError)) or type(error).__name__ in _PASSING_ERROR_NAMES


def sanity_image() -> bytes:
    """A synthetic smear (pink background, violet nucleus) as PNG: exercises decode, localisation
    and both sub-models without shipping a patient image in the code."""
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
        answers = run_model(classifier, [image] * n)
    probabilities, embeddings = answers.probabilities, answers.embeddings
    if probabilities.shape != (4, len(classifier.classes)):
        raise ValueError(f"output shape {probabilities.shape} does not match {len(classifier.classes)} classes")
    if not (np.isfinite(probabilities).all() and np.isfinite(embeddings).all()):
        raise ValueError("non-finite output on the sanity image")
    if not np.allclose(probabilities.sum(axis=1), 1.0, atol=1e-3) or (probabilities < 0).any():
        raise ValueError(f"probabilities do not sum to 1: {probabilities.sum(axis=1)}")


@dataclass(frozen=True)
class LoadedModel:
    classifier: Any
    version: str
    loaded_at: str
    registry: dict[str, Any] = field(default_factory=dict)  # tags, metrics, run id of the version

    @property
    def flavour(self) -> str:
        """Which flavour answers: ``int8`` (the export) or ``full``."""
        return flavour_of(self.classifier)


class RegistrySource:
    """Where versions come from: the platform's registry (``stores.registry``), opened at first use."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._registry: Registry | None = None

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = stores.registry(self.settings)
        return self._registry

    def resolve(self, alias: str) -> str | None:
        """The version the alias points at (None: no such alias); raises if the store is unreachable."""
        registry = self.registry
        try:
            version = registry.client.get_model_version_by_alias(registry.name, alias)
        except MlflowException as error:
            if error.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
                return None
            raise
        return str(version.version)

    def describe(self, version: str) -> dict[str, Any]:
        registry = self.registry
        mv = registry.get_version(version)
        return {
            "name": registry.name,
            "version": str(mv.version),
            "run_id": mv.run_id,
            "source": mv.source,
            "tags": dict(mv.tags),
            "aliases": list(mv.aliases),
            "data_hash": mv.tags.get("data_hash"),
            "metrics": registry.metrics_of(version),
        }

    def download(self, version: str, into: str) -> str:
        """Fetch the version's artifacts into ``into``; returns the saved classifier's folder."""
        registry = self.registry  # stores.registry points MLflow's artifact downloads at it
        uri = f"models:/{registry.name}/{version}"
        return f"{mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=into)}/artifacts/{ARTIFACT_KEY}"

    def download_int8(self, info: dict[str, Any], into: str) -> bytes:
        """The int8 export the registry compared for the version ``info`` describes (its run's
        artifact, checked against the version's ``int8_sha256`` tag)."""
        _ = self.registry  # opening it points MLflow's artifact downloads at the registry
        return download_int8(info["run_id"], into, info.get("tags", {}).get(INT8_SHA256_TAG)).read_bytes()


class ModelWatcher:
    """The model one serving worker answers with, and the thread that keeps it current."""

    def __init__(
        self,
        settings: Settings | None = None,
        source: RegistrySource | None = None,
        load: Callable[[str], Any] | None = None,
        retry_seconds: float | None = None,
        check: Callable[[Any], None] | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        # First back-off of a version refused for a passing reason (default RETRY_POLLS polls).
        self.retry_seconds = (
            retry_seconds if retry_seconds is not None else RETRY_POLLS * self.settings.serving.alias_poll_seconds
        )
        self._check = check or check_classifier
        self.alias = self.settings.serving.alias
        self.source = source or RegistrySource(self.settings)
        self._load = load or load_classifier
        self._current: LoadedModel | None = None
        self._refused: dict[str, dict[str, Any]] = {}
        self._retry_at: dict[str, float] = {}  # version -> monotonic time of its next try (passing failures)
        self._loading: str | None = None
        self._flavour_error: dict[str, str] | None = None  # why the version's int8 flavour is not serving
        self._last_error: dict[str, str] | None = None
        self._last_poll: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._poll_lock = threading.Lock()

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> ModelWatcher:
        """Start the watcher thread (its first poll loads the model); returns at once."""
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
            except Exception:
                logger.exception("model watcher: unexpected error")
            self._stop.wait(self.settings.serving.alias_poll_seconds)

    @property
    def watching(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # --- what is served ------------------------------------------------------------------------
    @property
    def current(self) -> LoadedModel | None:
        """The model to answer with; read it once per request (a swap replaces it, never mutates it)."""
        return self._current

    @property
    def loading(self) -> str | None:
        """The version being fetched, loaded and checked right now, if any."""
        return self._loading

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def version(self) -> str | None:
        current = self._current
        return None if current is None else current.version

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
            elif version != self.version and self._may_try(version):
                self._swap_to(version)
            return self.version

    def _may_try(self, version: str) -> bool:
        """Not refused, or refused for a passing reason whose back-off is over."""
        if version not in self._refused:
            return True
        retry_at = self._retry_at.get(version)
        return retry_at is not None and time.monotonic() >= retry_at

    def _swap_to(self, version: str) -> None:
        self._loading = version
        workdir = tempfile.mkdtemp(prefix=f"hematovision-v{version}-")  # Keras reads the files at load
        try:
            try:  # fetching: failures are the store's, retried at the next poll
                info = self.source.describe(version)
                local = self.source.download(version, workdir)
            except Exception as error:  # noqa: BLE001 - any store failure: retried at the next poll
                self._error(f"cannot fetch version {version}: {type(error).__name__}: {error}")
                return
            try:  # loading and checking: failures are the version's, remembered
                started = time.perf_counter()
                classifier = self._load(local)
                flavoured, flavour_error = self._flavoured(version, info, classifier, workdir)
                if flavoured is None:
                    self._check(classifier)
                else:
                    classifier = flavoured
            except Exception as error:  # noqa: BLE001 - any failure refuses the version, not the worker
                self._refuse(version, error)
                return
            previous = self.version
            self._current = LoadedModel(classifier, version, utc_now(), info)  # the atomic swap
            self._flavour_error = flavour_error
            self._last_error = None
            self._refused.pop(version, None)  # a passing failure that passed
            self._retry_at.pop(version, None)
            logger.info(
                "now serving model version %s (%s; was %s); loaded and checked in %.1f s",
                version,
                self._current.flavour,
                previous,
                time.perf_counter() - started,
            )
        finally:
            self._loading = None
            shutil.rmtree(workdir, ignore_errors=True)

    def _flavoured(self, version: str, info: dict[str, Any], classifier, workdir: str):
        """The version's int8 flavour, checked, when its tag asks for it, or None to serve the full
        model (not asked, or the export failed: the full model is the one the gate judged), with
        why it failed (None if it did not)."""
        if info.get("tags", {}).get(FLAVOUR_TAG) != INT8:
            return None, None
        try:
            int8 = Int8Classifier.from_classifier(classifier, self.source.download_int8(info, workdir))
            self._check(int8)
            return int8, None
        except Exception as error:  # noqa: BLE001 - the full model of the same version serves instead
            reason = f"{type(error).__name__}: {error}"[:500]
            logger.error("version %s: int8 flavour not served, serving its full model: %s", version, reason)
            return None, {"version": version, "reason": reason, "at": utc_now()}

    def _refuse(self, version: str, error: BaseException) -> None:
        reason = f"{type(error).__name__}: {error}"[:500]
        passing = passing_failure(error)
        attempts = self._refused.get(version, {}).get("attempts", 0) + 1
        retry_at = None
        if passing:
            delay = min(self.retry_seconds * 2 ** (attempts - 1), MAX_RETRY_SECONDS)
            self._retry_at[version] = time.monotonic() + delay
            retry_at = datetime.fromtimestamp(time.time() + delay, UTC).isoformat(timespec="milliseconds")
        else:
            self._retry_at.pop(version, None)
        self._refused[version] = {
            "reason": reason,
            "at": utc_now(),
            "passing": passing,  # true: out of memory/disk, network; tried again at retry_at
            "retry_at": retry_at,  # None: refused for good (fails to load or the sanity check)
            "attempts": attempts,
        }
        logger.error(
            "refused model version %s (still serving %s)%s: %s",
            version,
            self.version,
            f", will retry at {retry_at}" if passing else "",
            reason,
        )

    def _error(self, message: str) -> None:
        if self._last_error is None or self._last_error["message"] != message:
            logger.warning("%s; serving version %s", message, self.version)
        self._last_error = {"message": message, "at": utc_now()}

    # --- reporting -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """What ``GET /model`` answers: the served version, its registry facts, refusals, polling."""
        current = self._current
        info = current.registry if current else {}
        return {
            "ready": current is not None,
            "model": self.settings.registry.registered_model,
            "alias": self.alias,
            "version": self.version,
            "flavour": current.flavour if current else None,
            "flavour_error": self._flavour_error,
            "loaded_at": current.loaded_at if current else None,
            "data_hash": info.get("data_hash"),
            "run_id": info.get("run_id"),
            "metrics": info.get("metrics", {}),
            "tags": info.get("tags", {}),
            "classes": list(current.classifier.classes) if current else [],
            "loading": self._loading,
            "refused": {version: dict(entry) for version, entry in self._refused.items()},
            "last_error": self._last_error,
            "last_poll_at": self._last_poll,
            "poll_seconds": self.settings.serving.alias_poll_seconds,
            "review_threshold": self.settings.serving.review_threshold,
        }

    def prometheus(self) -> str:
        """Gauges appended to BentoML's /metrics (this worker's view)."""
        refused = len(self._refused)
        current = self._current
        version = None if current is None else current.version
        return (
            "# HELP hematovision_model_version Registry version of the model being served (0: none).\n"
            "# TYPE hematovision_model_version gauge\n"
            f"hematovision_model_version {int(version) if version and version.isdigit() else 0}\n"
            "# HELP hematovision_model_ready 1 when a checked model is loaded.\n"
            "# TYPE hematovision_model_ready gauge\n"
            f"hematovision_model_ready {int(self.ready)}\n"
            "# HELP hematovision_model_int8 1 when the served version answers with its int8 export.\n"
            "# TYPE hematovision_model_int8 gauge\n"
            f"hematovision_model_int8 {int(current is not None and current.flavour == INT8)}\n"
            "# HELP hematovision_model_refused Versions this worker refused to serve.\n"
            "# TYPE hematovision_model_refused gauge\n"
            f"hematovision_model_refused {refused}\n"
        )
