"""The training flow's register step builds every version's int8 flavour and records the decision on
the same version and run (the session's quick-profile model: a handful of validation cells)."""

from __future__ import annotations

import dataclasses
import hashlib

import mlflow
import pytest

from hematovision import stores
from hematovision.params import load_params
from hematovision.registry.packaging import FLAVOUR_EVIDENCE_TAG, FLAVOUR_TAG, INT8_ARTIFACT, INT8_SHA256_TAG
from hematovision.settings import get_settings
from hematovision.training.steps import int8_flavour_step

pytestmark = pytest.mark.e2e


def test_registering_a_version_builds_its_int8_flavour_and_decides_on_the_validation_cells(project, trained):
    settings = get_settings()
    registry = stores.registry(settings)
    version = registry.get_version(trained["version"])
    # The quick project validates on 8 cells: too few for the comparison (promote.min_shared_cells),
    # so the full model serves, and the tag says why.
    assert version.tags[FLAVOUR_TAG] == "full"
    assert "fewer than the 20 needed" in version.tags[FLAVOUR_EVIDENCE_TAG]
    exported = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=INT8_ARTIFACT)
    data = open(exported, "rb").read()
    assert hashlib.sha256(data).hexdigest() == version.tags[INT8_SHA256_TAG]
    assert data[4:8] == b"TFL3"  # a TensorFlow Lite flatbuffer
    metrics = registry.client.get_run(version.run_id).data.metrics
    assert metrics["int8_val_accuracy_cells"] == 8

    # With the gate's cell minimum lowered, the same step decides on the interval itself, and the
    # version's lineage tags are untouched.
    params = load_params(project / "params.yaml")
    params.promote = dataclasses.replace(params.promote, min_shared_cells=1)
    result = int8_flavour_step(settings, params, str(version.version))
    again = registry.get_version(version.version)
    assert again.tags[FLAVOUR_TAG] == result["flavour"] and "interval [" in again.tags[FLAVOUR_EVIDENCE_TAG]
    expected = "int8" if result["int8_val_accuracy_low"] > -params.export.max_accuracy_loss else "full"
    assert result["flavour"] == expected
    assert again.tags["data_hash"] == version.tags["data_hash"] and again.tags["run_id"] == version.run_id
