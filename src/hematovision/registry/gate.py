"""The promotion gate: whether a challenger may replace the champion, and why.

Every promotion goes through here: the training flow's (validation, scored alike for both models),
retraining's (the new site's held-out corrections, with TEST as a guard), an engineer's through the
service or the CLI. A decision carries its reasons; they are printed, written on the version (tag
``gate``) and, for retraining, on the run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import pandas as pd

from hematovision import CLASSES
from hematovision.params import PromoteParams, RetrainParams
from hematovision.registry.registry import CHAMPION, Registry


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
            reasons.append(
                f"guard {key} cannot be checked: missing for the {'challenger' if key not in challenger else 'champion'}"
            )
            continue
        drop = champion[key] - challenger[key]
        within = drop <= tolerance
        passed = passed and within
        reasons.append(
            f"{key} {challenger[key]:.4f} vs champion {champion[key]:.4f}: drop {max(drop, 0.0):.4f} "
            f"{'within' if within else 'MORE than'} the tolerance {tolerance:.4f}"
        )
    return GateDecision(passed, reasons)


def promote(
    registry: Registry,
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
    version = str(registry.get_version(version).version)
    champion = registry.version_by_alias(CHAMPION)
    if champion is not None and str(champion.version) == version:
        return GateDecision(True, [f"version {version} is already the champion"])
    if champion is not None and not_comparable:
        decision = GateDecision(False, [not_comparable])
    else:
        decision = gate(
            dict(challenger_metrics) if challenger_metrics is not None else registry.metrics_of(version),
            (dict(champion_metrics) if champion_metrics is not None else registry.metrics_of(champion.version))
            if champion is not None
            else None,
            policy,
            guards=guards,
        )
    if champion is not None:
        decision.reasons.insert(0, f"challenger v{version} vs champion v{champion.version}")
    if force and not decision.passed:
        decision = GateDecision(True, decision.reasons + ["forced past the gate"])
    registry.record_gate(version, decision)
    if decision.passed:
        registry.move_champion(version)
    return decision


def champion_saw_validation(
    trained_on: set[str] | None, champion: str, manifest: pd.DataFrame, challenger: str
) -> str | None:
    """Why the champion cannot be compared on this run's validation split, or None if it can.

    A champion trained on pictures of a validation cell scores that cell from memory (after the
    switch to cells found by content, an old champion did exactly that on the new validation split).
    A champion whose training images nobody recorded (``trained_on`` None) is compared as before."""
    if trained_on is None:
        return None
    val = manifest[manifest.split == "val"]
    seen = val.group[val.path.isin(trained_on)].nunique()
    if seen == 0:
        return None
    return (
        f"champion v{champion} was trained on pictures of {seen} of this run's {val.group.nunique()} validation "
        f"cells, so validation cannot compare the two; compare them on TEST and promote by hand if the "
        f"challenger is better: hematovision promote {challenger} --force"
    )


def retraining_policy(rp: RetrainParams) -> tuple[PromoteParams, dict[str, float]]:
    """The gate of a retrained challenger: win on ``rp.metric`` (the new site's holdout), lose no more
    than ``rp.guard_tolerance`` on ``rp.guard_metric`` (TEST); no floor (the parent already passed one)."""
    policy = PromoteParams(
        metric=rp.metric, min_improvement=rp.min_improvement, per_class_tolerance=rp.per_class_tolerance, floor=0.0
    )
    return policy, {rp.guard_metric: rp.guard_tolerance}


def retraining_refusal(
    n_holdout: int, rp: RetrainParams, champion: str | None, parent: str, promote: bool
) -> GateDecision | None:
    """Why a retrained challenger cannot be judged at all, or None when it can."""
    if n_holdout < rp.min_holdout:
        return GateDecision(
            False,
            [
                f"only {n_holdout} held-out corrections (retrain.min_holdout {rp.min_holdout}): "
                "the new site cannot be judged"
            ],
        )
    if champion is None or champion != parent:
        return GateDecision(
            False, [f"the champion moved from v{parent} while retraining: compare again before promoting"]
        )
    if not promote:
        return GateDecision(False, ["promotion not asked for"])
    return None
