"""Metrics against hand-computed values and against scikit-learn."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from mexit.attacks.metrics import (
    _SortedROC,
    attack_metrics,
    best_threshold,
    exit_stealing_metrics,
    js_divergence,
    js_divergence_per_exit,
    member_share_per_exit,
    roc_points,
    tpr_at_fpr,
    train_test_gap,
)
from mexit.errors import InputError

# positives at 0.9, 0.8, 0.6, 0.3; negatives at 0.7, 0.4, 0.2, 0.1
HAND_SCORES = np.array([0.9, 0.8, 0.7, 0.6, 0.4, 0.3, 0.2, 0.1])
HAND_MEMBER = np.array([1, 1, 0, 1, 0, 1, 0, 0], dtype=bool)


def test_hand_computed_auc_and_balanced_accuracy() -> None:
    m = attack_metrics(HAND_MEMBER, HAND_SCORES, n_bootstrap=0)
    assert m["auc"]["value"] == pytest.approx(13 / 16)  # 13 of 16 member/non-member pairs ordered right
    # at 0.5: members predicted for 0.9, 0.8, 0.7, 0.6 -> TPR 3/4, TNR 3/4
    assert m["balanced_accuracy"]["value"] == pytest.approx(0.75)
    assert m["threshold_source"] == "default-0.5"
    assert m["auc"]["ci"] is None
    # best over thresholds: cut below 0.6 gives TPR 3/4, FPR 1/4 (0.75); below 0.8 gives 2/4, 0 (0.75); no better
    assert m["balanced_accuracy_best"]["value"] == pytest.approx(0.75)


@pytest.mark.parametrize("seed", [0, 1])
def test_matches_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    member = rng.random(700) < 0.4
    scores = np.round(rng.normal(size=700) + 0.7 * member, 1)  # many ties
    probs = 1 / (1 + np.exp(-scores))
    m = attack_metrics(member, probs, n_bootstrap=0)
    assert m["auc"]["value"] == pytest.approx(roc_auc_score(member, probs))
    assert m["balanced_accuracy"]["value"] == pytest.approx(balanced_accuracy_score(member, probs >= 0.5))
    # the weighted core that the bootstrap uses agrees with scikit-learn at unit weights
    core = _SortedROC(member, probs).metrics(np.ones((1, 700)), 0.5, (0.01,), "lira")
    assert core["auc"][0] == pytest.approx(roc_auc_score(member, probs))
    assert core["balanced_accuracy"][0] == pytest.approx(balanced_accuracy_score(member, probs >= 0.5))
    assert core["tpr@0.01"][0] == pytest.approx(tpr_at_fpr(member, probs, 0.01))


def test_tpr_at_fpr_constructed() -> None:
    neg = np.arange(1000) / 1000  # 0.000 .. 0.999
    pos = np.r_[np.full(10, 2.0), np.full(20, 0.9955), np.full(70, -1.0)]
    scores = np.r_[pos, neg]
    member = np.r_[np.ones(100, bool), np.zeros(1000, bool)]
    # below FPR 0.1 %: only the 10 top members (the next threshold admits the first false positive)
    assert tpr_at_fpr(member, scores, 0.001) == pytest.approx(0.10)
    # below FPR 1 %: 9 false positives allowed, which passes the 20 members at 0.9955
    assert tpr_at_fpr(member, scores, 0.01) == pytest.approx(0.30)
    m = attack_metrics(member, scores, threshold=0.5, n_bootstrap=0)
    assert m["tpr_at_fpr"]["0.001"]["value"] == pytest.approx(0.10)
    assert m["tpr_at_fpr"]["0.01"]["value"] == pytest.approx(0.30)
    # tied scores make a diagonal ROC segment: the step rule stays at 0, interpolation walks along it
    tied_member, tied = np.array([True, False, True, False]), np.array([1.0, 1.0, 0.0, 0.0])
    assert tpr_at_fpr(tied_member, tied, 0.25) == 0.0
    assert tpr_at_fpr(tied_member, tied, 0.25, method="interp") == pytest.approx(0.25)
    assert m["warnings"]  # 1000 non-members cannot resolve FPR 0.1 % with >= 10 false positives


def test_bootstrap_ci_contains_point_and_is_seeded() -> None:
    rng = np.random.default_rng(3)
    member = rng.random(600) < 0.5
    probs = 1 / (1 + np.exp(-(rng.normal(size=600) + member)))
    a = attack_metrics(member, probs, n_bootstrap=300, seed=5)
    b = attack_metrics(member, probs, n_bootstrap=300, seed=5)
    c = attack_metrics(member, probs, n_bootstrap=300, seed=6)
    for key in ("auc", "balanced_accuracy", "balanced_accuracy_best"):
        lo, hi = a[key]["ci"]
        assert lo <= a[key]["value"] <= hi
        assert hi - lo < 0.2
        assert a[key]["ci"] == b[key]["ci"]
    assert a["auc"]["ci"] != c["auc"]["ci"]
    lo, hi = a["tpr_at_fpr"]["0.01"]["ci"]
    assert lo <= a["tpr_at_fpr"]["0.01"]["value"] <= hi


def test_best_threshold_on_shadow_transfers() -> None:
    rng = np.random.default_rng(0)
    shadow_member = rng.random(400) < 0.5
    shadow = rng.normal(size=400) + 3 * shadow_member  # scores, not probabilities
    t = best_threshold(shadow_member, shadow)
    assert balanced_accuracy_score(shadow_member, shadow >= t) == pytest.approx(
        attack_metrics(shadow_member, shadow, threshold=t, n_bootstrap=0)["balanced_accuracy_best"]["value"])
    target_member = rng.random(400) < 0.5
    target = rng.normal(size=400) + 3 * target_member
    m = attack_metrics(target_member, target, threshold=t, n_bootstrap=0)
    assert m["threshold_source"] == "given"
    assert m["balanced_accuracy"]["value"] > 0.85
    # perfectly separable data: the threshold sits strictly between the classes
    sep_member = np.r_[np.ones(5, bool), np.zeros(5, bool)]
    sep = np.r_[np.arange(5) + 10.0, np.arange(5) * 1.0]
    assert 4.0 < best_threshold(sep_member, sep) < 10.0


def test_roc_points_and_input_errors() -> None:
    pts = roc_points(HAND_MEMBER, HAND_SCORES)
    assert pts["fpr"][0] == 0 and pts["tpr"][-1] == 1 and pts["fpr_floor"] == pytest.approx(0.25)
    with pytest.raises(InputError, match="both members and non-members"):
        attack_metrics(np.ones(4, bool), np.linspace(0, 1, 4))
    with pytest.raises(InputError, match="not probabilities"):
        attack_metrics(HAND_MEMBER, HAND_SCORES * 10)
    with pytest.raises(InputError, match="equal length"):
        attack_metrics(HAND_MEMBER, HAND_SCORES[:-1])
    with pytest.raises(InputError, match="NaN"):
        attack_metrics(HAND_MEMBER, np.r_[HAND_SCORES[:-1], np.nan])


def test_exit_stealing_metrics_confusion() -> None:
    true = np.array([0, 0, 1, 1, 1, 2])
    pred = np.array([0, 1, 1, 1, 2, 2])
    m = exit_stealing_metrics(true, pred, num_exits=4)
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["confusion_matrix"] == [[1, 1, 0, 0], [0, 2, 1, 0], [0, 0, 1, 0], [0, 0, 0, 0]]
    assert m["per_exit_recall"] == [0.5, pytest.approx(2 / 3), 1.0, None]
    # an extra predicted cluster widens the matrix instead of vanishing
    wide = exit_stealing_metrics(np.array([0, 1]), np.array([0, 3]), num_exits=2)
    assert len(wide["confusion_matrix"]) == 4 and wide["confusion_matrix"][1][3] == 1


def test_js_divergence() -> None:
    rng = np.random.default_rng(0)
    a = rng.normal(size=2000)
    assert js_divergence(a, a.copy()) == pytest.approx(0.0, abs=1e-12)
    assert js_divergence(a, a + 0.5) > 0.01
    assert js_divergence(np.zeros(10), np.ones(10), bins=np.array([-0.5, 0.5, 1.5])) == pytest.approx(1.0)
    assert math.isnan(js_divergence(a, np.array([])))

    loss = np.r_[rng.exponential(0.1, 300), rng.exponential(1.0, 300), rng.exponential(0.5, 200)]
    member = np.r_[np.ones(300, bool), np.zeros(300, bool), np.ones(200, bool)]
    exits = np.r_[np.zeros(600, int), np.ones(200, int)]
    js = js_divergence_per_exit(loss, member, exits, num_exits=3)
    assert js.shape == (3,)
    assert js[0] > 0.1
    assert math.isnan(js[1]) and math.isnan(js[2])  # exit 1: members only; exit 2: nobody


def test_member_share_and_gap() -> None:
    member = np.array([1, 1, 0, 1, 0, 0], dtype=bool)
    exits = np.array([0, 0, 0, 1, 1, 1])
    share = member_share_per_exit(member, exits, num_exits=3)
    assert share["members"].tolist() == [2, 1, 0]
    assert share["nonmembers"].tolist() == [1, 2, 0]
    assert share["member_share"][:2] == pytest.approx([2 / 3, 1 / 3])
    assert math.isnan(share["member_share"][2])
    assert train_test_gap(0.99, 0.8) == pytest.approx(0.19)
    with pytest.raises(InputError):
        train_test_gap(99.0, 80.0)
