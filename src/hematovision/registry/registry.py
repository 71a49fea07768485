"""The model registry: register a trained run, move the ``champion`` alias, roll back.

Aliases are the contract with serving: ``champion`` is what the service answers with, ``challenger``
the newest candidate. Every move of ``champion`` is appended to a history tag on the registered
model so that ``rollback`` knows where to go back to, whoever moved it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hematovision.registry.gate import GateDecision
    from hematovision.registry.packaging import FlavourDecision

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
# The data paths a training run trained on (one a line), logged with the run: the gate must know
# whether a champion has seen the cells it would be compared on.
TRAINED_ON_ARTIFACT = "training/train_images.txt"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to)."""


class Registry:
    """Thin, explicit wrapper over MlflowClient for the one registered model the platform serves."""

    def __init__(self, name: str, tracking_uri: str) -> None:
        from mlflow import MlflowClient

        self.name = name
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    # --- reading -------------------------------------------------------------------------------
    def version_by_alias(self, alias: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, alias)
        except MlflowException:
            return None

    def get_version(self, version: str | int):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.name, str(version))
        except MlflowException as error:
            raise RegistryError(f"model {self.name} has no version {version}") from error

    def metrics_of(self, version: str | int) -> dict[str, float]:
        run_id = self.get_version(version).run_id
        return dict(self.client.get_run(run_id).data.metrics) if run_id else {}

    def trained_on(self, version: str | int) -> set[str] | None:
        """The data paths the version's model was trained on: its training run's list, or for a
        version made by retraining its parent's (the backbone it kept was trained on those; the
        raw pictures a retrained head sees are a subset of them). None when nobody recorded it
        (versions from before the list was logged)."""
        from mlflow.exceptions import MlflowException

        visited: set[str] = set()
        version = str(version)
        while version not in visited:
            visited.add(version)
            model_version = self.get_version(version)
            if model_version.run_id:
                with tempfile.TemporaryDirectory() as tmp:
                    try:
                        path = self.client.download_artifacts(model_version.run_id, TRAINED_ON_ARTIFACT, tmp)
                    except (MlflowException, OSError):
                        path = None
                    if path is not None:
                        return set(Path(path).read_text(encoding="utf-8").splitlines())
            parent = model_version.tags.get("parent_version")
            if not parent:
                return None
            version = str(parent)
        return None

    def history(self) -> list[str]:
        from mlflow.exceptions import MlflowException

        try:
            tags = self.client.get_registered_model(self.name).tags
        except MlflowException:
            return []
        return json.loads(tags.get(HISTORY_TAG, "[]"))

    # --- writing -------------------------------------------------------------------------------
    def register(self, model_uri: str, tags: dict[str, str]) -> str:
        """Register a logged model as a new version with the ``challenger`` alias; returns the version."""
        import mlflow

        result = mlflow.register_model(model_uri, self.name, tags=tags)
        self.client.set_registered_model_alias(self.name, CHALLENGER, result.version)
        return str(result.version)

    def record_gate(self, version: str | int, decision: GateDecision) -> None:
        """Write the gate's decision and its reasons on the version (tag ``gate``)."""
        self.client.set_model_version_tag(self.name, str(version), "gate", decision.summary()[:5000])

    def record_flavour(self, version: str | int, decision: FlavourDecision, export: bytes | None = None) -> None:
        """Store a version's int8 export in its own run (same run, lineage and gate as the full
        model), the comparison's figures as run metrics, and the decision as version tags
        (``serving_flavour``, its evidence, the export's sha256)."""
        from hematovision.registry.packaging import EXPORT_DIR, INT8_FILE, INT8_SHA256_TAG

        model_version = self.get_version(version)
        tags = decision.tags()
        if model_version.run_id:
            if export is not None:
                with tempfile.TemporaryDirectory() as folder:
                    path = Path(folder) / INT8_FILE
                    path.write_bytes(export)
                    self.client.log_artifact(model_version.run_id, str(path), EXPORT_DIR)
                tags[INT8_SHA256_TAG] = hashlib.sha256(export).hexdigest()
            for key, value in decision.figures().items():
                self.client.log_metric(model_version.run_id, key, value)
        elif decision.flavour != "full":
            raise RegistryError(f"version {version} has no run to hold its int8 export")
        for key, value in tags.items():
            self.client.set_model_version_tag(self.name, str(version), key, value)

    def rollback(self) -> tuple[str, str]:
        """Move ``champion`` back to the version that held it before; returns (from, to)."""
        history = self.history()
        champion = self.version_by_alias(CHAMPION)
        if champion is None:
            raise RegistryError("there is no champion to roll back from")
        current = str(champion.version)
        earlier = [v for v in history[:-1] if v != current]
        if not earlier:
            raise RegistryError(f"version {current} is the only champion there has been; nothing to roll back to")
        target = earlier[-1]
        self.get_version(target)  # fails clearly if it was deleted
        # Drop the rolled-back version from the history so a second rollback goes further back.
        while history and history[-1] != target:
            history.pop()
        self._write_history(history)
        self.client.set_registered_model_alias(self.name, CHAMPION, target)
        self.client.set_model_version_tag(self.name, current, "rolled_back_at", _now())
        return current, target

    def move_champion(self, version: str) -> None:
        """Point ``champion`` at ``version`` (the gate has decided), remembering the move for rollback."""
        history = self.history() + [version]
        self._write_history(history)
        self.client.set_registered_model_alias(self.name, CHAMPION, version)
        self.client.set_model_version_tag(self.name, version, "promoted_at", _now())
        challenger = self.version_by_alias(CHALLENGER)
        if challenger is not None and str(challenger.version) == version:
            self.client.delete_registered_model_alias(self.name, CHALLENGER)

    def _write_history(self, history: list[str]) -> None:
        self.client.set_registered_model_tag(self.name, HISTORY_TAG, json.dumps(history[-50:]))


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
