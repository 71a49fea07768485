"""The promotion gate and the registry's aliases, against a real MLflow sqlite store."""

from __future__ import annotations

import mlflow
import pytest
from made_up_answers import CLASSES, cells, groups, pair

from hematovision.params import PromoteParams
from hematovision.registry.gate import promote
from hematovision.registry.registry import CHALLENGER, CHAMPION, Registry, RegistryError
from hematovision.registry.tracking import configure_mlflow
from hematovision.settings import get_settings

POLICY = PromoteParams(metric="val_macro_f1", min_improvement=0.0, per_class_tolerance=0.02, floor=0.8)


def scores(macro: float) -> dict[str, float]:
    return {"val_macro_f1": macro, **{f"val_f1_{k}": macro for k in CLASSES}}


ROWS = cells()


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return model_input


def alias(registry: Registry, name: str) -> str | None:
    version = registry.version_by_alias(name)
    return None if version is None else str(version.version)


def _register_run(registry: Registry, val_macro_f1: float) -> str:
    with mlflow.start_run():
        mlflow.log_metrics(scores(val_macro_f1))
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

    # Its logged figure is high, but on the same cells it loses monocytes: refused.
    worse = _register_run(registry, 0.99)
    champion_wrong = groups(ROWS, "eosinophil", 7) + groups(ROWS, "neutrophil", 7)
    refused = promote(registry, worse, POLICY, paired=pair(ROWS, champion_wrong, groups(ROWS, "monocyte", 2)))
    assert not refused.passed
    assert any("monocyte" in r for r in refused.reasons)
    assert alias(registry, CHAMPION) == first  # the champion did not move
    assert "REFUSED" in registry.get_version(worse).tags["gate"]
    # No answers on the same images: nothing to compare, refused whatever the logged figures say.
    assert not promote(registry, worse, POLICY).passed

    # A lower logged figure (another split), but a clear win on the same cells: promoted, and
    # the interval is on the version's tag and on its run.
    better = _register_run(registry, 0.80)
    passed = promote(registry, better, POLICY, paired=pair(ROWS, champion_wrong, []))
    assert passed.passed, passed.reasons
    assert alias(registry, CHAMPION) == better
    assert "95% interval [" in registry.get_version(better).tags["gate"]
    run = registry.client.get_run(registry.get_version(better).run_id)
    assert run.data.metrics["gate_val_macro_f1_low"] == passed.intervals["val_macro_f1"].low > 0
    assert "val_macro_f1" in run.data.tags["gate_intervals"]
    paired_csv = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/gate/paired_val.csv")
    assert paired_csv.startswith("path,group,label,champion,challenger") and paired_csv.count("\n") == len(ROWS) + 1

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
    refused = promote(registry, better, POLICY, not_comparable=why, paired=pair(ROWS, groups(ROWS, "monocyte", 9), []))
    assert not refused.passed and why in refused.reasons
    assert alias(registry, CHAMPION) == first
    assert why in registry.get_version(better).tags["gate"]
    forced = promote(registry, better, POLICY, force=True, not_comparable=why)
    assert forced.passed and "forced past the gate" in forced.reasons
    assert alias(registry, CHAMPION) == better
