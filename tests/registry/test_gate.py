"""The paired gate's decisions on made-up answers: both models answer the same images of the same
cells, and the gate promotes only when the interval of the difference says so."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from made_up_answers import CLASSES, answering, cells, groups, pair

from hematovision.params import PromoteParams, RetrainParams
from hematovision.registry.gate import gate, retraining_policy
from hematovision.registry.paired import answers_frame, pair_answers, paired_difference

POLICY = PromoteParams(metric="val_macro_f1", min_improvement=0.0, per_class_tolerance=0.02, floor=0.8)


ROWS = cells()  # 60 cells, 240 images


def test_a_clear_win_is_promoted_with_its_interval_in_the_reasons():
    champion_wrong = groups(ROWS, "monocyte", 6) + groups(ROWS, "eosinophil", 6)
    decision = gate({}, {}, POLICY, paired=pair(ROWS, champion_wrong, []))
    assert decision.passed, decision.reasons
    headline = decision.intervals["val_macro_f1"]
    assert headline.low > 0 and headline.n_cells == 60 and headline.n_images == 240
    assert any("beats champion" in r and "95% interval [" in r and "60 cells" in r for r in decision.reasons)
    assert decision.figures()["gate_val_macro_f1_low"] == headline.low


def test_a_tie_within_noise_is_refused_though_the_old_rule_promoted_it():
    # The challenger gets two cells more right than the champion, and others wrong: 3.3 points of
    # accuracy on 60 cells, the size of the noise between two runs of one recipe, which the
    # unpaired rule (beat the champion's figure) promoted.
    champion_wrong = groups(ROWS, "monocyte", 3) + groups(ROWS, "neutrophil", 3)
    challenger_wrong = groups(ROWS, "monocyte", 2, start=3) + groups(ROWS, "eosinophil", 2)
    paired = pair(ROWS, champion_wrong, challenger_wrong)
    headline = paired_difference(paired["val"], "val_macro_f1", CLASSES)
    assert headline.difference > 0.03  # the old gate: challenger's macro-F1 above the champion's
    decision = gate({}, {}, PromoteParams(per_class_tolerance=1.0), paired=paired)
    assert not decision.passed
    assert any("does not beat champion beyond noise" in r and "interval" in r for r in decision.reasons)
    assert decision.intervals["val_macro_f1"].low < 0 < decision.intervals["val_macro_f1"].high


def test_identical_answers_are_a_tie():
    wrong = groups(ROWS, "monocyte", 4)
    decision = gate({}, {}, POLICY, paired=pair(ROWS, wrong, wrong))
    assert not decision.passed
    assert decision.intervals["val_macro_f1"].low == decision.intervals["val_macro_f1"].high == 0.0


def test_a_per_class_loss_is_refused_even_when_the_average_clearly_improves():
    champion_wrong = groups(ROWS, "eosinophil", 7) + groups(ROWS, "neutrophil", 7)
    challenger_wrong = groups(ROWS, "monocyte", 2)
    decision = gate({}, {}, POLICY, paired=pair(ROWS, champion_wrong, challenger_wrong))
    assert decision.intervals["val_macro_f1"].low > 0  # a clear win on the average ...
    assert not decision.passed  # ... but monocyte loses
    assert any("monocyte F1 drops" in r and "same val images" in r for r in decision.reasons)


def test_min_improvement_is_asked_of_the_lower_bound():
    champion_wrong = groups(ROWS, "monocyte", 6) + groups(ROWS, "eosinophil", 6)
    paired = pair(ROWS, champion_wrong, [])
    low = gate({}, {}, POLICY, paired=paired).intervals["val_macro_f1"].low
    assert not gate({}, {}, PromoteParams(min_improvement=low + 0.01), paired=paired).passed


def retraining(holdout_wrong, test_champion_wrong, test_challenger_wrong, margin: float):
    holdout_rows = cells(6, 1, prefix="h")  # corrections: every image its own cell
    test_rows = cells(20, 5, prefix="t")
    paired = {
        "holdout": pair_answers(answering(holdout_rows, set(holdout_wrong)), answering(holdout_rows, set())),
        "test": pair_answers(
            answering(test_rows, set(test_champion_wrong)), answering(test_rows, set(test_challenger_wrong))
        ),
    }
    policy, guards = retraining_policy(RetrainParams(guard_tolerance=margin, per_class_tolerance=1.0), POLICY)
    return gate({}, {}, policy, guards=guards, paired=paired), holdout_rows, test_rows


def test_a_guard_passes_within_its_margin_and_refuses_beyond_it():
    holdout = cells(6, 1, prefix="h")
    test = cells(20, 5, prefix="t")
    new_site_wins = groups(holdout, "monocyte", 5) + groups(holdout, "eosinophil", 5) + groups(holdout, "neutrophil", 4)
    same_on_test = groups(test, "monocyte", 3)
    within, *_ = retraining(new_site_wins, same_on_test, same_on_test, 0.03)
    assert within.passed, within.reasons
    assert any(r.startswith("guard test_accuracy") and "within the tolerance" in r for r in within.reasons)
    assert "test_accuracy" in within.intervals and "holdout_accuracy" in within.intervals

    loses_test = same_on_test + groups(test, "lymphocyte", 6) + groups(test, "neutrophil", 6)
    beyond, *_ = retraining(new_site_wins, same_on_test, loses_test, 0.03)
    assert not beyond.passed
    assert any("MORE than the tolerance (margin) 0.0300" in r for r in beyond.reasons)
    # The same loss passes a margin wide enough for it: the guard is "not worse beyond the margin".
    wide, *_ = retraining(new_site_wins, same_on_test, loses_test, 0.5)
    assert wide.passed, wide.reasons


def test_the_decision_is_deterministic():
    champion_wrong = groups(ROWS, "monocyte", 3) + groups(ROWS, "neutrophil", 4)
    challenger_wrong = groups(ROWS, "lymphocyte", 2)
    first = gate({}, {}, POLICY, paired=pair(ROWS, champion_wrong, challenger_wrong))
    again = gate({}, {}, POLICY, paired=pair(ROWS.sample(frac=1, random_state=1), champion_wrong, challenger_wrong))
    assert first.reasons == again.reasons and first.intervals == again.intervals
    other_seed = gate(
        {}, {}, PromoteParams(bootstrap_seed=7), paired=pair(ROWS, champion_wrong, challenger_wrong)
    ).intervals["val_macro_f1"]
    assert other_seed.difference == first.intervals["val_macro_f1"].difference


def test_a_new_class_is_reported_and_the_shared_classes_compared():
    rows = cells()
    basophils = cells(5, 4, classes=("basophil",), prefix="b")
    five = ("basophil", *CLASSES)
    champion = answering(rows, set(groups(rows, "monocyte", 6) + groups(rows, "eosinophil", 6)))
    challenger_rows = pd.concat([rows, basophils], ignore_index=True)
    wrong_basophil = {"basophil/b0"}  # one of five basophil cells answered as the next class
    predicted = [
        "eosinophil" if group in wrong_basophil else label
        for label, group in zip(challenger_rows.label, challenger_rows.group)
    ]
    challenger = answers_frame(challenger_rows, predicted)
    paired = {"val": pair_answers(champion, challenger)}
    assert paired["val"].champion.isna().sum() == len(basophils)  # the champion could not answer them
    decision = gate({}, {}, POLICY, paired=paired, classes=(CLASSES, five))
    assert decision.passed, decision.reasons
    assert decision.intervals["val_macro_f1"].n_cells == 60  # the shared classes' cells only
    assert any("the challenger adds basophil" in r for r in decision.reasons)
    new = next(r for r in decision.reasons if r.startswith("new class basophil"))
    assert "recall 0.8000" in new and "20 val images of 5 cells" in new


def test_a_challenger_lacking_a_class_is_compared_on_the_rest():
    three = CLASSES[:3]
    champion = answering(ROWS, set(groups(ROWS, "monocyte", 8)))
    rows3 = ROWS[ROWS.label.isin(three)]
    challenger = answers_frame(rows3, list(rows3.label))
    decision = gate({}, {}, POLICY, paired={"val": pair_answers(champion, challenger)}, classes=(CLASSES, three))
    assert any("the challenger lacks neutrophil" in r for r in decision.reasons)
    assert decision.intervals["val_macro_f1"].n_cells == 45


def test_too_few_shared_cells_refuse_with_the_reason():
    rows = cells(2, 3)  # 8 cells
    decision = gate({}, {}, POLICY, paired=pair(rows, groups(rows, "monocyte", 2), []))
    assert not decision.passed
    assert "only 8 val cells answered by both models (promote.min_shared_cells 20)" in decision.reasons[-1]
    assert "--force" in decision.reasons[-1]


def test_without_paired_answers_the_gate_refuses():
    decision = gate({"val_macro_f1": 0.99}, {"val_macro_f1": 0.5}, POLICY)
    assert not decision.passed and "no answers of both models" in decision.reasons[0]


def test_first_model_must_reach_the_floor():
    assert gate({"val_macro_f1": 0.85}, None, POLICY).passed
    refused = gate({"val_macro_f1": 0.75}, None, POLICY)
    assert not refused.passed and "floor" in refused.reasons[0]


def test_the_paired_interval_matches_a_direct_computation():
    rng = np.random.default_rng(3)
    rows = cells(10, 3)
    paired = pair(rows, set(rng.choice(rows.group.unique(), 8, replace=False)), [])
    interval = paired_difference(paired["val"], "val_accuracy", CLASSES, samples=500, seed=5)
    assert interval.champion == pytest.approx(32 / 40) and interval.challenger == 1.0
    assert 0 < interval.low <= interval.difference <= interval.high
    with pytest.raises(ValueError, match="accuracy or macro_f1"):
        paired_difference(paired["val"], "val_cell_accuracy", CLASSES)
