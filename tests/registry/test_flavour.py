"""Which flavour of a version serves: the int8 export only when the paired comparison with the full
model on the same validation cells does not find it worse by ``export.max_accuracy_loss``. Made-up
answers (as the gate's tests use), and the decision written to a real MLflow sqlite registry."""

from __future__ import annotations

import hashlib

import mlflow
import pytest
from made_up_answers import cells, groups, pair

from hematovision.params import ExportParams, PromoteParams
from hematovision.registry.packaging import (
    FLAVOUR_EVIDENCE_TAG,
    FLAVOUR_TAG,
    INT8_SHA256_TAG,
    FlavourDecision,
    choose_flavour,
    download_int8,
)
from hematovision.registry.registry import Registry
from hematovision.registry.tracking import configure_mlflow
from hematovision.settings import get_settings

CLASSES = ("eosinophil", "lymphocyte", "monocyte", "neutrophil")
ROWS = cells()  # 60 cells of 4 images
EXPORT = ExportParams(int8=True, max_accuracy_loss=0.01)
BOOTSTRAP = PromoteParams()  # 2000 resamples, 95%, seed 0, at least 20 cells


def decide(full_wrong, int8_wrong, rows=ROWS, bootstrap=BOOTSTRAP) -> FlavourDecision:
    # pair() puts its first model in the champion's column: the full model is the reference.
    return choose_flavour(pair(rows, full_wrong, int8_wrong)["val"], CLASSES, EXPORT, bootstrap)


def test_an_export_that_answers_level_with_the_full_model_serves():
    decision = decide(groups(ROWS, "monocyte", 3), groups(ROWS, "monocyte", 3))
    assert decision.flavour == "int8"
    assert decision.comparison.low == decision.comparison.high == 0.0  # the same answers: no difference
    assert "95% interval [+0.0000, +0.0000]" in decision.reason and "60 cells" in decision.reason
    assert decision.tags()[FLAVOUR_TAG] == "int8"


def test_an_export_that_loses_cells_stays_behind_the_full_model():
    # Four monocytes the full model gets right, the export wrong: 6.7 points on 60 cells, an
    # interval that reaches far below -0.01.
    decision = decide([], groups(ROWS, "monocyte", 4))
    assert decision.flavour == "full"
    assert decision.comparison.difference == pytest.approx(-4 / 60)
    assert decision.comparison.low < -EXPORT.max_accuracy_loss
    assert "may lose 0.010 or more" in decision.reason
    figures = decision.figures()
    assert figures["int8_val_accuracy_difference"] == pytest.approx(-4 / 60)
    assert figures["int8_val_accuracy_low"] == decision.comparison.low and figures["int8_val_accuracy_cells"] == 60


def test_a_single_cell_lost_is_within_noise_but_still_too_much_for_a_one_point_margin():
    # One cell of 60 is 1.7 points: the interval's lower bound is below -0.01, so the full model
    # serves, though the gate would call the same difference noise. The margin is the product's
    # (export.max_accuracy_loss), not the noise's.
    decision = decide([], groups(ROWS, "neutrophil", 1))
    assert decision.flavour == "full" and decision.comparison.high >= 0.0


def test_too_few_validation_cells_keep_the_full_model_whatever_they_say():
    few = cells(n_per_class=2)  # 8 cells, all answered alike
    decision = decide([], [], rows=few)
    assert decision.flavour == "full" and "fewer than the 20 needed" in decision.reason
    assert decision.comparison.n_cells == 8


def test_the_decision_export_and_interval_are_stored_on_the_same_version_and_run(project, tmp_path):
    settings = get_settings()
    registry = Registry("flavour-record-test", configure_mlflow(settings))

    class _Constant(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input

    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=["mlflow"])
    version = registry.register(info.model_uri, {"data_hash": "test"})
    export = b"not really a tflite model, but bytes the registry must keep as they are"
    registry.record_flavour(version, decide([], []), export)

    tags = registry.get_version(version).tags
    assert tags[FLAVOUR_TAG] == "int8" and "interval" in tags[FLAVOUR_EVIDENCE_TAG]
    assert tags[INT8_SHA256_TAG] == hashlib.sha256(export).hexdigest()
    assert tags["data_hash"] == "test"  # the lineage the version was registered with is untouched
    metrics = registry.client.get_run(run.info.run_id).data.metrics
    assert metrics["int8_val_accuracy_difference"] == 0.0 and metrics["int8_val_accuracy_cells"] == 60
    fetched = download_int8(run.info.run_id, tmp_path / "ok", tags[INT8_SHA256_TAG])
    assert fetched.read_bytes() == export
    # A file logged over the compared one later is not served as if it had been compared.
    registry.record_flavour(version, decide([], []), b"another export")
    with pytest.raises(ValueError, match="not the export the registry compared"):
        download_int8(run.info.run_id, tmp_path / "other", tags[INT8_SHA256_TAG])
