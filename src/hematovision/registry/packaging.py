"""The trained classifier as an MLflow model (pyfunc), so any MLflow tool can load and serve it.

The pyfunc delegates to :class:`hematovision.model.classifier.Classifier`, whose code travels with the model
(``code_paths``), so ``mlflow models serve`` of a registered version runs the same preprocessing
(decode, white-cell localisation) as training and the BentoML service.

A version may also hold a cheaper *flavour* of itself: its backbone exported to int8
(``model/export.py``), logged in the version's own run (``INT8_ARTIFACT``), so it shares the run,
lineage tags and gate of the full model. :func:`choose_flavour` decides on the paired comparison
of both on the validation cells which one serves; the version's ``serving_flavour`` tag says it
(``Registry.record_flavour``). The pyfunc always answers with the full model.
"""

from __future__ import annotations

import base64
import hashlib
import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

import hematovision
from hematovision.model.classifier import CONFIG_FILE, Answers, Classifier
from hematovision.model.export import FLAVOURS, FULL, INT8, INT8_FILE, Int8Classifier
from hematovision.params import ExportParams, PromoteParams
from hematovision.registry.paired import PairedDifference, paired_difference

ARTIFACT_KEY = "classifier"
MODEL_NAME = "model"  # the name of the logged model inside its run
EXPORT_DIR = "export"  # in the version's run
INT8_ARTIFACT = f"{EXPORT_DIR}/{INT8_FILE}"
FLAVOUR_TAG = "serving_flavour"  # on the version: which flavour the service answers with (full | int8)
FLAVOUR_EVIDENCE_TAG = "serving_flavour_evidence"  # why: the paired interval, or why there is none
INT8_SHA256_TAG = "int8_sha256"  # the export that was compared: serving refuses any other file
FLAVOUR_METRIC = "val_accuracy"  # compared paired on the validation cells (export.max_accuracy_loss)


class PyfuncClassifier(mlflow.pyfunc.PythonModel):
    """Input: a DataFrame with an ``image`` column of encoded image bytes (or base64 text).
    Output: one row per image with ``label`` (a class, or ``unknown`` beyond the model's open-set
    threshold), ``confidence``, ``open_set_score`` and ``p_<class>`` columns."""

    def load_context(self, context) -> None:
        self.classifier = Classifier.load(Path(context.artifacts[ARTIFACT_KEY]))

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        images = [value if isinstance(value, bytes) else base64.b64decode(value) for value in model_input["image"]]
        answers = self.classifier.predict_answers(self.classifier.crops(images))
        return probability_frame(answers, self.classifier.classes)


def probability_frame(answers: Answers, classes: list[str]) -> pd.DataFrame:
    probabilities = answers.probabilities
    frame = pd.DataFrame(probabilities, columns=[f"p_{name}" for name in classes])
    frame.insert(0, "open_set_score", answers.open_set_scores.astype(float))
    frame.insert(0, "confidence", probabilities.max(axis=1) if len(probabilities) else [])
    frame.insert(0, "label", answers.labels(classes))
    return frame


