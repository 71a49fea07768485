"""The service answers with the flavour its version's ``serving_flavour`` tag names.

A real registry (the session's sqlite MLflow store, a model name of this test's own), a real
classifier (ImageNet Lite0 at 64 px under an untrained head: what is checked is which flavour
answers, not how well) and its real int8 export; the serving worker's own watcher and predictor.
"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from hematovision import stores
from hematovision.model.classifier import Classifier, ClassifierConfig
from hematovision.model.export import FULL, INT8, export_int8
from hematovision.model.open_set import UNKNOWN
from hematovision.registry.packaging import FlavourDecision, log_classifier
from hematovision.registry.tracking import configure_mlflow
from hematovision.serving.prediction_log import PredictionStore
from hematovision.serving.predictor import Predictor
from hematovision.serving.swap import ModelWatcher
from hematovision.settings import get_settings

from conftest import BLOOD_CELLS

pytestmark = pytest.mark.e2e  # converts a backbone and loads models from the registry: about a minute

MODEL_NAME = "int8-serving-test"


def test_the_service_answers_with_the_int8_flavour_when_the_tag_says_so_and_full_when_the_export_fails(
    project, tmp_path
):
    settings = get_settings()
    settings = settings.model_copy(
        update={"registry": settings.registry.model_copy(update={"registered_model": MODEL_NAME})}
    )
    configure_mlflow(settings)
    registry = stores.registry(settings)
    classifier = Classifier.new(ClassifierConfig(image_size=64))
    folder = classifier.save(tmp_path / "classifier")
    train = sorted((BLOOD_CELLS / "TRAIN" / "MONOCYTE").iterdir())[:8]
    export = export_int8(classifier, classifier.crops(train))
    with mlflow.start_run():
        model_uri = log_classifier(folder)
    image_path = sorted((BLOOD_CELLS / "TEST" / "MONOCYTE").iterdir())[0]
    image = image_path.read_bytes()

    # The registry found the export level with the full model: the worker serves the export.
    level = registry.register(model_uri, {"data_hash": "test"})
    registry.record_flavour(level, FlavourDecision(INT8, "int8: level (made up for this test)"), export)
    registry.move_champion(level)
    models = ModelWatcher(settings)
    predictor = Predictor(settings, models, store=PredictionStore(tmp_path / "log.sqlite"))
    assert models.poll() == level
    status = models.status()
    assert status["flavour"] == INT8 and status["flavour_error"] is None
    assert status["tags"]["serving_flavour"] == INT8
    answer = predictor.predict([image])[0]
    assert answer["model_version"] == level and answer["model_flavour"] == INT8
    assert answer["label"] in [*classifier.classes, UNKNOWN]
    assert sum(answer["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    assert "hematovision_model_int8 1" in models.prometheus()
    # The same image through the full model of the same version: the export's answer is close.
    full = Classifier.load(folder).predict_images([image_path])[0]
    assert np.abs(np.array(list(answer["probabilities"].values())) - full).max() < 0.25

    # A version whose tag asks for int8 but whose export is broken: its full model serves, and
    # /model says why (the gate judged the full model; the cheaper flavour is only an option).
    broken = registry.register(model_uri, {"data_hash": "test"})
    registry.record_flavour(broken, FlavourDecision(INT8, "int8: made up"), b"not a TensorFlow Lite model")
    registry.move_champion(broken)
    assert models.poll() == broken
    status = models.status()
    assert status["flavour"] == FULL and broken == status["flavour_error"]["version"]
    answer = predictor.predict([image])[0]
    assert answer["model_version"] == broken and answer["model_flavour"] == FULL

    # A version the registry kept on its full model (no tag: every version before this existed).
    plain = registry.register(model_uri, {"data_hash": "test"})
    registry.move_champion(plain)
    assert models.poll() == plain
    assert models.status()["flavour"] == FULL and models.status()["flavour_error"] is None
    assert predictor.predict([image])[0]["model_flavour"] == FULL
