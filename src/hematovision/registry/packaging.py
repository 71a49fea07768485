"""The trained classifier as an MLflow model (pyfunc), so any MLflow tool can load and serve it.

The pyfunc delegates to :class:`hematovision.model.classifier.Classifier`, whose code travels with the model
(``code_paths``), so ``mlflow models serve`` of a registered version runs the same preprocessing
(decode, white-cell localisation) as training and the BentoML service.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

import mlflow.pyfunc
import pandas as pd

import hematovision
from hematovision.model.classifier import CONFIG_FILE, Answers, Classifier

ARTIFACT_KEY = "classifier"
MODEL_NAME = "model"  # the name of the logged model inside its run


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


def load_classifier(model_uri: str):
    """A :class:`Classifier` from an MLflow model URI (``models:/hematovision@champion``,
    ``runs:/...``) or a local directory holding a saved classifier."""
    local = Path(model_uri)
    if local.is_dir() and (local / CONFIG_FILE).exists():
        return Classifier.load(local)
    path = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    return Classifier.load(path / "artifacts" / ARTIFACT_KEY)