def log_classifier(classifier_dir: Path) -> str:
    """Log the saved classifier in the active run; returns the model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    classes = json.loads((Path(classifier_dir) / CONFIG_FILE).read_text())["classes"]
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [ColSpec("string", "label"), ColSpec("double", "confidence"), ColSpec("double", "open_set_score")]
            + [ColSpec("double", f"p_{c}") for c in classes]
        ),
    )
    info = mlflow.pyfunc.log_model(
        name=MODEL_NAME,
        python_model=PyfuncClassifier(),
        artifacts={ARTIFACT_KEY: str(classifier_dir)},
        code_paths=[str(Path(hematovision.__file__).parent)],
        signature=signature,
        # Explicit, pinned requirements: inferring them would load the model in a subprocess (slow).
        pip_requirements=_pinned_requirements(),
    )
    return info.model_uri


def _pinned_requirements() -> list[str]:
    from importlib.metadata import version

    names = [
        "tensorflow-cpu",
        "keras",
        "numpy",
        "pandas",
        "pillow",
        "scipy",
        "scikit-learn",
        "pydantic-settings",
        "pyyaml",
    ]
    return [f"{name}=={version(name)}" for name in names] + [f"mlflow=={version('mlflow')}"]


def load_classifier(model_uri: str, flavour: str = FULL):
    """A :class:`Classifier` from an MLflow model URI (``models:/hematovision@champion``,
    ``runs:/...``) or a local directory holding a saved classifier. ``flavour="int8"``: the same
    model answering with its int8 export (the version's run's ``INT8_ARTIFACT``; for a local
    directory, its ``backbone_int8.tflite``)."""
    if flavour not in FLAVOURS:
        raise ValueError(f"flavour must be one of {', '.join(FLAVOURS)}, not {flavour!r}")
    local = Path(model_uri)
    if local.is_dir() and (local / CONFIG_FILE).exists():
        return Int8Classifier.load_export(local, local / INT8_FILE) if flavour == INT8 else Classifier.load(local)
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    classifier = Classifier.load(path / "artifacts" / ARTIFACT_KEY)
    if flavour == FULL:
        return classifier
    run_id = mlflow.models.get_model_info(model_uri).run_id
    with tempfile.TemporaryDirectory() as folder:
        return Int8Classifier.from_classifier(classifier, download_int8(run_id, folder).read_bytes())


def download_int8(run_id: str, into: str | Path, sha256: str | None = None) -> Path:
    """The run's int8 export, fetched into ``into``; with ``sha256``, refused unless it is that file
    (the export the registry compared, not one logged over it later)."""
    path = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=INT8_ARTIFACT, dst_path=str(into)))
    if sha256 and hashlib.sha256(path.read_bytes()).hexdigest() != sha256:
        raise ValueError(f"run {run_id}'s {INT8_ARTIFACT} is not the export the registry compared ({sha256[:12]})")
    return path


@dataclass(frozen=True)
class FlavourDecision:
    """Which flavour of a version serves, and the evidence: the paired difference of the int8
    export's validation accuracy and the full model's (int8 - full) on the same cells."""

    flavour: str
    reason: str
    comparison: PairedDifference | None = None

    def tags(self) -> dict[str, str]:
        return {FLAVOUR_TAG: self.flavour, FLAVOUR_EVIDENCE_TAG: self.reason[:5000]}

    def figures(self) -> dict[str, float]:
        """Run metrics ``int8_<metric>_full``, ``_int8``, ``_difference``, ``_low``, ``_high``, ``_cells``."""
        if self.comparison is None:
            return {}
        c = self.comparison
        name = f"int8_{c.metric}"
        return {
            f"{name}_full": c.champion,
            f"{name}_int8": c.challenger,
            f"{name}_difference": c.difference,
            f"{name}_low": c.low,
            f"{name}_high": c.high,
            f"{name}_cells": float(c.n_cells),
        }


def choose_flavour(
    paired: pd.DataFrame, classes: Sequence[str], export: ExportParams, bootstrap: PromoteParams
) -> FlavourDecision:
    """int8 when the paired interval of (int8 - full) validation accuracy lies above
    ``-export.max_accuracy_loss``; otherwise, or with fewer cells than the gate needs to judge
    (``promote.min_shared_cells``), the full model. ``paired``: :func:`~hematovision.registry.paired.pair_answers`
    of the full model's answers (as champion) and the export's (as challenger) on the same images."""
    comparison = paired_difference(
        paired,
        FLAVOUR_METRIC,
        classes,
        bootstrap.bootstrap_samples,
        bootstrap.confidence,
        bootstrap.bootstrap_seed,
    )
    evidence = comparison.describe().replace("vs champion", "(int8) vs full")
    if comparison.n_cells < bootstrap.min_shared_cells:
        return FlavourDecision(
            FULL,
            f"full: {comparison.n_cells} validation cells, fewer than the {bootstrap.min_shared_cells} "
            f"needed to judge the int8 export ({evidence})",
            comparison,
        )
    if comparison.low > -export.max_accuracy_loss:
        return FlavourDecision(
            INT8,
            f"int8: not worse than the full model by {export.max_accuracy_loss:.3f} or more: {evidence}",
            comparison,
        )
    return FlavourDecision(
        FULL, f"full: the int8 export may lose {export.max_accuracy_loss:.3f} or more accuracy: {evidence}", comparison
    )
