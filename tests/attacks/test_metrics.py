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
    clopper_pearson,
    exit_balanced_accuracy,
    exit_stealing_metrics,
    js_divergence,
    js_divergence_per_exit,
    low_fpr_tpr,
    member_share_per_exit,
    paired_bootstrap,
    per_exit_js,
    roc_points,
    significance_statement,
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


def test_tpr_at_fpr_agrees_with_attack_metrics_on_ties() -> None:
    """Issue 13: with drop_intermediate=True the two disagreed in ~2 % of random tied cases."""
    rng = np.random.default_rng(0)
    for _ in range(400):
        n = int(rng.integers(20, 200))
        member = rng.random(n) < 0.5
        if member.all() or not member.any():
            continue
        scores = np.round(rng.normal(size=n) + member, int(rng.integers(0, 2)))  # heavy ties
        fpr = float(rng.choice([0.01, 0.05, 0.1, 0.2]))
        m = attack_metrics(member, scores, threshold=0.0, n_bootstrap=0, fprs=(fpr,))
        assert tpr_at_fpr(member, scores, fpr) == pytest.approx(m["tpr_at_fpr"][f"{fpr:g}"]["value"])


def test_clopper_pearson_known_values() -> None:
    from scipy.stats import beta

    assert clopper_pearson(0, 10) == pytest.approx([0.0, 1 - 0.025 ** (1 / 10)])
    lo, hi = clopper_pearson(7, 20)
    assert lo == pytest.approx(beta.ppf(0.025, 7, 14)) and hi == pytest.approx(beta.ppf(0.975, 8, 13))
    with pytest.raises(InputError):
        clopper_pearson(3, 2)


def test_low_fpr_tpr_measurable_only_with_enough_nonmembers() -> None:
    rng = np.random.default_rng(1)
    member = np.r_[np.ones(500, bool), np.zeros(1500, bool)]
    scores = rng.normal(size=2000) + 1.5 * member
    out = low_fpr_tpr(member, scores, fprs=(0.001, 0.01))
    assert not out["0.001"]["measurable"] and out["0.001"]["value"] is None
    assert out["0.001"]["note"] == "not measurable: needs >= 10000 non-members, has 1500"
    one = out["0.01"]
    assert one["measurable"] and one["value"] == pytest.approx(tpr_at_fpr(member, scores, 0.01))
    assert one["achieved_fpr"] < 0.01 and one["ci"][0] <= one["value"] <= one["ci"][1]
    assert one["ci"] == pytest.approx(clopper_pearson(round(one["value"] * 500), 500))


def test_paired_bootstrap() -> None:
    rng = np.random.default_rng(2)
    member = rng.random(800) < 0.5
    weak = rng.normal(size=800) + 0.3 * member
    strong = weak + 1.0 * member + 0.3 * rng.normal(size=800)
    same = paired_bootstrap(member, weak, weak.copy(), n_bootstrap=200)
    assert same["auc"]["difference"] == 0 and same["auc"]["ci"] == [0.0, 0.0] and not same["auc"]["significant"]
    diff = paired_bootstrap(member, weak, strong, n_bootstrap=300, seed=4)
    assert diff["auc"]["significant"] and diff["auc"]["ci"][0] > 0
    assert diff["auc"]["difference"] == pytest.approx(roc_auc_score(member, strong) - roc_auc_score(member, weak))
    assert diff["tpr@0.01"]["b"] == pytest.approx(tpr_at_fpr(member, strong, 0.01))
    assert diff == paired_bootstrap(member, weak, strong, n_bootstrap=300, seed=4)
    # paired is tighter than the two unpaired intervals would suggest: scores share most of their noise
    noisy = weak + 0.05 * rng.normal(size=800) + 0.1 * member
    close = paired_bootstrap(member, weak, noisy, n_bootstrap=300)
    a = attack_metrics(member, weak, threshold=0, n_bootstrap=300)
    assert close["auc"]["ci"][1] - close["auc"]["ci"][0] < (a["auc"]["ci"][1] - a["auc"]["ci"][0]) / 2


def test_significance_statement() -> None:
    rng = np.random.default_rng(3)
    member = rng.random(300) < 0.5
    null = attack_metrics(member, rng.random(300), n_bootstrap=300)
    assert significance_statement(null).startswith("no significant leakage")
    real = attack_metrics(member, 1 / (1 + np.exp(-(rng.normal(size=300) + 2 * member))), n_bootstrap=300)
    assert significance_statement(real).startswith("significant: AUC")
    # a rule that ranks members lower (fitted on a shadow it does not transfer from) is not called leakage
    flipped = attack_metrics(member, 1 / (1 + np.exp(rng.normal(size=300) + 2 * member)), n_bootstrap=300)
    assert significance_statement(flipped).startswith("inverted: AUC")
    assert "does not transfer" in significance_statement(flipped)


def test_per_exit_js_does_not_collapse_and_has_a_baseline() -> None:
    rng = np.random.default_rng(4)
    n = 400
    # raw losses in [0, 9]: members near 1e-4, non-members near 1e-2 — every one in the first linear bin
    member = np.r_[np.ones(n, bool), np.zeros(n, bool)]
    loss0 = np.r_[rng.exponential(1e-4, n), rng.exponential(1e-2, n)]
    loss0[-1] = 9.0
    old = js_divergence(loss0[member], loss0[~member], np.histogram_bin_edges(loss0, bins=50))
    assert old < 0.01  # the estimator of issue 11: (almost) everything in bin 0, it collapses
    # exit 1: identical distributions; exit 2: too few samples
    loss1 = rng.exponential(1.0, 2 * n)
    loss = np.r_[loss0, loss1, rng.exponential(1.0, 10)]
    mem = np.r_[member, member, np.r_[np.ones(5, bool), np.zeros(5, bool)]]
    exits = np.r_[np.zeros(2 * n, int), np.ones(2 * n, int), np.full(10, 2)]
    rows = per_exit_js(loss, mem, exits, num_exits=4, n_permutations=200, seed=0)
    assert rows[0]["js"] > 0.5 and rows[0]["p_value"] < 0.01 and rows[0]["js"] > 10 * rows[0]["baseline_q95"]
    assert rows[1]["js"] < rows[1]["baseline_q95"] * 2 and rows[1]["p_value"] > 0.01
    assert abs(rows[1]["excess"]) < 0.02
    assert rows[2]["js"] is None and "needs >= 20 of each" in rows[2]["note"]
    assert rows[3]["n_members"] == 0 and rows[3]["js"] is None
    assert rows == per_exit_js(loss, mem, exits, num_exits=4, n_permutations=200, seed=0)
    # the array form now bins log-losses: exit 0 no longer collapses either
    assert js_divergence_per_exit(loss0, member, np.zeros(2 * n, int), num_exits=1)[0] > 0.5


def test_exit_balanced_accuracy_averages_recall_over_the_exits_taken_without_sklearn_warnings() -> None:
    import warnings

    true = np.array([0, 0, 0, 1, 1, 3])
    pred = np.array([0, 0, 2, 1, 0, 3])  # exit 2 is named but nobody took it
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the expected scikit-learn warning is not shown
        value = exit_balanced_accuracy(true, pred)
    assert value == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    with pytest.warns(UserWarning, match="y_pred contains classes not in y_true"):  # what it keeps quiet
        from sklearn.metrics import balanced_accuracy_score

        assert balanced_accuracy_score(true, pred) == pytest.approx(value)
