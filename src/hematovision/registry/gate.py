"""The promotion gate: whether a challenger may replace the champion, and why.

Every promotion goes through here: the training flow's (both models' answers on this run's
validation cells), retraining's (the new site's held-out corrections, with TEST as a guard), an
engineer's through the service or the CLI. Champion and challenger are compared *paired*: on the
same images, the difference of a metric with a bootstrap interval that resamples cells
(``registry/paired.py``). A challenger wins only when the interval's lower bound is above
``min_improvement`` (0: better beyond noise); a guard passes when it is above minus its margin.
A decision carries its reasons, each interval in them; they are printed, written on the version
(tag ``gate``) and on the version's run (metrics ``gate_<metric>_*``, tag ``gate_intervals``, the
paired answers under ``gate/``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace

import pandas as pd

from hematovision.params import PromoteParams, RetrainParams
from hematovision.registry.paired import (
    PairedDifference,
    class_figures,
    paired_difference,
    per_class_f1,
    shared_rows,
)
from hematovision.registry.registry import CHAMPION, Registry

logger = logging.getLogger(__name__)


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    intervals: dict[str, PairedDifference] = field(default_factory=dict)

    def summary(self) -> str:
        verdict = "PASSED" if self.passed else "REFUSED"
        return f"gate {verdict}: " + "; ".join(self.reasons)

    def figures(self) -> dict[str, float]:
        """Every interval's scalars, for the version's MLflow run."""
        return {k: v for interval in self.intervals.values() for k, v in interval.figures().items()}


def gate(
    challenger: Mapping[str, float],
    champion: Mapping[str, float] | None,
    policy: PromoteParams,
    *,
    guards: Mapping[str, float] | None = None,
    paired: Mapping[str, pd.DataFrame] | None = None,
    classes: tuple[Sequence[str], Sequence[str]] | None = None,
) -> GateDecision:
    """Decide whether the challenger may replace the champion.

    The first model (``champion`` None) must reach ``policy.floor`` on ``policy.metric`` (from
    ``challenger``, its logged metrics). Otherwise (``champion`` given; its logged figures are not
    compared, they may come from other images) the decision rests on ``paired``: split name ->
    both models' answers on the same images (:func:`hematovision.registry.paired.pair_answers`);
    ``classes`` is (champion's classes, challenger's classes), taken from the answers when not given.
    Only the classes both models know are compared; a class the challenger adds is reported with
    its figures, one it lacks is named, neither refuses. The challenger must:

    * win on ``policy.metric``: the lower bound of the paired interval of challenger - champion
      above ``policy.min_improvement``;
    * lose no more than ``policy.per_class_tolerance`` F1 on any shared class (same images);
    * for each guard (metric -> margin, e.g. TEST accuracy in retraining), not be worse beyond the
      margin: the guard's paired interval's lower bound above -margin.

    Too few cells answered by both (``policy.min_shared_cells``) refuse: nothing can be told from
    noise. Every check contributes a reason, each interval in it, so a refusal explains itself."""
    metric = policy.metric
    if champion is None:
        if metric not in challenger:
            return GateDecision(False, [f"challenger has no {metric} metric"])
        value = challenger[metric]
        passed = value >= policy.floor
        return GateDecision(
            passed, [f"first model: {metric} {value:.4f} {'>=' if passed else '<'} floor {policy.floor:.4f}"]
        )

    split = metric.split("_", 1)[0]
    frame = (paired or {}).get(split)
    if frame is None:
        return GateDecision(
            False,
            [
                f"no answers of both models on the same {split} images: the gate cannot tell a better model from "
                "noise; compare them and promote by hand if the challenger is better (--force)"
            ],
        )
    champion_classes, challenger_classes = classes or (_answered(frame, "champion"), _answered(frame, "challenger"))
    shared = [name for name in challenger_classes if name in set(champion_classes)]
    reasons: list[str] = []
    added = [name for name in challenger_classes if name not in set(champion_classes)]
    lost = [name for name in champion_classes if name not in set(challenger_classes)]
    if added or lost:
        reasons.append(
            f"compared on the {len(shared)} classes both models know ({', '.join(shared)})"
            + (f"; the challenger adds {', '.join(added)}" if added else "")
            + (f"; the challenger lacks {', '.join(lost)}" if lost else "")
        )
    n_cells = shared_rows(frame, shared).group.nunique()
    if n_cells < policy.min_shared_cells:
        return GateDecision(
            False,
            reasons
            + [
                f"only {n_cells} {split} cells answered by both models (promote.min_shared_cells "
                f"{policy.min_shared_cells}): too few to tell a better model from noise; compare them "
                "and promote by hand if the challenger is better (--force)"
            ],
        )

    headline = _interval(frame, metric, shared, policy)
    intervals = {metric: headline}
    passed = headline.low > policy.min_improvement
    if passed:
        reasons.append(f"{headline.describe()}: beats champion (lower bound > {policy.min_improvement:.4f})")
    else:
        reasons.append(
            f"{headline.describe()}: does not beat champion beyond noise "
            f"(lower bound {headline.low:+.4f} <= {policy.min_improvement:.4f})"
        )

    before, after = per_class_f1(frame, shared, "champion"), per_class_f1(frame, shared, "challenger")
    losers = []
    for name in shared:
        drop = before[name] - after[name]
        if drop > policy.per_class_tolerance:
            losers.append(name)
            reasons.append(
                f"{name} F1 drops {drop:.4f} ({before[name]:.4f} -> {after[name]:.4f}) on the same {split} images,"
                f" more than the tolerance {policy.per_class_tolerance:.4f}"
            )
    passed = passed and not losers
    if not losers:
        reasons.append(f"no class loses more than {policy.per_class_tolerance:.4f} F1 on the same {split} images")
    for name in added:
        figures = class_figures(frame, name)
        reasons.append(
            f"new class {name}: F1 {figures['f1']:.4f}, recall {figures['recall']:.4f} on {figures['n_images']} "
            f"{split} images of {figures['n_cells']} cells"
            if figures["n_images"]
            else f"new class {name}: no {split} images of it to judge it on"
        )

    for key, margin in (guards or {}).items():
        guard_frame = (paired or {}).get(key.split("_", 1)[0])
        if guard_frame is None:
            passed = False
            reasons.append(f"guard {key} cannot be checked: no answers of both models on the same images")
            continue
        interval = _interval(guard_frame, key, shared, policy)
        intervals[key] = interval
        within = interval.low > -margin and interval.n_cells >= policy.min_shared_cells
        passed = passed and within
        reasons.append(
            f"guard {interval.describe()}: lower bound {interval.low:+.4f} "
            f"{'within' if within else 'MORE than'} the tolerance (margin) {margin:.4f}"
            if interval.n_cells >= policy.min_shared_cells
            else f"guard {key}: only {interval.n_cells} cells answered by both models, too few to check it"
        )
    return GateDecision(passed, reasons, intervals)


def _interval(frame: pd.DataFrame, metric: str, classes: Sequence[str], policy: PromoteParams) -> PairedDifference:
    return paired_difference(frame, metric, classes, policy.bootstrap_samples, policy.confidence, policy.bootstrap_seed)


def _answered(frame: pd.DataFrame, who: str) -> list[str]:
    """The classes a model is known to have answered for (its labelled rows), sorted."""
    return sorted(frame.label[frame[who].notna()].unique())


def promote(
    registry: Registry,
    version: str | int,
    policy: PromoteParams,
    force: bool = False,
    *,
    guards: Mapping[str, float] | None = None,
    challenger_metrics: Mapping[str, float] | None = None,
    paired: Mapping[str, pd.DataFrame] | None = None,
    classes: tuple[Sequence[str], Sequence[str]] | None = None,
    not_comparable: str | None = None,
) -> GateDecision:
    """Move ``champion`` to ``version`` if the gate passes (or ``force``); returns the decision.

    ``paired`` holds both models' answers on the same images (see :func:`gate`): the training flow
    scores both on its validation split, retraining on the corrections' holdout and TEST. The first
    model is judged on ``challenger_metrics`` (default: those logged in its run) against the floor.
    ``not_comparable`` says why no fair comparison exists (the champion trained on the
    challenger's validation cells, or could not be scored): the gate then refuses with that
    reason, and only a person can promote (``force``). The decision goes on the version (tag
    ``gate``) and on its run (intervals as metrics, the paired answers as artifacts)."""
    version = str(registry.get_version(version).version)
    champion = registry.version_by_alias(CHAMPION)
    if champion is not None and str(champion.version) == version:
        return GateDecision(True, [f"version {version} is already the champion"])
    if champion is not None and not_comparable:
        decision = GateDecision(False, [not_comparable])
    elif champion is None:
        metrics = dict(challenger_metrics) if challenger_metrics is not None else registry.metrics_of(version)
        decision = gate(metrics, None, policy)
    else:
        decision = gate({}, {}, policy, guards=guards, paired=paired, classes=classes)
    if champion is not None:
        decision.reasons.insert(0, f"challenger v{version} vs champion v{champion.version}")
    if force and not decision.passed:
        decision = replace(decision, passed=True, reasons=decision.reasons + ["forced past the gate"])
    registry.record_gate(version, decision)
    _record_on_run(registry, version, decision, paired)
    if decision.passed:
        registry.move_champion(version)
    return decision


def _record_on_run(
    registry: Registry, version: str, decision: GateDecision, paired: Mapping[str, pd.DataFrame] | None
) -> None:
    """The intervals (metrics and tag ``gate_intervals``) and the paired answers (``gate/paired_<split>.csv``)
    on the version's MLflow run. Best effort: the decision is already on the version."""
    run_id = registry.get_version(version).run_id
    if not run_id:
        return
    try:
        client = registry.client
        for key, value in decision.figures().items():
            client.log_metric(run_id, key, value)
        client.set_tag(
            run_id, "gate_intervals", json.dumps({k: v.describe() for k, v in decision.intervals.items()})[:5000]
        )
        for split, frame in (paired or {}).items():
            client.log_text(run_id, frame.to_csv(index=False), f"gate/paired_{split}.csv")
    except Exception as error:  # noqa: BLE001 - the version's tag already holds the decision
        logger.warning("could not record the gate's intervals on run %s: %s", run_id, error)


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


def retraining_policy(
    rp: RetrainParams, promote: PromoteParams | None = None
) -> tuple[PromoteParams, dict[str, float]]:
    """The gate of a retrained challenger: win on ``rp.metric`` (the new site's holdout) beyond noise,
    not be worse than ``rp.guard_tolerance`` (the margin) on ``rp.guard_metric`` (TEST); no floor (the
    parent already passed one). The bootstrap's settings are ``promote``'s; each held-out correction
    is its own cell, and ``rp.min_holdout`` of them are enough to judge."""
    base = promote or PromoteParams()
    policy = replace(
        base,
        metric=rp.metric,
        min_improvement=rp.min_improvement,
        per_class_tolerance=rp.per_class_tolerance,
        floor=0.0,
        min_shared_cells=rp.min_holdout,
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
