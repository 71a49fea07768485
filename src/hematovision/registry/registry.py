"""The model registry: register a trained run, the promotion gate, promote and roll back.

Aliases are the contract with serving: ``champion`` is what the service answers with, ``challenger``
the newest candidate. Every move of ``champion`` is appended to a history tag on the registered
model so that ``rollback`` knows where to go back to, whoever moved it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Mapping

from hematovision import CLASSES
from hematovision.params import PromoteParams

CHAMPION = "champion"
CHALLENGER = "challenger"
HISTORY_TAG = "champion_history"
# The data paths a training run trained on (one a line), logged with the run: the gate must know
# whether a champion has seen the cells it would be compared on.
TRAINED_ON_ARTIFACT = "training/train_images.txt"


class RegistryError(RuntimeError):
    """A registry operation that cannot be done as asked (unknown version, nothing to roll back to)."""


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "REFUSED"
        return f"gate {verdict}: " + "; ".join(self.reasons)


def gate(
    challenger: dict[str, float],
    champion: dict[str, float] | None,
    policy: PromoteParams,
    classes: tuple[str, ...] = CLASSES,
    guards: Mapping[str, float] | None = None,
) -> GateDecision:
    """Decide whether ``challenger`` may replace ``champion`` (metrics of each, measured alike).

    The challenger must beat the champion on the headline metric by more than ``min_improvement``
    and may not lose more than ``per_class_tolerance`` F1 on any class; the first model must reach
    ``floor``. ``guards`` (metric -> largest drop accepted) are metrics the challenger need not win
    on but may not lose more than that on (a retrained model must win on the new site without
    losing on TEST). Every check contributes a reason, so a refusal explains itself.
    """
    metric = policy.metric
    prefix = metric.split("_", 1)[0]
    reasons: list[str] = []
    if metric not in challenger:
        return GateDecision(False, [f"challenger has no {metric} metric"])
    value = challenger[metric]
    if champion is None:
        passed = value >= policy.floor
        reasons.append(f"first model: {metric} {value:.4f} {'>=' if passed else '<'} floor {policy.floor:.4f}")
        return GateDecision(passed, reasons)

    passed = True
    best = champion.get(metric, float("-inf"))
    if value - best > policy.min_improvement:
        reasons.append(f"{metric} {value:.4f} beats champion {best:.4f}")
    else:
        passed = False
        reasons.append(
            f"{metric} {value:.4f} does not beat champion {best:.4f} by more than {policy.min_improvement:.4f}"
        )
    for name in classes:
        key = f"{prefix}_f1_{name}"
        if key not in challenger or key not in champion:
            continue
        drop = champion[key] - challenger[key]
        if drop > policy.per_class_tolerance:
            passed = False
            reasons.append(
                f"{name} F1 drops {drop:.4f} ({champion[key]:.4f} -> {challenger[key]:.4f}),"
                f" more than the tolerance {policy.per_class_tolerance:.4f}"
            )
    if passed:
        reasons.append(f"no class loses more than {policy.per_class_tolerance:.4f} F1")
    for key, tolerance in (guards or {}).items():
        if key not in challenger or key not in champion:
            passed = False
            reasons.append(f"guard {key} cannot be checked: missing for the {'challenger' if key not in challenger else 'champion'}")
            continue
        drop = champion[key] - challenger[key]
        within = drop <= tolerance
        passed = passed and within
        reasons.append(f"{key} {challenger[key]:.4f} vs champion {champion[key]:.4f}: drop {max(drop, 0.0):.4f} "
                       f"{'within' if within else 'MORE than'} the tolerance {tolerance:.4f}")
    return GateDecision(passed, reasons)


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
        import tempfile

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

    def promote(
        self,
        version: str | int,
        policy: PromoteParams,
        force: bool = False,
        *,
        guards: Mapping[str, float] | None = None,
        challenger_metrics: Mapping[str, float] | None = None,
        champion_metrics: Mapping[str, float] | None = None,
        not_comparable: str | None = None,
    ) -> GateDecision:
        """Move ``champion`` to ``version`` if the gate passes (or ``force``); returns the decision.

        The metrics compared are those logged in each version's run, unless given: a retraining run
        scores the champion and the challenger on the same fresh data (the corrections' holdout) and
        passes both, with ``guards`` for what may not get worse (see :func:`gate`).
        ``not_comparable`` says why no fair comparison exists (the champion trained on the
        challenger's validation cells): the gate then refuses with that reason, and only a person
        can promote (``force``)."""
        version = str(self.get_version(version).version)
        champion = self.version_by_alias(CHAMPION)
        if champion is not None and str(champion.version) == version:
            return GateDecision(True, [f"version {version} is already the champion"])
        if champion is not None and not_comparable:
            decision = GateDecision(False, [not_comparable])
        else:
            decision = gate(
                dict(challenger_metrics) if challenger_metrics is not None else self.metrics_of(version),
                (dict(champion_metrics) if champion_metrics is not None else self.metrics_of(champion.version))
                if champion is not None else None,
                policy,
                guards=guards,
            )
        if champion is not None:
            decision.reasons.insert(0, f"challenger v{version} vs champion v{champion.version}")
        if force and not decision.passed:
            decision = GateDecision(True, decision.reasons + ["forced past the gate"])
        self.client.set_model_version_tag(self.name, version, "gate", decision.summary()[:5000])
        if decision.passed:
            self._move_champion(version)
        return decision

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

    def _move_champion(self, version: str) -> None:
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
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
