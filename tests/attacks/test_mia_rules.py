"""The decision rules' building blocks: shadow thresholds, per-exit calibration and fall-backs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import balanced_accuracy_score

from mexit.attacks.mia import best_threshold, get_attack
from mexit.attacks.mia.base import holdout_split
from mexit.attacks.signals import Signals, SignalsError


def _signals(member: np.ndarray, score: np.ndarray, exits: np.ndarray, num_exits: int = 3) -> Signals:
    n = len(member)
    return Signals(member=member.astype(bool), true_label=np.zeros(n, np.int64), pred_label=np.zeros(n, np.int64),
                   sample_index=np.arange(n), num_exits=num_exits, num_classes=2,
                   exit_index=exits.astype(np.int64), true_exit=exits.astype(np.int64),
                   label_only_score=score.astype(np.float32))


def test_best_threshold_maximises_balanced_accuracy_between_samples() -> None:
    rng = np.random.default_rng(0)
    member = rng.random(400) < 0.3  # unbalanced on purpose: balanced accuracy, not accuracy
    scores = rng.normal(size=400) + 1.5 * member
    t = best_threshold(scores, member)
    ours = balanced_accuracy_score(member, scores >= t)
    for cut in np.unique(scores):
        assert balanced_accuracy_score(member, scores >= cut) <= ours + 1e-12
    assert not np.isin(t, scores)  # halfway between two samples
    assert best_threshold(np.r_[0.0, 1.0], np.r_[False, True]) == 0.5
    assert best_threshold(np.r_[1.0, 0.0], np.r_[False, True]) == np.inf  # nothing beats chance
    with pytest.raises(SignalsError, match="both members and non-members"):
        best_threshold(np.r_[0.0, 1.0], np.r_[True, True])


def test_holdout_split_is_stratified_seeded_and_disjoint() -> None:
    member = np.r_[np.ones(50, bool), np.zeros(150, bool)]
    fit, held = holdout_split(member, 0.2, seed=1)
    assert len(np.intersect1d(fit, held)) == 0 and len(fit) + len(held) == 200
    assert member[held].sum() == 10
    np.testing.assert_array_equal(held, holdout_split(member, 0.2, seed=1)[1])
    assert not np.array_equal(held, holdout_split(member, 0.2, seed=2)[1])
    with pytest.raises(SignalsError, match="at least 4"):
        holdout_split(np.r_[np.ones(3, bool), np.zeros(10, bool)], 0.2, seed=0)


def test_exit_only_scores_the_shadow_member_rate_of_each_exit() -> None:
    member = np.r_[np.ones(60, bool), np.zeros(60, bool)]
    exits = np.r_[np.zeros(45), np.ones(15), np.zeros(15), np.ones(45)]  # exit 2 never seen in shadow
    attack = get_attack("exit-only").fit(_signals(member, np.zeros(120), exits))
    np.testing.assert_allclose(attack.exit_member_rate_, [(45 + 1) / (60 + 2), (15 + 1) / (60 + 2), 0.5])
    target = _signals(np.zeros(3, bool), np.zeros(3), np.r_[0, 1, 2])
    np.testing.assert_allclose(attack.score(target), attack.exit_member_rate_)
    np.testing.assert_array_equal(attack.predict(target), [True, False, True])


def test_per_exit_thresholds_follow_each_exits_shadow_samples_and_fall_back_when_unseen() -> None:
    rng = np.random.default_rng(0)
    n = 400
    member = np.r_[np.ones(n // 2, bool), np.zeros(n // 2, bool)]
    exits = rng.integers(0, 2, n)  # exit 2 is never observed on the shadow side
    # exit 0 separates members around 0.8, exit 1 around 0.3: no single global threshold does both
    centre = np.where(exits == 0, 0.8, 0.3)
    score = centre + np.where(member, 0.1, -0.1) + rng.normal(scale=0.03, size=n)
    shadow = _signals(member, score, exits)
    hybrid = get_attack("label-only-hybrid").fit(shadow)
    plain = get_attack("label-only").fit(shadow)
    assert hybrid.fallback_exits_ == [2]
    assert abs(hybrid.exit_thresholds_[0] - 0.8) < 0.05 and abs(hybrid.exit_thresholds_[1] - 0.3) < 0.05
    target = _signals(member, score, exits)
    assert balanced_accuracy_score(member, hybrid.predict(target)) > 0.95
    assert balanced_accuracy_score(member, plain.predict(target)) < 0.8
    # a target sample at the unseen exit is judged by the global rule, i.e. like the plain attack's ranking
    unseen = _signals(np.zeros(2, bool), np.r_[0.2, 0.9], np.r_[2, 2])
    low, high = hybrid.score(unseen)
    assert low < high


def test_an_exit_with_one_class_only_gets_its_smoothed_prior() -> None:
    member = np.r_[np.ones(40, bool), np.zeros(40, bool)]
    exits = np.r_[np.zeros(40), np.ones(20), np.full(20, 2)]  # exit 0: members only
    score = np.linspace(0, 1, 80)
    attack = get_attack("label-only-hybrid", min_exit_samples=5).fit(_signals(member, score, exits))
    s = attack.score(_signals(np.zeros(2, bool), np.r_[0.0, 1.0], np.r_[0, 0]))
    assert s[0] == s[1] and s[0] > 0.9
    assert attack.exit_thresholds_[0] == -np.inf  # everything observed at exit 0 is called a member
