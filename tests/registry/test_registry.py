"""The promotion gate and the registry's aliases, against a real MLflow sqlite store."""

from __future__ import annotations

import mlflow
import pytest

from hematovision.params import PromoteParams
from hematovision.registry.gate import gate, promote
from hematovision.registry.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from hematovision.registry.tracking import configure_mlflow
from hematovision.settings import get_settings

POLICY = PromoteParams(metric="val_macro_f1", min_improvement=0.0, per_class_tolerance=0.02, floor=0.8)


def scores(macro: float, **per_class: float) -> dict[str, float]:
    f1 = {"eosinophil": macro, "lymphocyte": macro, "monocyte": macro, "neutrophil": macro, **per_class}
    return {"val_macro_f1": macro, **{f"val_f1_{k}": v for k, v in f1.items()}}


def test_first_model_must_reach_the_floor():
    assert gate(scores(0.85), None, POLICY).passed
    refused = gate(scores(0.75), None, POLICY)
    assert not refused.passed
    assert "floor" in refused.reasons[0]


def test_gate_refuses_a_model_that_does_not_beat_the_champion():
    decision = gate(scores(0.90), scores(0.91), POLICY)
    assert not decision.passed
    assert any("does not beat champion" in r for r in decision.reasons)


def test_gate_refuses_a_per_class_regression_even_when_the_average_improves():
    challenger = scores(0.93, monocyte=0.80)
    champion = scores(0.90, monocyte=0.88)
    decision = gate(challenger, champion, POLICY)
    assert not decision.passed
    assert any("monocyte F1 drops" in r for r in decision.reasons)


def test_gate_passes_a_better_model_within_tolerance():
    decision = gate(scores(0.93, lymphocyte=0.895), scores(0.90), POLICY)
    assert decision.passed, decision.reasons


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def alias(registry: Registry, name: str) -> str | None:
    version = registry.version_by_alias(name)
    return None if version is None else str(version.version)


def _register_run(registry: Registry, val_macro_f1: float, monocyte: float | None = None) -> str:
    with mlflow.start_run():
        mlflow.log_metrics(scores(val_macro_f1, **({"monocyte": monocyte} if monocyte is not None else {})))
        info = mlflow.pyfunc.log_model(name="model", python_model=_Constant(), pip_requirements=["mlflow"])
    return registry.register(info.model_uri, {"data_hash": "test"})


def test_promote_refuse_and_rollback_in_a_real_registry(project):
    settings = get_settings()
    registry = Registry("registry-test", configure_mlflow(settings))

    first = _register_run(registry, 0.85)
    assert alias(registry, CHALLENGER) == first
    assert promote(registry, first, POLICY).passed
    assert alias(registry, CHAMPION) == first
    assert registry.version_by_alias(CHALLENGER) is None  # the challenger became the champion

    worse = _register_run(registry, 0.95, monocyte=0.50)
    refused = promote(registry, worse, POLICY)
    assert not refused.passed
    assert any("monocyte" in r for r in refused.reasons)
    assert alias(registry, CHAMPION) == first  # the champion did not move
    assert "REFUSED" in registry.get_version(worse).tags["gate"]

    better = _register_run(registry, 0.90)
    assert promote(registry, better, POLICY).passed
    assert alias(registry, CHAMPION) == better

    assert registry.rollback() == (better, first)
    assert alias(registry, CHAMPION) == first
    with pytest.raises(RegistryError, match="nothing to roll back to"):
        registry.rollback()

    with pytest.raises(RegistryError, match="no version 99"):
        promote(registry, "99", POLICY)


def test_a_champion_that_cannot_be_compared_is_replaced_only_by_hand(project):
    settings = get_settings()
    registry = Registry("registry-not-comparable", configure_mlflow(settings))
    first = _register_run(registry, 0.85)
    assert promote(registry, first, POLICY).passed
    assert registry.trained_on(first) is None  # no training-image list logged: unknown, not "none"

    better = _register_run(registry, 0.99)
    why = "champion was trained on pictures of 3 of this run's 9 validation cells"
    refused = promote(registry, better, POLICY, not_comparable=why)
    assert not refused.passed and why in refused.reasons
    assert alias(registry, CHAMPION) == first
    assert why in registry.get_version(better).tags["gate"]
    forced = promote(registry, better, POLICY, force=True, not_comparable=why)
    assert forced.passed and "forced past the gate" in forced.reasons
    assert alias(registry, CHAMPION) == better
